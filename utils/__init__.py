"""User tools above the engine: run outputs (metrics, console, summary, plots), reloading, sweeps,
comparisons, the command line's helpers. ``core/`` imports nothing from here."""
