"""pfedsim core: the task-agnostic simulator (round loop, aggregation, personalization, transport)."""
