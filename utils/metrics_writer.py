"""metrics.jsonl (one JSON object per evaluation), TensorBoard scalars and, when switched on,
Weights & Biases (``logging_config.wandb``; wandb is imported only then)."""
from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

from core.errors import UserError
from core.observers import RunObserver
from core.files import append_line, disk_guard, write_text_atomic
from utils.report import record_scalars


def strict(value):
    """``value`` with every float that is NaN or infinite replaced by None (JSON null), at any depth,
    so that ``json.dumps(..., allow_nan=False)`` writes strict JSON."""
    if isinstance(value, dict):
        return {key: strict(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(record: dict) -> str:
    """One strict-JSON line (no NaN or Infinity tokens: those become null)."""
    return json.dumps(strict(record), allow_nan=False)


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("logging_config.wandb is true but the wandb package is missing; pip install wandb "
                        "or set logging_config.wandb: false") from None
    return wandb


def check_wandb(logging) -> None:
    """Before a run writes anything: when ``logging.wandb`` is true (``logging``: a ``LoggingConfig``
    or None), import wandb, so that a missing package stops the run before its folder is made
    rather than after. Imports nothing when W&B is off.

    Raises:
        UserError: W&B switched on but the wandb package is missing.
    """
    if logging is not None and logging.wandb:
        _import_wandb()


def start_wandb(run_dir: Path, logging, config: dict | None):
    """Start the W&B run of ``run_dir`` (its files under ``run_dir/wandb/``, named after the folder),
    or continue it after a resume: the run id is kept in ``run_dir/wandb/pfedsim_run_id``.

    ``logging`` is a ``LoggingConfig``; ``config`` (the resolved experiment) becomes ``wandb.config``.

    Raises:
        UserError: the wandb package is not installed, or ``wandb.init`` fails (no API key for an
            online run, no network, a wrong entity).
    """
    wandb = _import_wandb()
    id_file = run_dir / "wandb" / "pfedsim_run_id"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    try:
        return wandb.init(project=logging.wandb_project, entity=logging.wandb_entity, mode=logging.wandb_mode,
                          dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow", config=config)
    except Exception as exc:  # no API key, no network, a wrong entity: wandb's own error types vary by version
        reason = " ".join(str(exc).split())[:200] or "no message"
        raise UserError(f"logging_config.wandb: W&B did not start ({type(exc).__name__}: {reason}); run `wandb login`, "
                        f"or set logging_config.wandb_mode: offline or logging_config.wandb: false") from None


class MetricsWriter(RunObserver):
    """Appends evaluation records to ``metrics.jsonl`` and TensorBoard in ``run_dir``, and to W&B
    when ``logging.wandb`` is true (``logging``: a ``LoggingConfig`` or None; ``config``: the
    resolved experiment as plain data, logged as the W&B run's config).

    Raises:
        UserError: W&B switched on but the wandb package is missing.
    """

    def __init__(self, run_dir: Path, logging=None, config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(log_dir=str(run_dir))
        self.wandb_run = start_wandb(run_dir, logging, config) if logging is not None and logging.wandb else None

    def started(self, history: list[dict], start_round: int, rounds: int) -> None:
        """A resumed run's metrics.jsonl becomes the checkpoint's records (rows written after the
        checkpoint are dropped); a new run's is created at its first evaluation."""
        if start_round > 1:
            self.rewrite(history)

    def evaluated(self, record: dict, rounds: int) -> None:
        self.write(record)

    def rewrite(self, history: list[dict]) -> None:
        """Replace metrics.jsonl by ``history`` (after a resume, the checkpoint's records win)."""
        write_text_atomic(self.path, "".join(to_json(r) + "\n" for r in history))

    def write(self, record: dict) -> None:
        """Append one evaluation ``record`` (has ``round``); its figures become scalars at step
        ``round``, tagged with the words of the console line and summary.md (``global test``,
        ``personalized``, ...: :func:`utils.report.record_scalars`)."""
        append_line(self.path, to_json(record))
        scalars = record_scalars(strict(record))
        with disk_guard(Path(self.tb.get_logdir()) / "events.out.tfevents", 100 * len(scalars)):
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, record["round"])
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["round"])

    def close(self) -> None:
        """Flush and close TensorBoard, and finish the W&B run."""
        self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
