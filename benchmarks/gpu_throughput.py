"""Training throughput of pgolf, side by side with the official train_gpt.py on the same data.

Both run the same config for skip + steps optimizer steps after their untimed compile warmup
(train.warmup_steps / WARMUP_STEPS), logging every step; the first `skip` timed steps are
excluded too, so ms/step = (train_time[skip + steps] - train_time[skip]) / steps, read from
pgolf's metrics.jsonl and from the official script's `step:N/M ... train_time:Tms` lines.
Reported per side: ms/step, tokens/s, MFU, peak memory and val_bpb after the same steps.

MFU = FLOPs per token (pgolf.lab.plan.count_flops: forward + backward, dense attention) x tokens/s
over the device's matmul peak measured here (bf16 on CUDA, fp32 on CPU).
Peak memory: torch.cuda.max_memory_allocated of the process on CUDA (the official script
prints its own), peak RSS on CPU.

    python benchmarks/gpu_throughput.py --config baseline --data DIR --steps 100 \\
        --official ../parameter-golf/train_gpt.py --json-out bench.json
    python benchmarks/gpu_throughput.py --config smoke --steps 3 --skip 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from pgolf.config import OFFICIAL_ENV_VARS, Config
from pgolf.config.resolve import resolve_config

TRAIN_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:([-\d.naninf]+) train_time:(\d+)ms")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:([-\d.naninf]+) val_bpb:([-\d.naninf]+)")
PEAK_LINE = re.compile(r"^peak memory allocated: (\d+) MiB")


# --------------------------------------------------------------------------- measurements

def matmul_peak_flops(device: torch.device, size: int, seconds: float = 1.0) -> tuple[float, str]:
    """FLOP/s of back-to-back square matmuls: bf16 on CUDA, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            a @ b
        iters += 10
        sync()
        if time.perf_counter() - start >= seconds:
            break
    return 2 * size**3 * iters / (time.perf_counter() - start), str(dtype).removeprefix("torch.")


def flops_per_token(cfg: Config) -> float:
    from pgolf.lab.plan import build_initial_model, count_flops

    return count_flops(build_initial_model(cfg), cfg.train.train_seq_len)["total"]


def ms_per_step(times: dict[int, float], skip: int) -> tuple[float, int]:
    """(ms per step, steps timed) between step `skip` (0: the timed start) and the last step."""
    last = max(times)
    if last <= skip:
        raise RuntimeError(f"only {last} steps were logged; need more than --skip {skip}")
    start = times[skip] if skip else 0.0
    return (times[last] - start) / (last - skip), last - skip


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def side_result(ms: float, steps: int, cfg: Config, fpt: float, peak: float, memory: float | None,
                val_bpb: float | None) -> dict:
    tokens_per_s = cfg.train.train_batch_tokens * 1000.0 / ms
    return {"ms_per_step": round(ms, 3), "steps_timed": steps, "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(fpt * tokens_per_s / peak, 5), "peak_memory_mib": None if memory is None else round(memory, 1),
            "val_bpb": val_bpb}


# ----------------------------------------------------------------------------------- pgolf

def run_pgolf(cfg: Config, device: torch.device) -> tuple[dict[int, float], float | None]:
    from pgolf.runs import read_metrics
    from pgolf.train.run import run_training

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = run_training(cfg, console=False)
    if summary.get("status") not in ("done", "over_cap"):
        raise RuntimeError(f"pgolf run ended with status {summary.get('status')}: {summary}")
    run_dir = Path(cfg.run.runs_dir) / summary["run_id"]
    times = {e["step"]: e["train_time_ms"] for e in read_metrics(run_dir) if e.get("event") == "train"}
    return times, summary.get("pre_quant", {}).get("val_bpb")


# -------------------------------------------------------------------------------- official

def official_env(cfg: Config, run_id: str) -> dict[str, str]:
    """The official script's environment variables for the same config (same names, same units)."""
    env = {k: v for k, v in os.environ.items() if k not in OFFICIAL_ENV_VARS}
    for var, key in OFFICIAL_ENV_VARS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        env[var] = str(int(value)) if isinstance(value, bool) else str(value)
    for var in ("DATA_PATH", "TOKENIZER_PATH"):  # it runs in its own working directory
        env[var] = str(Path(env[var]).resolve())
    env["RUN_ID"] = run_id
    return env


def parse_official_log(text: str) -> tuple[dict[int, float], float | None, float | None]:
    """Train times per step, the last val_bpb and the peak memory (MiB) from its output."""
    times, val_bpb, peak = {}, None, None
    for line in text.splitlines():
        if m := TRAIN_LINE.match(line.strip()):
            times[int(m.group(1))] = float(m.group(4))
        elif m := VAL_LINE.match(line.strip()):
            val_bpb = float(m.group(4))
        elif m := PEAK_LINE.match(line.strip()):
            peak = float(m.group(1))
    return times, val_bpb, peak


