"""Mixed precision and memory format: seconds per round with fp32 / bf16 autocast x NCHW / channels_last.

    python benchmarks/precision.py --device cuda --config experiments/cv/config.yaml
"""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import benchmark_parser, machine, save
from benchmarks.vectorized import round_seconds

VARIANTS = {"fp32": [], "bf16": ["client_config.precision=bf16"], "fp32+channels_last": ["client_config.channels_last=true"],
            "bf16+channels_last": ["client_config.precision=bf16", "client_config.channels_last=true"]}


def main() -> None:
    parser = benchmark_parser(__doc__, "precision", "cuda", config="experiments/cv/config.yaml", repeats=3)
    args = parser.parse_args()
    seconds = {name: round_seconds(args.config, args.data, args.device, args.overrides + extra, args.repeats)[0]
               for name, extra in VARIANTS.items()}
    save({"benchmark": "precision", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": args.device,
          "config": args.config, "overrides": args.overrides, "sec_per_round": seconds,
          "speedup_vs_fp32": {k: seconds["fp32"] / v for k, v in seconds.items()}}, Path(args.out))


if __name__ == "__main__":
    main()
