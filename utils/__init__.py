"""Helpers any layer may use: seeding, logging, metric writers, plots, checkpoint I/O."""
