"""Evaluate a saved run again: global and personalized accuracy of a checkpoint, in one process.

    python evaluate.py -run runs/my_run --reload best
    python evaluate.py -run runs/my_run --reload last --set data_config.alpha=1.0 \\
                       --set personalization.new_client_epochs=2

Prints a table and writes OUT/RUN/eval_<reload>[_<overrides>].json (record, the metrics.jsonl record
of the same round when there is one) and a per-client CSV beside it. With ``--set data_config...``
(another partition) every client is new to the model: its personal layers are fine-tuned
``personalization.new_client_epochs`` epochs from the global model before it is evaluated.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.errors import UserError
from core.personalization import build_personalization
from utils.cli import OneLineParser, check_writable, make_folder
from utils.run_folder import CHECKPOINTS, RunFolder
from utils.experiment import Experiment
from utils.report import results_table, write_client_table
from utils.sweep import assignment_slug


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="evaluate.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-run", required=True, help="run folder OUT/<run name>")
    p.add_argument("--reload", default="best", help=f"checkpoint: {' or '.join(CHECKPOINTS)} (default best)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="change data_config.*, personalization.new_client_epochs, server_config.eval_batch_size, "
                        "device or seed for this evaluation, repeatable")
    p.add_argument("-task", default=None, help="task name or folder (default: the run's run.json)")
    p.add_argument("-dataPath", default=None, help="data folder (default: the one the run used, from run.json)")
    p.add_argument("-device", default=None, choices=["cpu", "cuda"], help="default: the config's device")
    p.add_argument("-out", default=None, help="result JSON (default OUT/RUN/eval_<reload>[_<overrides>].json)")
    return p


def output_path(folder: RunFolder, reload: str, overrides: list[str], out: str | None) -> Path:
    """Where the JSON goes: ``out``, else ``<run folder>/eval_<reload>[_<slug of the overrides>].json``."""
    if out:
        return Path(out)
    slug = assignment_slug([a.split("=", 1) for a in overrides])
    return folder.path / f"eval_{reload}{'_' + slug if slug else ''}.json"


def evaluate(args) -> dict:
    """Run the evaluation of ``args``; returns the JSON document that was written.

    Raises:
        UserError: any mistake of the user (run folder, checkpoint, override, data).
    """
    exp = Experiment(args.run, task=args.task, data_path=args.dataPath, overrides=args.overrides, device=args.device)
    path = output_path(exp.folder, args.reload, args.overrides, args.out)
    check_writable(path.parent, f"-out {path}")  # before the evaluation, creating nothing yet
    started = time.perf_counter()
    record, matrix, trained = exp.evaluate(args.reload)
    doc = {"run": str(exp.run_dir), "reload": args.reload,
           "checkpoint": str(exp.folder.checkpoint(args.reload)), "round": record["round"],
           "task": exp.task.name, "dataPath": exp.data_path, "overrides": args.overrides,
           "partition_changed": exp.partition_changed, "results": record,
           "recorded": None if exp.partition_changed else exp.recorded(record["round"]),
           "wall_s": time.perf_counter() - started, "note": _note(exp, record)}
    make_folder(path.parent, f"-out {path}")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    write_client_table(path.with_name(path.stem + "_clients.csv"), matrix, trained)
    return doc | {"path": str(path)}


def _note(exp, record: dict) -> str | None:
    """Why a personalizing run's evaluation has no personalized row, when that is so."""
    personalizes = build_personalization(exp.config.personalization).evaluates_personalized
    if exp.partition_changed and personalizes and not record.get("new_clients", {}).get("clients"):
        return ("the new partition makes every client a new one, so there is no personalized row; "
                "--set personalization.new_client_epochs=K (K > 0) fine-tunes and evaluates them")
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        doc = evaluate(args)
    except UserError as exc:
        print(f"pfedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{doc['run']}: checkpoint {args.reload} (round {doc['round']})"
          + (f", with {' '.join(doc['overrides'])}" if doc["overrides"] else "") + ", accuracy %:")
    print(results_table(doc["results"]))
    if doc["note"]:
        print(f"note: {doc['note']}")
    if doc["recorded"]:
        print(f"recorded by the run at round {doc['round']}: global test "
              f"{100 * doc['recorded']['global_test_acc']:.2f}%")
    print(f"Written to {doc['path']} and {Path(doc['path']).stem}_clients.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
