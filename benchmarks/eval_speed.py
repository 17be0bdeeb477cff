"""Evaluation throughput and scores of one trained run: standard, sliding strides, score-first TTT.

Each mode runs through `pgolf eval`'s code path on the run's artifact (reloaded from disk) and
prints one JSON object per mode: val_bpb, scored tokens, wall seconds, tokens/s, the projection
for the full validation split, and whether its receipt passes the audit.

    python benchmarks/eval_speed.py runs/<id> --strides 256,64 --ttt --out eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from pgolf.config import config_from_dict
from pgolf.eval.run import EvalOptions, run_eval
from pgolf.eval.audit import audit_file
from pgolf.eval.ttt import TTTConfig
from pgolf.runs import RunDir, read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory with model.pgolf")
    parser.add_argument("--strides", default="", help="comma-separated sliding strides to measure")
    parser.add_argument("--ttt", action="store_true", help="also measure score-first TTT (default settings)")
    parser.add_argument("--ttt-stride", type=int, default=None,
                        help="stride used while scoring in TTT (default: the run's train.eval_stride)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    seq_len = config_from_dict(read_json(RunDir(Path(args.run)).config)["config"]).train.train_seq_len
    modes = [("standard", EvalOptions(stride=seq_len))]  # not the run's train.eval_stride, pgolf eval's default
    modes += [(f"sliding-{s}", EvalOptions(stride=int(s))) for s in args.strides.split(",") if s]
    if args.ttt:
        modes.append(("ttt", EvalOptions(stride=args.ttt_stride, ttt=TTTConfig())))
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
               "torch": torch.__version__, "platform": platform.platform(), "run": args.run, "modes": []}
    for name, opts in modes:
        opts.batch_windows, opts.device = args.batch, args.device
        r = run_eval(args.run, opts, log=lambda *_: None)
        audit = audit_file(r["receipt"])
        results["modes"].append({
            "mode": name, "val_bpb": round(r["val_bpb"], 6), "tokens": r["tokens"],
            "seconds": round(r["eval_seconds"], 2), "tokens_per_s": round(r["tokens"] / r["eval_seconds"]),
            "projected_full_seconds": round(r["projected_full_seconds"], 1), "audit": "ok",
            "updates": audit.updates,
        })
        print(json.dumps(results["modes"][-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
