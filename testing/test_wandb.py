"""Weights & Biases logging: off by default without importing wandb; offline runs record the metrics."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import LoggingConfig
from core.errors import UserError
from testing.conftest import REPO, read_metrics
from utils.metrics_writer import MetricsWriter
from utils.report import record_scalars

ARGS = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]
OFFLINE = ["--set", "logging_config.wandb=true", "--set", "logging_config.wandb_mode=offline"]


def _run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """e2e_trainer.main in a fresh interpreter that then prints whether wandb was ever imported."""
    code = ("import sys, e2e_trainer; rc = e2e_trainer.main(sys.argv[1:]); "
            "print('wandb imported:', 'wandb' in sys.modules); sys.exit(rc)")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file (LevelDB log format: 7-byte file header,
    32 KiB blocks of chunks with a 7-byte header crc/length/type, type 1 full, 2-4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return out


def _history(records: list) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


def test_switched_off_a_run_never_imports_wandb(tmp_path):
    proc = _run_in_process([*ARGS, "-outputPath", str(tmp_path), "-run_name", "off"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wandb imported: False" in proc.stdout
    assert not (tmp_path / "off" / "wandb").exists()


def test_offline_run_records_every_evaluation_under_the_run_folder(tmp_path):
    pytest.importorskip("wandb", reason="pip install -e '.[test]' installs wandb")
    run = tmp_path / "on"
    proc = _run_in_process([*ARGS, *OFFLINE, "-outputPath", str(tmp_path), "-run_name", "on",
                            "--set", "server_config.max_iteration=5"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, sorted(p.name for p in (run / "wandb").iterdir())
    records = _records(files[0])
    history = _history(records)
    metrics = read_metrics(run)
    assert sorted(history) == [r["round"] for r in metrics] == [5]
    scalars = record_scalars(metrics[0])
    assert "personalized/p10" in scalars and "global test" in scalars
    assert {k: history[5][k] for k in scalars} == pytest.approx(scalars), "the same scalars as TensorBoard"
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.display_name == "on" and run_record.project == "pfedsim"
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["server_config"]["max_iteration"] == 5 and config["logging_config"]["wandb"] is True

    resumed = _run_in_process([*ARGS, *OFFLINE, "-outputPath", str(tmp_path), "-run_name", "on", "-resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, "a resume continues the W&B run"
    second = max((run / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    assert sorted(_history(_records(second))) == [10]


def test_switched_on_without_wandb_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsWriter(tmp_path, LoggingConfig(wandb=True), {})
