"""Errors a user can cause, reported as one line and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (config, data path, task folder, CLI flag).

    The message is one line that names the file or field and the fix. ``e2e_trainer.py`` prints it
    as ``pfedsim: error: <message>`` and exits with status 2, without a traceback.
    """

    exit_code = 2
