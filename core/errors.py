"""Reasons a run stops that are reported as one line, without a traceback."""


class RunStopped(Exception):
    """A run stopped for a reason told in one line (the message) with exit status ``exit_code``.

    ``e2e_trainer.py`` prints a non-empty message as ``pfedsim: error: <message>`` on stderr and
    exits with ``exit_code``; an empty message prints nothing (a rank whose server already said why).
    """

    exit_code = 1


class UserError(RunStopped):
    """A mistake the user can fix (config, data path, task folder, CLI flag).

    The message is one line that names the file or field and the fix. ``e2e_trainer.py`` prints it
    as ``pfedsim: error: <message>`` and exits with status 2, without a traceback.
    """

    exit_code = 2
