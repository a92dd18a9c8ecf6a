"""Transport.close leaves no gloo thread running, after a normal finish and after a preemption
that lands inside a collective (threads still running while the interpreter exits can abort it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testing.conftest import REPO, rank_envs

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")


def _launch(case: str, out: Path) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "testing.teardown_rank", case, str(out)], cwd=REPO,
                             stderr=subprocess.PIPE, text=True, env=env) for env in rank_envs(2)]


def _reports(procs, out: Path) -> tuple[list[int], list[dict]]:
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all((out / f"rank{r}.json").exists() for r in range(2)), "\n".join(e[-2000:] for e in errs)
    return [p.returncode for p in procs], [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _threads_visible(reports: list[dict]) -> None:
    """The thread checks need gloo's thread names in /proc; torch 2.4 leaves them unnamed (2.11 names them)."""
    if any(r["during"] for r in reports):
        return
    if torch.__version__ < "2.11":  # torch's version string compares as a version
        pytest.skip(f"torch {torch.__version__} does not name its gloo threads; the other checks passed")
    pytest.fail("no gloo thread is named while the group is up: were they renamed?")


@pytest.mark.timeout(180)
def test_close_after_a_normal_finish_stops_every_gloo_thread(tmp_path):
    codes, reports = _reports(_launch("finish", tmp_path), tmp_path)
    assert codes == [0, 0]
    assert reports[0]["reduced"] == [2.0] * 8, "the sum of both ranks' ones"
    assert [(r["held_before_close"], r["held_after_close"]) for r in reports] == [(True, False)] * 2, \
        "the last reduce's buffer stays referenced until the group is destroyed, then is let go"
    _threads_visible(reports)
    assert all(r["during"] for r in reports), "gloo threads run while the group is up"
    assert [r["after_close"] for r in reports] == [[], []]


@pytest.mark.timeout(180)
def test_close_after_preemption_inside_a_collective_stops_every_gloo_thread(tmp_path):
    codes, reports = _reports(_launch("preempted", tmp_path), tmp_path)
    assert codes == [3, 1], "the server exits with SystemExit's code, the worker with PeerFailure"
    assert [r["error"] for r in reports] == ["SystemExit", "PeerFailure"]
    assert "reduced" in reports[1], "the server's teardown let the interrupted reduce finish"
    _threads_visible(reports)
    assert [r["after_close"] for r in reports] == [[], []]
