"""Compare finished pfedsim runs: one Markdown table (stdout and OUT/compare.md) and one plot.

    python compare.py runs/fedavg runs/fedper runs/fedrep -out runs/comparison
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import UserError
from utils.cli import OneLineParser, make_folder
from utils.compare import compare_plot, compare_table, load_run


def main(argv=None) -> int:
    parser = OneLineParser(prog="compare.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each holds metrics.jsonl)")
    parser.add_argument("-out", default="comparison", help="folder for compare.md and compare.png")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(Path(r)) for r in args.runs]
        out = make_folder(args.out, "-out")
    except UserError as exc:
        print(f"pfedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    table = compare_table(runs)
    (out / "compare.md").write_text(table + "\n")
    compare_plot(runs, out / "compare.png")
    print(table)
    print(f"Written to {out}: compare.md, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
