"""metrics.jsonl (one JSON object per evaluation) and TensorBoard scalars."""
from __future__ import annotations

import json
from pathlib import Path


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and key != "round":
            out[name] = value
    return out


class MetricsWriter:
    """Appends evaluation records to ``metrics.jsonl`` and TensorBoard in ``run_dir``."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(log_dir=str(run_dir))

    def rewrite(self, history: list[dict]) -> None:
        """Replace metrics.jsonl by ``history`` (after a resume, the checkpoint's records win)."""
        tmp = self.path.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        tmp.replace(self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, value in _flatten(record).items():
            self.tb.add_scalar(name, value, record["round"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
