"""Wall time and val_bpb of whole `pgolf train` runs on this machine's CPU.

Runs (1) the default smoke job (synthetic Markov corpus, `pgolf train`) and (2) a small model
on a FineWeb folder in the official layout, each as a fresh process, and prints one JSON
object per run: wall seconds (process start to exit, data generation and export included),
steps, train time, pre-quant and roundtrip val_bpb, artifact bytes.

    python benchmarks/cpu_pipeline.py --fineweb ../shared/data/fineweb_sp1024_sample --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINEWEB_SMALL = ["model.num_layers=4", "model.model_dim=128", "model.num_heads=4", "model.num_kv_heads=2",
                 "train.iterations=300", "train.warmdown_iters=100", "train.train_seq_len=256",
                 "train.train_batch_tokens=8192", "train.val_batch_size=32768", "train.val_loss_every=0",
                 "train.max_wallclock_seconds=0", "train.warmup_steps=0", "run.name=fineweb-small"]


def run(name: str, args: list[str], runs_dir: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pgolf", "train", *args, f"run.runs_dir={runs_dir}"], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "run": name, "command": "pgolf train " + " ".join(args), "wall_s": round(wall, 1),
        "steps": summary["steps"], "train_time_s": round(summary["train_time_ms"] / 1000, 1),
        "pre_quant_val_bpb": round(summary["pre_quant"]["val_bpb"], 4),
        "roundtrip_val_bpb": round(summary["roundtrip"]["val_bpb"], 4),
        "val_tokens": summary["val_tokens_scored"], "model_bytes": summary["size"]["model_bytes"],
        "total_bytes": summary["size"]["total_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fineweb", help="folder with fineweb_train_*.bin, fineweb_val_*.bin and a .model")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        # The smoke run generates its corpus under ./data when missing; that time is included.
        results["runs"].append(run("smoke", [], Path(tmp) / "smoke"))
        if args.fineweb:
            results["runs"].append(run("fineweb-small", ["--data", args.fineweb, *FINEWEB_SMALL],
                                       Path(tmp) / "fineweb"))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
