"""The planner's numbers for every preset in configs/, as a Markdown table (for docs/BENCHMARKS.md).

    python benchmarks/plan_presets.py                          # steps: measured runs, else train.iterations
    python benchmarks/plan_presets.py --tokens-per-sec 12.04e6 # one assumed throughput for every preset
    python benchmarks/plan_presets.py --full                   # also each preset's whole `pgolf plan` table

Each row is `pgolf plan PRESET`: parameters, unique / effective depth, training FLOPs per token
(forward + backward), the steps the weights are drawn at, the estimated artifact bytes (model:
an estimate; code: exact) and whether the total fits 16,000,000 bytes. A preset that needs a
capability not built yet shows its refusal instead. 12.04e6 tokens/s is the official baseline's
measured speed on 8xH100 (13,780 steps of 524,288 tokens in 600 s).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pgolf.config import ConfigError
from pgolf.config.resolve import REPO_CONFIG_DIR, resolve_config
from pgolf.lab.plan import plan_config
from pgolf.lab.plan_cli import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-sec", type=float, default=None)
    parser.add_argument("--full", action="store_true", help="print each preset's whole plan table too")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, plans = [], []
    for path in sorted(Path(REPO_CONFIG_DIR).glob("*.toml")):
        start = time.perf_counter()
        try:
            cfg, _ = resolve_config(str(path), [], env={})
            plan = plan_config(cfg, tokens_per_sec=args.tokens_per_sec)
        except (ConfigError, ValueError, RuntimeError) as exc:
            rows.append(f"| {path.stem} | refused: {str(exc).splitlines()[-1].strip()} ||||||||")
            continue
        p, d, s = plan["params"], plan["depth"], plan["size"]
        rows.append(f"| {path.stem} | {p['total']:,} | {d['unique']} / {d['effective']} | "
                    f"{plan['flops']['per_token']['total'] / 1e6:.1f} M | {plan['time']['steps']:,} | "
                    f"{s['model_bytes']:,} | {s['code_bytes']:,} | {s['total_bytes']:,} "
                    f"{'fits' if s['fits'] else 'OVER'} | {time.perf_counter() - start:.1f} s |")
        plans.append((path.stem, plan))
    print("| preset | params | depth (unique / effective) | FLOPs / token (fwd + bwd) | steps | model bytes "
          "(estimate) | code bytes | total | planned in |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.full:
        for name, plan in plans:
            print(f"\n## {name}\n")
            render(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
