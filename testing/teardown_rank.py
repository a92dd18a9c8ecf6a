"""One rank of testing/test_teardown.py: a 2-process gloo group, closed by ``Transport.close``
either after a normal finish or while a collective is in flight; writes what is left running.

Usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python -m testing.teardown_rank CASE OUT
(CASE: ``finish`` or ``preempted``; OUT: a folder, rank r writes ``OUT/rank<r>.json``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.distributed import Transport, init_distributed


def process_group_threads() -> list[str]:
    """Names of this process's threads that belong to gloo or the c10d store (Linux /proc)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()]
    return sorted(n for n in names if n.startswith(("gloo", "pt_gloo", "pt_tcpstore")))


def interrupted_reduce(buf: torch.Tensor) -> None:
    """A reduce launched, then SystemExit before its wait: what submitit's SIGUSR2 handler does
    when the signal lands inside a collective."""
    work = dist.reduce(buf, 0, async_op=True)  # noqa: F841  (held by this frame, like a real wait)
    raise SystemExit(3)


def main(case: str, out: Path) -> None:
    ctx = init_distributed("gloo", "cpu", timeout_s=60)
    transport = Transport(ctx)
    model = torch.nn.Linear(4, 2)
    torch.optim.SGD(model.parameters(), lr=0.1)  # the first optimizer makes torch import torch._dynamo
    buf = transport.broadcast(torch.ones(8), "start")
    report = {"rank": ctx.rank, "during": process_group_threads()}
    try:
        if case == "preempted" and ctx.rank == 0:
            interrupted_reduce(buf)
        if case == "preempted":
            time.sleep(0.5)  # the worker is still training when the server is preempted
        report["reduced"] = transport.reduce_sum(buf, "reduce").tolist()
        if case == "preempted":
            transport.broadcast(buf, "next round")  # the server is gone: PeerFailure
    except BaseException as exc:  # closed as core/runner.py closes it
        report["error"] = type(exc).__name__
        _close_and_report(transport, report, out, exc)
        raise
    _close_and_report(transport, report, out)


def _close_and_report(transport: Transport, report: dict, out: Path, error: BaseException | None = None) -> None:
    report["held_before_close"] = transport._held is not None  # the last collective's buffer (see Transport)
    transport.close(error)
    report["held_after_close"] = transport._held is not None
    report["after_close"] = process_group_threads()
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
