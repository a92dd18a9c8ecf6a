"""Start several pfedsim processes on this machine or node: torch.distributed.run (torchrun) with
pfedsim's exit statuses and quiet output.

    python launch.py --nproc_per_node=4 e2e_trainer.py -dataPath DATA -outputPath OUT \\
        -config experiments/cv/config.yaml -task cv -backend nccl

Takes exactly torch.distributed.run's arguments (``python launch.py --help`` lists them) and runs it
in this process, so ranks, rendezvous and environment are torchrun's. What differs is what the
launcher itself says and returns:

- Ctrl-C (SIGINT) or SIGTERM: torchrun forwards the signal to the ranks as usual, whose server prints
  the one line that says where to resume; this launcher then exits 130 / 143 without torchrun's
  ``SignalException`` traceback.
- A rank that fails: the exit status is that of the first rank to fail (128 + N for a rank killed by
  signal N), and torchrun's failure summary is left out. The ranks print pfedsim's own line for
  every failure pfedsim knows (status 1, 2, 130, 143); for any other status (a crash in native
  code, ``os._exit``, a signal) this launcher adds one line naming the rank, its pid and the status.
- torchrun's log lines (OMP_NUM_THREADS defaults, the closing signals it sends) are not printed;
  its log lines for a failed rank are replaced by the one line above.

``python -m torch.distributed.run`` works as before; it only prints more and exits 1 after a signal.
"""
from __future__ import annotations

import logging
import signal
import sys

# Exit statuses whose cause a pfedsim rank has already printed (see docs/reliability.md).
OWN_STATUSES = {1, 2, 130, 143}


def _status(exitcode: int) -> int:
    """A process's exit status as a shell shows it: 128 + N for death by signal N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


def _errors_only(prefix: str) -> None:
    """Raise every logger under ``prefix`` to CRITICAL (torch's elastic loggers each set their own level
    from $LOGLEVEL when imported, so the parent's level alone would not do)."""
    for name in [prefix, *logging.root.manager.loggerDict]:
        if name == prefix or name.startswith(prefix + "."):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    """Run torch.distributed.run with ``argv`` (default: the command line); returns the exit status:
    0, the first failed rank's status, or 128 + N after signal N reached the launcher."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    _errors_only("torch.distributed")
    try:
        run(args)
    except SignalException as stop:
        return 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if _status(failure.exitcode) not in OWN_STATUSES:
            print(f"pfedsim: error: rank {rank} (pid {failure.pid}) {_describe(failure.exitcode)}",
                  file=sys.stderr)
        return _status(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