def run_official(script: Path, cfg: Config, workdir: Path, timeout: float) -> tuple[dict[int, float], float | None,
                                                                                  float | None]:
    workdir.mkdir(parents=True, exist_ok=True)  # it writes logs/ and its model files into its cwd
    proc = subprocess.run([sys.executable, str(script.resolve())], cwd=workdir, env=official_env(cfg, "bench-official"),
                          capture_output=True, text=True, timeout=timeout)
    (workdir / "official_stdout.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"the official script failed (exit {proc.returncode}; it needs CUDA and official shards "
                         f"with their SentencePiece tokenizer: --data DIR); its last lines:\n{tail}")
    return parse_official_log(proc.stdout)


# ------------------------------------------------------------------------------------ main

def bench_config(args) -> Config:
    overrides = list(args.overrides)
    if args.data:
        from pgolf.cli import _data_dir_overrides

        overrides = _data_dir_overrides(Path(args.data), overrides) + overrides
    overrides += [f"train.iterations={args.skip + args.steps}", "train.train_log_every=1", "train.val_loss_every=0",
                  "train.max_wallclock_seconds=0", f"train.device={args.device}", f"run.runs_dir={args.runs_dir}",
                  f"run.run_id=bench-pgolf-{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if args.warmup is not None:
        overrides.append(f"train.warmup_steps={args.warmup}")
    cfg, _ = resolve_config(args.config, overrides, env={})
    return cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    parser.add_argument("--config", default="baseline", help="pgolf preset (default: baseline)")
    parser.add_argument("--data", help="folder of official shards and its tokenizer (as `pgolf train --data`)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per side")
    parser.add_argument("--skip", type=int, default=10, help="steps after warmup excluded from the timing")
    parser.add_argument("--warmup", type=int, default=None, help="untimed compile warmup steps (default: config)")
    parser.add_argument("--official", type=Path, help="path of the official train_gpt.py to run side by side")
    parser.add_argument("--official-timeout", type=float, default=3600.0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (8192 CUDA, 1024 CPU)")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="how long the matmul peak is measured")
    parser.add_argument("--runs-dir", default=None, help="where the pgolf run goes (default: a temporary folder)")
    parser.add_argument("--json-out", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pgolf-bench-") as tmp:
        args.runs_dir = args.runs_dir or str(Path(tmp) / "runs")
        cfg = bench_config(args)
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        peak, peak_dtype = matmul_peak_flops(device, args.peak_size or (8192 if device.type == "cuda" else 1024),
                                             args.peak_seconds)
        fpt = flops_per_token(cfg)
        times, val_bpb = run_pgolf(cfg, device)
        ms, steps = ms_per_step(times, args.skip)
        result = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"cpu x{torch.get_num_threads()}"),
            "torch": torch.__version__, "platform": platform.platform(), "config": args.config,
            "overrides": list(args.overrides), "data": cfg.data.data_path,
            "train_batch_tokens": cfg.train.train_batch_tokens,
            "steps": args.steps, "skip": args.skip, "warmup_steps": cfg.train.warmup_steps,
            "flops_per_token": fpt, "matmul_peak_flops": peak, "matmul_peak_dtype": peak_dtype,
            "pgolf": side_result(ms, steps, cfg, fpt, peak, peak_memory_mib(device), val_bpb),
            "official": None,
        }
        if args.official:
            o_times, o_bpb, o_peak = run_official(args.official, cfg, Path(tmp) / "official", args.official_timeout)
            o_ms, o_steps = ms_per_step(o_times, args.skip)
            result["official"] = side_result(o_ms, o_steps, cfg, fpt, peak, o_peak, o_bpb)
            result["speedup"] = round(o_ms / ms, 4)
    print_table(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['torch']}  config {result['config']}  "
          f"{result['steps']} steps timed after {result['warmup_steps']} warmup + {result['skip']} skipped")
    print(f"FLOPs/token {result['flops_per_token']:.4g}  matmul peak {result['matmul_peak_flops'] / 1e9:,.1f} "
          f"GFLOP/s ({result['matmul_peak_dtype']})")
    print(f"{'':10} {'ms/step':>10} {'tokens/s':>12} {'MFU':>7} {'peak MiB':>10} {'val_bpb':>8}")
    for side in ("pgolf", "official"):
        r = result.get(side)
        if r:
            memory = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
            bpb = "-" if r["val_bpb"] is None else f"{r['val_bpb']:.4f}"
            print(f"{side:10} {r['ms_per_step']:>10.2f} {r['tokens_per_s']:>12,.0f} {100 * r['mfu']:>6.1f}% "
                  f"{memory:>10} {bpb:>8}")
    if "speedup" in result:
        print(f"speedup (official ms/step / pgolf ms/step): {result['speedup']:.3f}x")


if __name__ == "__main__":
    main()
