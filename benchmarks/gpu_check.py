"""The GPU truth in one command: environment, every preset's smoke, the official train_gpt.py side
by side with the speed levers, evaluation throughput and the compression targets, within a time
budget, written to OUT/gpu_check.json and OUT/gpu_check.md (and a progress log, gpu_check.log).

    python3 benchmarks/gpu_check.py --out OUT          # on one GPU; the defaults: --budget-seconds 480
        # --data .carry/fineweb_sp1024_sample --official .carry/train_gpt.py
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check --data ../shared/data/fineweb_sp1024_sample

Stages, in order; each gets a share of what is left of the budget (WEIGHTS), and time a stage
leaves unused passes on to the later ones:

  env          device, driver / CUDA / torch versions, the bf16 matmul peak, the attention kernels:
               each SDPA backend timed on the presets' attention shapes, torch's varlen attention and
               the flash-attn packages, flex_attention
  presets      every preset of configs/ (baseline and the records first) at its full shape for
               warmup + skip + steps steps, compiled: finite losses, no recompilation after warmup,
               ms/step and tokens/s after the skipped steps, peak memory, time to the first step,
               then the run's own export and roundtrip evaluation on a validation prefix
  official     the official train_gpt.py (--official) beside pgolf's baseline on the same shards and
               config: ms/step, tokens/s, MFU, peak memory, val_bpb after the same steps and the
               ratio; then each speed lever (README, "Speed levers") against the defaults
  eval         standard, sliding (stride 64) and score-first TTT on a validation prefix of the
               baseline's artifact, each timed after an identical warm-up pass (compilation), projected
               to the full split on 8 GPUs against the 600 s evaluation budget
  compression  the baseline trained for --train-seconds (less when the time left is short; warmdown
               over its last 30%), exported with int8, int6, int6 + GPTQ, int5 and mixed bits:
               bytes per parameter and val_bpb change (benchmarks/compression_bpb.py's measurement)

Every measurement is a unit run by a worker process of its own (this script with --worker), so a
CUDA fault or a hung compile ends that unit only: it is killed at its stage's deadline and what
it wrote so far is kept. A stage or unit that cannot start in the time left is skipped with the
reason, one that breaks is recorded as failed with its error, and both files are rewritten after
every unit, so a partial or killed check still leaves its data. Nothing here needs zstandard or
brotli. --dry-run runs the same plan on CPU with tiny shapes, compile off and a small budget
(tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
for _path in (str(ROOT), str(SCRIPT.parent)):  # pgolf without installing it, and the sibling benchmarks
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_throughput import ms_per_step, official_env, parse_official_log  # noqa: E402
from pgolf.config import Config  # noqa: E402
from pgolf.config.resolve import REPO_CONFIG_DIR, data_dir_overrides, resolve_config  # noqa: E402
from pgolf.rules import EVAL_TIME_LIMIT_S  # noqa: E402
from pgolf.runs import RunDir, read_metrics  # noqa: E402

STAGES = ("env", "presets", "official", "eval", "compression")
TITLES = {"env": "1. Environment", "presets": "2. Preset smokes", "official": "3. Side by side with the official "
          "train_gpt.py, and the speed levers", "eval": "4. Evaluation throughput", "compression": "5. Compression "
          "targets"}
# Each stage's share of the budget left when it starts (over the stages still to run).
# On one GPU each training unit's cost is mostly its start and compilation (about a minute), so
# the shares favour one of each over many: the check is re-run with --stages / --presets for more.
WEIGHTS = {"env": 0.06, "presets": 0.30, "official": 0.22, "eval": 0.12, "compression": 0.30}
# The presets run first, in this order; the others of configs/ follow alphabetically.
FIRST_PRESETS = ("baseline", "pr549", "seed_recurrence_swiglu", "seed_recurrence_swiglu_baseline", "seed_swiglu_576x7")
# Scored targets of the official fineweb10B_sp1024 validation split at seq_len 1024 (the official
# log's `val_loader:... tokens:62021632`); evaluation time is projected to it.
FULL_VAL_TARGETS = 62_021_632
TRACK_GPUS = 8
LEVER_TOLERANCE = 0.02  # a lever closer than this to the default's ms/step makes no difference
DEFAULT_DATA = Path(".carry") / "fineweb_sp1024_sample"
DEFAULT_OFFICIAL = Path(".carry") / "train_gpt.py"
OFFICIAL_ROUNDTRIP = re.compile(r"^final_int8_zlib_roundtrip_exact val_loss:([-\d.naninf]+) val_bpb:([-\d.naninf]+)")


@dataclass(frozen=True)
class Lever:
    overrides: tuple[str, ...]  # the variant run, against the defaults
    variant_is_on: bool  # the variant switches the lever on (its default is off)
    what: str
    min_gpus: int = 1


LEVERS = {
    "fused_loss": Lever(("train.fused_loss=on",), True, "train.fused_loss=on against the default off"),
    "compile": Lever(("train.compile=off",), False, "train.compile on (the default on CUDA) against off"),
    "batched_ns": Lever(("optim.batched_ns=off",), False, "optim.batched_ns auto (on) against off"),
    "prefetch": Lever(("data.prefetch=off",), False, "data.prefetch auto (on) against off"),
    "sdpa_flash": Lever(("train.sdpa_backend=flash",), False, "train.sdpa_backend auto (fastest timed) against flash"),
    "sdpa_cudnn": Lever(("train.sdpa_backend=cudnn",), False, "train.sdpa_backend auto against cudnn"),
    "parallel_muon": Lever(("optim.parallel_muon=on",), True, "optim.parallel_muon=on against off", min_gpus=2),
}
# Scheme key -> its row in benchmarks/compression_bpb.py's SCHEMES.
SCHEMES = {"int8": "int8 (official)", "int6": "int6", "int6_gptq": "int6 + GPTQ", "int5": "int5",
           "mixed": "attn int6 / mlp int5 + GPTQ"}


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the GPU plan or the dry run's tiny one."""
    device: str
    compile: str
    warmup: int  # untimed compile warm-up steps
    skip: int  # timed steps left out of ms/step
    steps: int  # timed steps measured
    val_tokens: int  # validation prefix of the training runs' roundtrip
    reference_val_tokens: int  # and of pgolf's side beside the official script (0: the whole split, as it scores)
    eval_tokens: int  # validation prefix of standard and sliding evaluation
    ttt_tokens: int  # and of TTT
    ttt: dict  # TTTConfig fields (empty: the defaults, #549's)
    eval_batch: int  # windows per evaluation batch
    score_batch_tokens: int  # evaluation batch of the compression stage
    train_seconds: float  # compression stage: training wall-clock
    min_train_seconds: float
    peak_size: int  # matmul peak: square size and seconds
    peak_seconds: float
    unit_floor_s: float  # the least time a unit is started with
    first_guess_s: float  # a unit's cost before one of its kind has run
    threads: int  # torch threads of each worker (0: torch's default)
    shape: tuple[str, ...] = ()  # overrides every training run gets (the dry run's tiny shapes)
    # and the compression stage's run after them (the dry run: matrices above the 65,536-element
    # float passthrough, so the schemes quantize something)
    compression_shape: tuple[str, ...] = ()


GPU_SIZES = Sizes(device="cuda", compile="on", warmup=3, skip=2, steps=10, val_tokens=524_288, reference_val_tokens=0,
                  eval_tokens=262_144, ttt_tokens=131_072, ttt={}, eval_batch=64, score_batch_tokens=262_144,
                  train_seconds=120.0, min_train_seconds=20.0, peak_size=8192, peak_seconds=1.0,
                  unit_floor_s=15.0, first_guess_s=45.0, threads=0)
DRY_SIZES = Sizes(device="cpu", compile="off", warmup=1, skip=1, steps=2, val_tokens=2048, reference_val_tokens=2048,
                  eval_tokens=2048, ttt_tokens=2048, ttt={"chunk_tokens": 1024, "batch_seqs": 4, "epochs": 1},
                  eval_batch=16, score_batch_tokens=4096, train_seconds=2.0, min_train_seconds=0.5, peak_size=256,
                  peak_seconds=0.1, unit_floor_s=0.5, first_guess_s=1.0, threads=1,
                  shape=("train.train_seq_len=128", "train.train_batch_tokens=1024", "train.val_batch_size=8192",
                         "export.gptq_seqs=4", "run.threads=1"),
                  compression_shape=("model.num_layers=2", "model.model_dim=128", "model.mlp_mult=6"))


def tiny_model_overrides(cfg: Config) -> list[str]:
    """The dry run's model: the preset's depth and techniques at width 32, each add-on's width cut too."""
    m = cfg.model
    out = ["model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1"]
    if m.mlp_hidden:
        out.append("model.mlp_hidden=64")
    if "bigram" in m.embed:
        out += ["model.bigram_dim=16", "model.bigram_buckets=64"]
    if "value_embed" in m.stream:
        out.append("model.ve_dim=16")
    if m.rope_dims:
        out.append("model.rope_dims=8")
    return out


# ----------------------------------------------------------------------------------- time

class Budget:
    """The whole check's seconds, and each stage's share of what is left."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return max(self.seconds - self.elapsed(), 0.0)

    def allot(self, stage: str, still_to_run: list[str]) -> float:
        return self.left() * WEIGHTS[stage] / sum(WEIGHTS[s] for s in still_to_run)


@dataclass
class Stage:
    key: str
    budget: Budget
    allotted: float
    deadline: float = 0.0  # budget-elapsed seconds
    units: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    reason: str | None = None  # why the stage did not run (or failed) as a whole
    failed: bool = False
    seconds: float = 0.0

    def __post_init__(self):
        self.deadline = self.budget.elapsed() + self.allotted

    def left(self) -> float:
        return max(min(self.deadline - self.budget.elapsed(), self.budget.left()), 0.0)

    def unit(self, name: str) -> dict | None:
        return next((u for u in self.units if u["name"] == name), None)

    def status(self) -> tuple[str, str | None]:
        if self.failed:
            return "failed", self.reason
        states = [u["status"] for u in self.units]
        if "ran" in states:
            return "ran", None
        if "failed" in states:
            return "failed", next(u["reason"] for u in self.units if u["status"] == "failed")
        if self.reason or not self.units:
            return "skipped", self.reason or "nothing to run"
        return "skipped", self.units[0]["reason"]

    def to_dict(self) -> dict:
        status, reason = self.status()
        counts = {s: sum(u["status"] == s for u in self.units) for s in ("ran", "failed", "skipped")}
        return {"title": TITLES[self.key], "status": status, "reason": reason, "seconds": round(self.seconds, 1),
                "allotted_s": round(self.allotted, 1), "units_count": counts, "summary": self.summary,
                "units": self.units}


def secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def skipped(name: str, reason: str, **fields) -> dict:
    return {"name": name, "status": "skipped", "reason": reason, "seconds": 0.0, **fields}


# ------------------------------------------------------------------------------ processes

def run_process(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run cmd in a session of its own, output to log; kill its whole process group at the
    timeout (or if this process is stopped). Returns (exit status or None when killed, seconds)."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 0.1)), time.perf_counter() - start
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start
        finally:
            if proc.poll() is None:
                _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def log_tail(path: Path, lines: int = 15) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]


def read_json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def error_text(exc: BaseException, limit: int = 300) -> str:
    """The exception's type and first line, cut to `limit` characters."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -------------------------------------------------------------------------------- the check

class Check:
    """One run of the check: the plan, the budget, the units' records and the two files."""

    def __init__(self, args, sizes: Sizes, budget: Budget, argv: list[str]):
        self.args, self.sizes, self.budget = args, sizes, budget
        self.out, self.work = Path(args.out), Path(args.work)
        self.estimates: dict[str, float] = {}  # unit kind -> seconds the last one took
        self.stages: dict[str, Stage] = {}
        self.cuda_missing: str | None = None
        self.selected_presets, self.selected_levers, self.selected_schemes = args.presets, args.levers, args.schemes
        self.data_overrides, self.data_problem = self._data()
        self.report = {"schema": 1, "mode": "dry-run" if args.dry_run else "gpu",
                       "command": "python benchmarks/gpu_check.py " + shlex.join(argv),
                       "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                       "budget_s": budget.seconds, "data": self.data_dir and str(self.data_dir),
                       "official": str(args.official) if args.official else None, "checkout": checkout_state(),
                       "sizes": {k: v for k, v in vars(sizes).items()}, "stages": {}}

    # --- inputs -----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path | None:
        return Path(self.args.data).resolve() if self.args.data else None

    def _data(self) -> tuple[list[str], str | None]:
        data = self.data_dir
        hint = ("pass --data DIR: official shards (fineweb_train_*.bin, fineweb_val_*.bin) and their SentencePiece "
                ".model, carried to the GPU machine as a git-ignored folder such as .carry/fineweb_sp1024_sample")
        if data is None or not data.is_dir():
            return [], f"no data: {data or '--data'} is not a folder; {hint}"
        missing = [p for p in ("fineweb_train_*.bin", "fineweb_val_*.bin") if not any(data.glob(p))]
        if missing:
            return [], f"no usable data in {data}: no {' or '.join(missing)}; {hint}"
        try:
            return data_dir_overrides(data, []), None
        except Exception as exc:  # no tokenizer, or one that does not load
            return [], f"no usable data in {data}: {error_text(exc)}; {hint}"

    @property
    def matmul_peak(self) -> float | None:
        """FLOP/s the environment stage measured (None before it ran)."""
        env = self.stages.get("env")
        return env.summary.get("matmul_peak", {}).get("flops") if env else None

    def say(self, message: str) -> None:
        line = f"[{self.budget.elapsed():6.1f}s] {message}"
        print(line, flush=True)
        with open(self.out / "gpu_check.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # --- configs ----------------------------------------------------------------------------
    def train_config(self, preset: str, run_id: str, runs_dir: Path, *extra: str, val_tokens: int | None = None,
                     iterations: int | None = None) -> tuple[list[str], Config]:
        """The overrides (and resolved config) of a training unit: the preset on the check's data
        at the plan's sizes, logging every step, extra last."""
        s = self.sizes
        base, _ = resolve_config(preset, self.data_overrides, env={})
        # A CaseOps preset (pr1855) on the check's plain shards (no byte sidecars): smoked without CaseOps.
        plain = base.data.caseops and not any(Path(base.data.data_path).glob("fineweb_val_bytes_*.bin"))
        overrides = [*self.data_overrides, *(["data.caseops=false"] if plain else []),
                     *(tiny_model_overrides(base) if self.args.dry_run else []), *s.shape,
                     f"train.device={s.device}", f"train.compile={s.compile}", f"train.warmup_steps={s.warmup}",
                     f"train.iterations={iterations if iterations is not None else s.skip + s.steps}",
                     "train.train_log_every=1", "train.val_loss_every=0", "train.max_wallclock_seconds=0",
                     "train.progress_every_seconds=0", "train.checkpoint_every=0",
                     f"train.val_max_tokens={s.val_tokens if val_tokens is None else val_tokens}",
                     f"run.runs_dir={runs_dir}", f"run.run_id={run_id}", *extra]
        cfg, _ = resolve_config(preset, overrides, env={})
        return overrides, cfg

    # --- units ------------------------------------------------------------------------------
    def attempt(self, stage: Stage, name: str, kind: str, run: Callable[[float], dict],
                estimate: float | None = None) -> dict:
        """Run one unit if the stage has the time it is expected to take; record and save it."""
        guess = self.estimates.get(kind)
        need = estimate if estimate is not None else (guess if guess is not None else self.sizes.first_guess_s)
        left = stage.left()
        if left < max(need, self.sizes.unit_floor_s):
            how = "as the last one of its kind took" if guess is not None and estimate is None else "estimated"
            record = skipped(name, f"time: needs ~{secs(need)} ({how}), {secs(left)} left of the stage's "
                                   f"{secs(stage.allotted)}")
        else:
            self.say(f"{stage.key}: {name} ({secs(left)} left in the stage)")
            try:
                record = run(left)
            except Exception as exc:  # a bug or a refused config: the unit failed, the check goes on
                record = {"name": name, "status": "failed", "reason": error_text(exc), "seconds": 0.0,
                          "traceback": traceback.format_exc().splitlines()[-8:]}
            record = {"name": name, "kind": kind, **record}
            self.estimates[kind] = max(record.get("seconds", 0.0), self.sizes.unit_floor_s)
        record.setdefault("kind", kind)
        stage.units.append(record)
        reason = f": {record['reason']}" if record.get("reason") else ""
        self.say(f"{stage.key}: {name} {record['status']}{reason}")
        self.save()
        return record

    def worker(self, name: str, kind: str, spec: dict, timeout: float) -> dict:
        """Run a worker unit (this script with --worker) in its own folder; its record."""
        unit_dir = self.work / slug(name)
        unit_dir.mkdir(parents=True, exist_ok=True)
        spec = {**spec, "kind": kind, "dry_run": self.args.dry_run, "threads": self.sizes.threads,
                "device": self.sizes.device, "deadline": time.time() + timeout - 1.0}
        write_atomic(unit_dir / "spec.json", json.dumps(spec, indent=2))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.sizes.threads:
            env["OMP_NUM_THREADS"] = str(self.sizes.threads)
        rc, seconds = run_process([sys.executable, str(SCRIPT), "--worker", str(unit_dir)], unit_dir, env, timeout,
                                  unit_dir / "worker.log")
        result = read_json_file(unit_dir / "result.json")
        record = {"name": name, "seconds": round(seconds, 1), "result": result}
        if rc is None:
            record.update(status="failed", reason=f"timed out: killed after {secs(seconds)} at the stage's deadline "
                                                  f"(what it wrote is kept)")
        elif result.get("error") or rc != 0:
            tail = log_tail(unit_dir / "worker.log", 1)
            record.update(status="failed", reason=result.get("error") or f"exit {rc}: {' '.join(tail)[:300]}")
        else:
            record.update(status="ran", reason=None)
        if record["status"] == "failed":
            record["log_tail"] = log_tail(unit_dir / "worker.log")
        return record

    def train_unit(self, stage: Stage, name: str, preset: str, *extra: str, train_only: bool = False,
                   val_tokens: int | None = None, iterations: int | None = None,
                   estimate: float | None = None) -> dict:
        """A training unit (run_training in a worker); its record holds read_train_run's numbers."""
        def run(timeout: float) -> dict:
            run_id = slug(name)
            runs_dir = self.work / run_id / "runs"
            overrides, cfg = self.train_config(preset, run_id, runs_dir, *extra, val_tokens=val_tokens,
                                               iterations=iterations)
            started = time.time()
            record = self.worker(name, "train", {"preset": preset, "overrides": overrides, "train_only": train_only},
                                 timeout)
            worker = record.pop("result")
            train = read_train_run(runs_dir / run_id, cfg, self.sizes.skip, started, train_only)
            for key in ("peak_memory_mib", "flops_per_token"):
                train[key] = worker.get(key)
            record["result"] = train
            if worker.get("traceback"):
                record["traceback"] = worker["traceback"]
            if record["status"] == "ran" and train["problems"]:
                # the checks found this: a run that did not end as it should failed; else it ran
                expected = ("interrupted",) if train_only else ("done", "over_cap")
                record.update(status="ran" if train["status"] in expected else "failed",
                              reason="; ".join(train["problems"]))
            return record

        return self.attempt(stage, name, "train", run, estimate)

    # --- files ------------------------------------------------------------------------------
    def save(self) -> None:
        self.report["stages"] = {key: stage.to_dict() for key, stage in self.stages.items()}
        self.report["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        write_atomic(self.out / "gpu_check.json", json.dumps(self.report, indent=2, default=str) + "\n")
        write_atomic(self.out / "gpu_check.md", render_markdown(self.report))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unit"


def checkout_state() -> dict:
    """The checkout's commit and how many files differ from it (None where git is not there)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "changed_files": None if changed is None else len(changed.splitlines())}


# ------------------------------------------------------------------------- training records

def read_train_run(run_dir: Path, cfg: Config, skip: int, started: float, train_only: bool = False) -> dict:
    """A training unit's numbers from its run directory (metrics.jsonl, train.log, summary.json),
    also when the worker was killed part way."""
    events = read_metrics(run_dir)
    train = [e for e in events if e.get("event") == "train"]
    losses = [e["train_loss"] for e in train]
    summary = RunDir(run_dir).read_summary() if RunDir(run_dir).summary.exists() else {}
    log = RunDir(run_dir).log.read_text(encoding="utf-8") if RunDir(run_dir).log.exists() else ""
    size, pre, rt = summary.get("size", {}), summary.get("pre_quant", {}), summary.get("roundtrip", {})
    r = {"run_dir": str(run_dir), "status": summary.get("status"), "stop_reason": summary.get("stop_reason"),
         "steps": max((e["step"] for e in train), default=0), "iterations": cfg.train.iterations,
         "finite_losses": all(math.isfinite(x) for x in losses) if losses else None,
         "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
         "recompiles": sum(e.get("graphs", 0) for e in events if e.get("event") == "recompile"),
         "startup_s": round(train[0]["time"] - started, 1) if train else None,
         "compiled": _log_value(log, r"compile: (\w+)"), "sdpa_backend": _log_value(log, r"^sdpa_backend: (\w+)"),
         "model_params": _int(_log_value(log, r"^model_params: ([\d,]+)")),
         "train_time_s": round(summary["train_time_ms"] / 1000, 1) if "train_time_ms" in summary else None,
         "batch_tokens": cfg.train.train_batch_tokens, "seq_len": cfg.train.train_seq_len,
         "pre_quant_bpb": pre.get("val_bpb"), "roundtrip_bpb": rt.get("val_bpb"),
         "roundtrip_stride": summary.get("roundtrip_stride"), "total_bytes": size.get("total_bytes"),
         "fits": size.get("fits"), "val_tokens_scored": summary.get("val_tokens_scored"),
         "val_tokens_total": summary.get("val_tokens_total")}
    times = {e["step"]: e["train_time_ms"] for e in train}
    if times and max(times) > skip:
        ms, timed = ms_per_step(times, skip)
        r.update(ms_per_step=round(ms, 3), steps_timed=timed,
                 tokens_per_s=round(cfg.train.train_batch_tokens * 1000 / ms, 1))
    r["problems"] = train_problems(r, train_only)
    return r


def _log_value(log: str, pattern: str) -> str | None:
    m = re.search(pattern, log, re.M)
    return m.group(1) if m else None


def _int(text: str | None) -> int | None:
    return int(text.replace(",", "")) if text else None


def train_problems(r: dict, train_only: bool) -> list[str]:
    """What a training unit's checks found: a loss not finite, a recompilation after warmup, a
    run that stopped early or ended otherwise than done."""
    problems = []
    if r["finite_losses"] is False:
        problems.append("non-finite training loss")
    if r["recompiles"]:
        problems.append(f"{r['recompiles']} graph(s) recompiled after warmup")
    expected = ("interrupted",) if train_only else ("done", "over_cap")
    if r["status"] not in expected:
        problems.append(f"run status {r['status'] or 'unknown'} ({r['stop_reason'] or 'no summary'})")
    elif r["steps"] < r["iterations"] and r["stop_reason"] != "wallclock_cap":
        problems.append(f"stopped at step {r['steps']} of {r['iterations']}")
    return problems


# ---------------------------------------------------------------------------------- stages

def stage_env(check: Check, stage: Stage) -> None:
    presets = check.selected_presets
    shapes = []
    if not check.data_problem:
        for preset in presets:
            try:
                _, cfg = check.train_config(preset, "shape", check.work / "unused")
            except Exception:  # a preset that does not resolve fails in its own smoke, with the reason
                continue
            shapes.append({"presets": [preset], **attention_shape_dict(cfg)})
    record = check.attempt(stage, "environment", "env", lambda timeout: check.worker(
        "environment", "env", {"shapes": merge_shapes(shapes), "peak_size": check.sizes.peak_size,
                               "peak_seconds": check.sizes.peak_seconds}, timeout), estimate=check.sizes.unit_floor_s)
    env = record.get("result", {})
    stage.summary = env
    if not check.args.dry_run and env.get("versions", {}).get("cuda_available") is False:
        check.cuda_missing = ("no CUDA device: torch.cuda.is_available() is False in the environment stage "
                              "(run --dry-run for the CPU plan)")


def attention_shape_dict(cfg: Config) -> dict:
    from pgolf.rules import MICRO_BATCHES

    m = cfg.model
    return {"batch": max(cfg.train.train_batch_tokens // (MICRO_BATCHES * cfg.train.train_seq_len), 1),
            "heads": m.num_heads, "kv_heads": m.num_kv_heads, "seq_len": cfg.train.train_seq_len,
            "head_dim": m.model_dim // m.num_heads}


def merge_shapes(shapes: list[dict]) -> list[dict]:
    """One entry per distinct attention shape, naming the presets that share it."""
    merged: dict[tuple, dict] = {}
    for s in shapes:
        key = (s["batch"], s["heads"], s["kv_heads"], s["seq_len"], s["head_dim"])
        merged.setdefault(key, {**s, "presets": []})["presets"] += s["presets"]
    return list(merged.values())


def stage_presets(check: Check, stage: Stage) -> None:
    for preset in check.selected_presets:
        check.train_unit(stage, preset, preset)


def reference_run(check: Check, stage: Stage) -> dict:
    """pgolf's baseline at the plan's sizes, scored on the validation tokens the official script
    scores (on the GPU: the whole split): the preset smoke if it scored those, else run now."""
    want = check.sizes.reference_val_tokens
    smoke = check.stages.get("presets") and check.stages["presets"].unit("baseline")
    if smoke and smoke["status"] == "ran" and smoke["result"].get("status") in ("done", "over_cap"):
        r = smoke["result"]
        if r.get("val_tokens_scored") == (r.get("val_tokens_total") if want == 0 else
                                          min(want // r["seq_len"] * r["seq_len"], r.get("val_tokens_total") or 0)):
            record = {**smoke, "name": "pgolf baseline", "reused": "the baseline preset smoke (same config and steps)"}
            stage.units.append(record)
            return record
    return check.train_unit(stage, "pgolf baseline", "baseline", val_tokens=want)


def stage_official(check: Check, stage: Stage) -> None:
    ref = reference_run(check, stage)
    official = check.args.official
    if official is None:
        stage.units.append(skipped("official train_gpt.py", "no --official PATH given"))
    elif not Path(official).is_file():
        stage.units.append(skipped("official train_gpt.py", f"not found: {official} (carry a copy of "
                                   "openai/parameter-golf's train_gpt.py, e.g. as .carry/train_gpt.py)"))
    else:
        check.attempt(stage, "official train_gpt.py", "official", lambda timeout: run_official_unit(check, timeout))
    stage.summary["comparison"] = compare_sides(stage, check.matmul_peak)
    for key in check.selected_levers:
        lever = LEVERS[key]
        name = f"lever {key}"
        if lever.min_gpus > 1:
            stage.units.append(skipped(name, f"needs {lever.min_gpus}+ GPUs (one process here); time `pgolf train "
                                             f"--nproc 8` with {lever.overrides[0]} and without"))
        elif ref["status"] != "ran" or not ref["result"].get("ms_per_step"):
            stage.units.append(skipped(name, "no pgolf baseline ms/step to compare with"))
        else:
            check.train_unit(stage, name, "baseline", *lever.overrides, train_only=True)
    stage.summary["levers"] = lever_rows(stage, ref)
    check.save()


def run_official_unit(check: Check, timeout: float) -> dict:
    """The official script on the same shards and config (its environment variables), one GPU."""
    run_id = "official"
    workdir = check.work / run_id
    _, cfg = check.train_config("baseline", run_id, workdir / "unused", val_tokens=check.sizes.reference_val_tokens)
    log = workdir / "official_stdout.txt"
    rc, seconds = run_process([sys.executable, str(Path(check.args.official).resolve())], workdir,
                              official_env(cfg, run_id), timeout, log)
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    times, val_bpb, peak = parse_official_log(text)
    roundtrip = next((float(m.group(2)) for line in reversed(text.splitlines())
                      if (m := OFFICIAL_ROUNDTRIP.match(line.strip()))), None)
    result = {"steps": max(times, default=0), "val_bpb": val_bpb, "roundtrip_bpb": roundtrip,
              "peak_memory_mib": peak, "batch_tokens": cfg.train.train_batch_tokens}
    if times and max(times) > check.sizes.skip:
        ms, timed = ms_per_step(times, check.sizes.skip)
        result.update(ms_per_step=round(ms, 3), steps_timed=timed,
                      tokens_per_s=round(cfg.train.train_batch_tokens * 1000 / ms, 1))
    record = {"seconds": round(seconds, 1), "result": result, "status": "ran", "reason": None}
    if rc is None:
        record.update(status="failed", reason=f"timed out: killed after {secs(seconds)} at the stage's deadline")
    elif rc != 0:
        record.update(status="failed", reason=f"exit {rc}: {' '.join(log_tail(log, 1))[:300]}")
    if record["status"] == "failed":
        record["log_tail"] = log_tail(log)
    return record


def compare_sides(stage: Stage, peak_flops: float | None) -> dict:
    """ms/step, tokens/s, MFU, memory and val_bpb of both sides; the ratio of their speeds."""
    ref, off = stage.unit("pgolf baseline"), stage.unit("official train_gpt.py")
    sides = {}
    for side, rec in (("pgolf", ref), ("official", off)):
        r = (rec or {}).get("result", {})
        fpt = (ref or {}).get("result", {}).get("flops_per_token")
        mfu = fpt * r["tokens_per_s"] / peak_flops if fpt and peak_flops and r.get("tokens_per_s") else None
        sides[side] = {"status": (rec or {}).get("status"), "ms_per_step": r.get("ms_per_step"),
                       "tokens_per_s": r.get("tokens_per_s"), "mfu": None if mfu is None else round(mfu, 4),
                       "peak_memory_mib": r.get("peak_memory_mib"), "val_bpb": r.get("pre_quant_bpb", r.get("val_bpb")),
                       "roundtrip_bpb": r.get("roundtrip_bpb")}
    p, o = sides["pgolf"], sides["official"]
    out = {"sides": sides}
    if p["ms_per_step"] and o["ms_per_step"]:
        out["speedup"] = round(o["ms_per_step"] / p["ms_per_step"], 4)  # > 1: pgolf is faster
    if p["val_bpb"] is not None and o["val_bpb"] is not None:
        out["delta_bpb"] = round(p["val_bpb"] - o["val_bpb"], 5)
    return out


def lever_rows(stage: Stage, ref: dict) -> list[dict]:
    """Each lever's ms/step and peak memory switched on and off, and whether it pays."""
    rows = []
    base = ref.get("result", {}) if ref["status"] == "ran" else {}
    for key, lever in LEVERS.items():
        rec = stage.unit(f"lever {key}")
        if rec is None:
            continue
        row = {"lever": key, "what": lever.what, "status": rec["status"], "reason": rec.get("reason")}
        var = rec.get("result", {})
        if rec["status"] == "ran" and var.get("ms_per_step") and base.get("ms_per_step"):
            on, off = (var, base) if lever.variant_is_on else (base, var)
            speedup = off["ms_per_step"] / on["ms_per_step"]
            row.update(ms_on=on["ms_per_step"], ms_off=off["ms_per_step"], speedup=round(speedup, 4),
                       memory_on=on.get("peak_memory_mib"), memory_off=off.get("peak_memory_mib"),
                       verdict=lever_verdict(speedup))
        rows.append(row)
    return rows


def lever_verdict(speedup: float) -> str:
    if speedup > 1 + LEVER_TOLERANCE:
        return "pays: keep it on"
    if speedup < 1 - LEVER_TOLERANCE:
        return "costs: switch it off"
    return f"no difference (within {LEVER_TOLERANCE:.0%})"


def stage_eval(check: Check, stage: Stage) -> None:
    ref = None
    for key, name in (("presets", "baseline"), ("official", "pgolf baseline")):
        rec = check.stages.get(key) and check.stages[key].unit(name)
        if rec and rec["status"] == "ran" and rec["result"].get("status") in ("done", "over_cap"):
            ref = rec
            break
    if ref is None:
        ref = check.train_unit(stage, "baseline for evaluation", "baseline")
        if ref["status"] != "ran" or ref["result"].get("status") not in ("done", "over_cap"):
            stage.reason = f"no baseline artifact to evaluate ({ref['name']}: {ref['status']})"
            return
    s = check.sizes
    stride = min(64, ref["result"]["seq_len"])
    modes = [{"name": "standard", "stride": None, "tokens": s.eval_tokens, "ttt": None},
             {"name": f"sliding stride {stride}", "stride": stride, "tokens": s.eval_tokens, "ttt": None},
             {"name": f"TTT (stride {stride})", "stride": stride, "tokens": s.ttt_tokens, "ttt": s.ttt}]
    stage.summary["target"] = ref["result"]["run_dir"]
    record = check.attempt(stage, "evaluation", "eval", lambda timeout: check.worker(
        "evaluation", "eval", {"run": ref["result"]["run_dir"], "modes": modes, "batch": s.eval_batch}, timeout))
    stage.summary["rows"] = record.get("result", {}).get("rows", [])


def stage_compression(check: Check, stage: Stage) -> None:
    s = check.sizes
    export_guess = check.estimates.get("export", s.first_guess_s)
    # Half of what the schemes leave trains; the other half is the run's start, compilation,
    # validation, export and roundtrip.
    train_s = min(check.args.train_seconds or s.train_seconds, (stage.left() - export_guess) / 2)
    if train_s < s.min_train_seconds:
        stage.reason = (f"time: {secs(stage.left())} left; training needs at least {secs(s.min_train_seconds)} and "
                        f"as much again to start, compile and export, and the schemes ~{secs(export_guess)}")
        return
    stage.summary["train_seconds"] = round(train_s, 1)
    trained = check.train_unit(stage, "trained baseline", "baseline", *s.compression_shape,
                               f"train.max_wallclock_seconds={train_s:.1f}", "train.warmdown_frac=0.3",
                               iterations=1_000_000, estimate=2 * train_s)
    if trained["status"] != "ran" or trained["result"].get("status") not in ("done", "over_cap"):
        stage.reason = f"no trained baseline ({trained['status']}: {trained.get('reason')})"
        return
    schemes = [SCHEMES[k] for k in check.selected_schemes]
    record = check.attempt(stage, "export schemes", "export", lambda timeout: check.worker(
        "export schemes", "export", {"run": trained["result"]["run_dir"], "schemes": schemes,
                                     "compressor": check.args.compressor, "val_tokens": s.val_tokens,
                                     "batch_tokens": s.score_batch_tokens}, timeout))
    stage.summary.update({k: v for k, v in record.get("result", {}).items() if k != "error"})


STAGE_FUNCTIONS = {"env": stage_env, "presets": stage_presets, "official": stage_official, "eval": stage_eval,
                   "compression": stage_compression}
NEEDS_DATA = ("presets", "official", "eval", "compression")


def run_stages(check: Check) -> None:
    order = [s for s in STAGES]
    for i, key in enumerate(order):
        stage = Stage(key, check.budget, check.budget.allot(key, order[i:]))
        check.stages[key] = stage
        start = check.budget.elapsed()
        if key not in check.args.stages:
            stage.reason = "not selected (--stages)"
        elif key in NEEDS_DATA and check.data_problem:
            stage.reason = check.data_problem
        elif key != "env" and check.cuda_missing:
            stage.reason = check.cuda_missing
        elif stage.allotted < check.sizes.unit_floor_s:
            floor = secs(check.sizes.unit_floor_s)
            stage.reason = (f"time ran out: {secs(check.budget.left())} left of the {secs(check.budget.seconds)} "
                            f"budget, {secs(stage.allotted)} for this stage (it needs {floor})")
        else:
            check.say(f"stage {TITLES[key]}: {secs(stage.allotted)} allotted")
            try:
                STAGE_FUNCTIONS[key](check, stage)
            except Exception as exc:  # a broken stage is data too; the later ones still run
                stage.failed, stage.reason = True, error_text(exc)
                stage.summary["traceback"] = traceback.format_exc().splitlines()[-8:]
        stage.seconds = check.budget.elapsed() - start
        status, reason = stage.status()
        check.say(f"stage {key}: {status}" + (f" ({reason})" if reason else ""))
        check.save()


# ------------------------------------------------------------------------------- markdown

def render_markdown(report: dict) -> str:
    stages = report["stages"]
    env = stages.get("env", {}).get("summary", {})
    versions = env.get("versions", {})
    lines = ["# pgolf GPU check", "",
             f"- **Started:** {report['started']}; **mode:** "
             + ("dry run (CPU, tiny shapes, compile off: checks the plan, measures nothing)"
                if report["mode"] == "dry-run" else "GPU"),
             f"- **Device:** {versions.get('device', '-')}; torch {versions.get('torch', '-')}, CUDA "
             f"{versions.get('cuda') or '-'}, driver {versions.get('driver') or '-'}",
             f"- **Command:** `{report['command']}`",
             f"- **Budget:** {report['budget_s']:.0f} s, used {report.get('elapsed_s', 0):.1f} s; data "
             f"{report['data'] or '-'}; official script {report['official'] or '-'}",
             f"- **Checkout:** {report['checkout'].get('commit') or '-'} "
             f"({report['checkout'].get('changed_files', '-')} tracked files changed)", "",
             "| stage | status | seconds | allotted s | units ran / failed / skipped |", "|---|---|---:|---:|---|"]
    for key in STAGES:
        st = stages.get(key)
        if st:
            c = st["units_count"]
            lines.append(f"| {st['title']} | {status_cell(st)} | {st['seconds']:.1f} | {st['allotted_s']:.1f} | "
                         f"{c['ran']} / {c['failed']} / {c['skipped']} |")
    for key, render in (("env", md_env), ("presets", md_presets), ("official", md_official), ("eval", md_eval),
                        ("compression", md_compression)):
        if key in stages:
            st = stages[key]
            lines += ["", f"## {st['title']}", ""]
            lines += render(st, report) if st["units"] or st["summary"] else [status_cell(st)]
    return "\n".join(lines) + "\n"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def status_cell(rec: dict) -> str:
    return cell(rec["status"] + (f": {rec['reason']}" if rec.get("reason") else ""))


def num(value, spec: str = ",.1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def md_env(stage: dict, _report: dict) -> list[str]:
    env = stage["summary"]
    if not env:
        return [status_cell(stage)]
    v, peak = env.get("versions", {}), env.get("matmul_peak", {})
    rows = [("device", v.get("device")),
            ("driver / CUDA / cuDNN / NCCL", " / ".join(str(v.get(k) or "-")
                                                       for k in ("driver", "cuda", "cudnn", "nccl"))),
            ("python / torch / triton", " / ".join(str(v.get(k) or "-") for k in ("python", "torch", "triton"))),
            ("compressors", ", ".join(v.get("compressors", [])) or "-"),
            ("matmul peak", peak_text(peak))]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {cell(val)} |" for k, val in rows]
    sdpa = env.get("sdpa", [])
    if sdpa:
        names = list(sdpa[0].get("ms", {}))
        lines += ["", "SDPA backends, causal forward + backward in bf16, ms (n/a: the kernel refused the shape):", "",
                  "| shape (batch × heads / kv × seq × head_dim) | presets | " + " | ".join(names) + " | fastest |",
                  "|---|---|" + "---:|" * len(names) + "---|"]
        for s in sdpa:
            sh = s["shape"]
            cells = [num(s["ms"][n], ".3f") if isinstance(s["ms"][n], (int, float)) else "n/a" for n in names]
            lines.append(f"| {sh['batch']} × {sh['heads']} / {sh['kv_heads']} × {sh['seq_len']} × "
                         f"{sh['head_dim']} | {', '.join(sh['presets'])} | " + " | ".join(cells)
                         + f" | {s.get('fastest') or s.get('error', '-')} |")
    kernels = env.get("kernels", {})
    if kernels:
        lines += ["", "| other attention kernel | result |", "|---|---|"]
        lines += [f"| {k} | {cell(val)} |" for k, val in kernels.items()]
    return lines


def peak_text(peak: dict) -> str:
    if peak.get("tflops") is None:
        return peak.get("error", "-")
    return f"{peak['tflops']:,.1f} TFLOP/s ({peak.get('dtype', '-')}, {peak.get('size', '-')}³ matmuls)"


def steps_text(report: dict) -> str:
    z = report["sizes"]
    return (f"{z['warmup']} untimed warm-up (compile) steps, then ms/step over {z['steps']} steps after {z['skip']} "
            f"more; compile {z['compile']}")


def md_presets(stage: dict, report: dict) -> list[str]:
    peak = report["stages"].get("env", {}).get("summary", {}).get("matmul_peak", {}).get("flops")
    shape = "tiny shapes (dry run)" if report["mode"] == "dry-run" else "its full shape and batch"
    lines = [f"Each preset at {shape} on the check's data: {steps_text(report)}; then the run's own export and "
             f"roundtrip on the first {report['sizes']['val_tokens']:,} validation tokens. Checks: finite losses, no "
             "recompilation after warmup, the run done.", "",
             "| preset | status / checks | params | steps | ms/step | tokens/s | MFU | peak MiB | to first step s "
             "| sdpa | pre-quant bpb | roundtrip bpb (stride) | total bytes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for u in stage["units"]:
        r = u.get("result", {})
        lines.append(f"| {u['name']} | {status_cell(u)} | {num(r.get('model_params'), ',')} | "
                     f"{r.get('steps', '-')} | {num(r.get('ms_per_step'), ',.2f')} | "
                     f"{num(r.get('tokens_per_s'), ',.0f')} | "
                     f"{mfu_cell(r, peak)} | {num(r.get('peak_memory_mib'), ',.0f')} | {num(r.get('startup_s'))} | "
                     f"{r.get('sdpa_backend') or '-'} | {num(r.get('pre_quant_bpb'), '.4f')} | "
                     f"{num(r.get('roundtrip_bpb'), '.4f')} ({r.get('roundtrip_stride') or '-'}) | "
                     f"{num(r.get('total_bytes'), ',')}{'' if r.get('fits') in (None, True) else ' OVER'} |")
    return lines


def mfu_cell(r: dict, peak: float | None) -> str:
    if not (peak and r.get("flops_per_token") and r.get("tokens_per_s")):
        return "-"
    return percent(r["flops_per_token"] * r["tokens_per_s"] / peak)


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def md_official(stage: dict, report: dict) -> list[str]:
    comp = stage["summary"].get("comparison", {})
    val = report["sizes"]["reference_val_tokens"]
    lines = [f"The baseline on both sides, same shards and config, one process: {steps_text(report)}; val_bpb on "
             + ("the whole validation split" if val == 0 else f"the first {val:,} validation tokens (pgolf's side)")
             + " after the same steps.", "",
             "| side | status | ms/step | tokens/s | MFU | peak MiB | val_bpb | roundtrip bpb |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for side, name in (("pgolf", "pgolf baseline"), ("official", "official train_gpt.py")):
        rec = next((u for u in stage["units"] if u["name"] == name), None)
        s = comp.get("sides", {}).get(side, {})
        lines.append(f"| {side} | {status_cell(rec) if rec else '-'} | {num(s.get('ms_per_step'), ',.2f')} | "
                     f"{num(s.get('tokens_per_s'), ',.0f')} | {percent(s.get('mfu'))} | "
                     f"{num(s.get('peak_memory_mib'), ',.0f')} | {num(s.get('val_bpb'), '.4f')} | "
                     f"{num(s.get('roundtrip_bpb'), '.4f')} |")
    if "speedup" in comp:
        lines += ["", f"**Ratio** (official ms/step ÷ pgolf ms/step): **{comp['speedup']:.3f}** "
                      f"({'pgolf faster' if comp['speedup'] > 1 else 'official faster'}); "
                      f"Δ val_bpb (pgolf − official): {num(comp.get('delta_bpb'), '+.4f')}"]
    levers = stage["summary"].get("levers", [])
    if levers:
        lines += ["", "Speed levers (the baseline, training steps only, against the defaults above):", "",
                  "| lever | status | ms/step on | ms/step off | off ÷ on | peak MiB on / off | verdict |",
                  "|---|---|---:|---:|---:|---|---|"]
        for row in levers:
            lines.append(f"| {row['lever']} | {status_cell(row)} | {num(row.get('ms_on'), ',.2f')} | "
                         f"{num(row.get('ms_off'), ',.2f')} | {num(row.get('speedup'), '.3f')} | "
                         f"{num(row.get('memory_on'), ',.0f')} / {num(row.get('memory_off'), ',.0f')} | "
                         f"{row.get('verdict', '-')} |")
    return lines


def md_eval(stage: dict, _report: dict) -> list[str]:
    rows = stage["summary"].get("rows", [])
    lines = [f"Target: {stage['summary'].get('target', '-')} (its artifact). Each mode is timed after an identical "
             f"warm-up pass (compilation); projected to {FULL_VAL_TARGETS:,} targets on {TRACK_GPUS} GPUs (assumed "
             f"to scale linearly) against the {EVAL_TIME_LIMIT_S:.0f} s budget.", "",
             "| mode | status | val_bpb | tokens | warm-up s | timed s | tokens/s | full split, 1 GPU s | "
             f"full split, {TRACK_GPUS} GPUs s | within {EVAL_TIME_LIMIT_S:.0f} s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        within = "-" if r.get("within_budget") is None else ("yes" if r["within_budget"] else "NO")
        lines.append(f"| {r['mode']} | {status_cell(r)} | {num(r.get('val_bpb'), '.4f')} | "
                     f"{num(r.get('tokens'), ',')} | "
                     f"{num(r.get('warm_seconds'), '.2f')} | {num(r.get('seconds'), '.2f')} | "
                     f"{num(r.get('tokens_per_s'), ',.0f')} | {num(r.get('full_split_1gpu_s'))} | "
                     f"{num(r.get('full_split_8gpu_s'))} | {within} |")
    return lines if rows or stage["status"] == "ran" else [status_cell(stage)]


def md_compression(stage: dict, _report: dict) -> list[str]:
    s = stage["summary"]
    trained = next((u for u in stage["units"] if u["name"] == "trained baseline"), None)
    lines = []
    if trained:
        r = trained.get("result", {})
        lines += [f"Trained: the baseline, {r.get('steps', '-')} steps in {num(r.get('train_time_s'))} s "
                  f"(train.max_wallclock_seconds={s.get('train_seconds', '-')}, warmdown over the last 30%): "
                  f"{status_cell(trained)}; unquantized val_bpb {num(s.get('unquantized_val_bpb'), '.5f')} on "
                  f"{num(s.get('val_tokens'), ',')} validation targets.", ""]
    rows = s.get("rows", [])
    if rows:
        lines += ["| scheme | status | bytes | bytes / param | bytes / quantized param | val_bpb | Δ bpb | "
                  "compressor, storage, layout | export s |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            lines.append(f"| {r['scheme']} | {status_cell(r)} | {num(r.get('bytes'), ',')} | "
                         f"{num(r.get('bytes_per_param'), '.4f')} | {num(r.get('bytes_per_quantized_param'), '.4f')} | "
                         f"{num(r.get('val_bpb'), '.5f')} | {num(r.get('delta_bpb'), '+.5f')} | "
                         f"{r.get('compressor', '-')}, {r.get('storage', '-')}, {r.get('layout', '-')} | "
                         f"{num(r.get('export_seconds'))} |")
    return lines or [status_cell(stage)]


# ---------------------------------------------------------------------------------- workers

class Emitter:
    """A worker's result.json, rewritten whole after every part, so a killed worker leaves its parts."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def update(self, **fields) -> None:
        self.data.update(fields)
        write_atomic(self.path, json.dumps(self.data, indent=2, default=str))


def worker_main(unit_dir: Path) -> int:
    spec = json.loads((unit_dir / "spec.json").read_text(encoding="utf-8"))
    out = Emitter(unit_dir / "result.json")
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        WORKERS[spec["kind"]](spec, out)
        return 0
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: record, then fail
        out.update(error=error_text(exc), traceback=traceback.format_exc().splitlines()[-12:])
        return 1


def worker_device(spec: dict):
    import torch

    return torch.device(spec["device"])


def timed_parts(spec: dict, out: Emitter, key: str, label: str, parts: list[tuple[str, Callable[[], dict]]]) -> None:
    """Run parts in order, each skipped when the worker's deadline is closer than the last part
    took; every part's row (or its failure) is written as soon as it is known."""
    rows, last = [], 0.0
    for name, part in parts:
        left = spec["deadline"] - time.time()
        if left < last:
            rows.append({label: name, "status": "skipped", "reason": f"time: {secs(left)} left, the last part "
                                                                   f"took {secs(last)}"})
        else:
            start = time.perf_counter()
            try:
                rows.append({label: name, "status": "ran", "reason": None, **part()})
            except Exception as exc:
                rows.append({label: name, "status": "failed", "reason": error_text(exc)})
            last = time.perf_counter() - start
        out.update(**{key: rows})


# --- env

def worker_env(spec: dict, out: Emitter) -> None:
    """Each probe on its own: one that breaks is recorded as failed and the next one runs."""
    device = worker_device(spec)
    out.update(versions=probe_versions(device))
    try:
        out.update(matmul_peak=probe_matmul_peak(device, spec["peak_size"], spec["peak_seconds"]))
    except Exception as exc:
        out.update(matmul_peak={"error": f"failed: {error_text(exc)}"})
    sdpa = []
    for shape in spec["shapes"]:
        try:
            sdpa.append(probe_sdpa(shape, device))
        except Exception as exc:
            sdpa.append({"shape": shape, "ms": {}, "error": f"failed: {error_text(exc)}"})
        out.update(sdpa=sdpa)
    kernels = {}
    shape = spec["shapes"][0] if spec["shapes"] else {"batch": 2, "heads": 8, "kv_heads": 4, "seq_len": 1024,
                                                      "head_dim": 64}
    for name, probe in (("torch varlen_attn", probe_torch_varlen), ("flash_attn_interface (FA3)", probe_fa3),
                        ("flash_attn (FA2)", probe_fa2), ("flex_attention", probe_flex)):
        try:
            kernels[name] = probe(shape, device)
        except Exception as exc:
            kernels[name] = f"failed: {error_text(exc)}"
        out.update(kernels=kernels)


def probe_versions(device) -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from pgolf.compress.container import available_compressors

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def device_name() -> str:
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.1f} GiB")

    def nccl() -> str:
        found = torch.cuda.nccl.version()
        return ".".join(map(str, found)) if isinstance(found, tuple) else str(found)

    cuda = device.type == "cuda" and torch.cuda.is_available()
    probes = {"python": platform.python_version, "platform": platform.platform, "torch": lambda: torch.__version__,
              "cuda": lambda: torch.version.cuda, "triton": lambda: pkg("triton"), "numpy": lambda: pkg("numpy"),
              "sentencepiece": lambda: pkg("sentencepiece"), "cpu_count": os.cpu_count,
              "compressors": lambda: list(available_compressors()), "cuda_available": torch.cuda.is_available}
    if cuda:
        probes.update(device=device_name, device_count=torch.cuda.device_count, cudnn=torch.backends.cudnn.version,
                      nccl=nccl, driver=nvidia_smi_driver)
    else:
        probes.update(device=lambda: f"cpu x{torch.get_num_threads()} threads")
    v = {}
    for key, probe in probes.items():
        try:
            v[key] = probe()
        except Exception as exc:
            v[key] = f"failed: {error_text(exc)}"
    return v


def nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def probe_matmul_peak(device, size: int, seconds: float) -> dict:
    from gpu_throughput import matmul_peak_flops

    flops, dtype = matmul_peak_flops(device, size, seconds)
    return {"flops": flops, "tflops": round(flops / 1e12, 3), "dtype": dtype, "size": size}


def probe_sdpa(shape: dict, device) -> dict:
    """Each SDPA backend's causal forward + backward on the shape (pgolf.runtime.sdpa's timer)."""
    from pgolf.runtime.sdpa import CANDIDATES, AttentionShape, time_backend

    s = AttentionShape(shape["batch"], shape["heads"], shape["kv_heads"], shape["seq_len"], shape["head_dim"])
    ms = {}
    for name in (*CANDIDATES, "math"):
        try:
            ms[name] = round(time_backend(name, s, device), 4)
        except Exception as exc:
            ms[name] = f"n/a: {error_text(exc)}"
    timed = {n: t for n, t in ms.items() if isinstance(t, float)}
    return {"shape": shape, "ms": ms, "fastest": min(timed, key=timed.get) if timed else None}


def attention_inputs(shape: dict, device, packed: bool = False, requires_grad: bool = True):
    import torch

    dtype = torch.bfloat16
    b, h, kv, t, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["seq_len"], shape["head_dim"]
    q_shape, kv_shape = ((b * t, h, d), (b * t, kv, d)) if packed else ((b, h, t, d), (b, kv, t, d))
    q = torch.randn(*q_shape, device=device, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(*kv_shape, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def time_call(fn: Callable[[], object], device, repeats: int = 5) -> tuple[float, float]:
    """(seconds of the first call, ms per call after it)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return first, 1000 * (time.perf_counter() - start) / repeats


def varlen_case(shape: dict, device):
    """Packed q, k, v of batch sequences of seq_len each, and their cumulative lengths."""
    import torch

    q, k, v = attention_inputs(shape, device, packed=True)
    cu = torch.arange(0, (shape["batch"] + 1) * shape["seq_len"], shape["seq_len"], device=device, dtype=torch.int32)
    return q, k, v, cu


def probe_torch_varlen(shape: dict, device) -> str:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu = varlen_case(shape, device)
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = shape["kv_heads"] != shape["heads"]
    elif shape["kv_heads"] != shape["heads"]:
        rep = shape["heads"] // shape["kv_heads"]
        k, v = (t.detach().repeat_interleave(rep, dim=1).requires_grad_() for t in (k, v))
    t = shape["seq_len"]
    first, ms = time_call(lambda: varlen_attn(q, k, v, cu, cu, t, t, **kwargs).sum().backward(), device)
    return f"ok: {ms:.3f} ms causal fwd+bwd (first call {first:.2f} s)"


def _flash_varlen(module: str, shape: dict, device) -> str:
    import importlib

    try:
        fa = importlib.import_module(module)
    except ImportError:
        return "not installed"
    q, k, v, cu = varlen_case(shape, device)
    t = shape["seq_len"]

    def call():
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, t, t, causal=True)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    first, ms = time_call(call, device)
    return f"ok ({getattr(fa, '__version__', 'version ?')}): {ms:.3f} ms causal fwd+bwd (first call {first:.2f} s)"


def probe_fa3(shape: dict, device) -> str:
    return _flash_varlen("flash_attn_interface", shape, device)


def probe_fa2(shape: dict, device) -> str:
    return _flash_varlen("flash_attn", shape, device)


def probe_flex(shape: dict, device) -> str:
    """flex_attention with a causal block mask: compiled with backward on CUDA, eager forward on CPU
    (its CPU path has no backward)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cuda = device.type == "cuda"
    q, k, v = attention_inputs(shape, device, requires_grad=cuda)
    t = shape["seq_len"]
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device=str(device))
    fn = torch.compile(flex_attention) if cuda else flex_attention
    gqa = shape["kv_heads"] != shape["heads"]

    def call():
        out = fn(q, k, v, block_mask=mask, enable_gqa=gqa)
        if cuda:
            out.sum().backward()

    first, ms = time_call(call, device)
    what = "compiled, causal fwd+bwd" if cuda else "eager, causal fwd only (CPU)"
    return f"ok: {ms:.3f} ms {what} (first call, compile included: {first:.2f} s)"


# --- train

def worker_train(spec: dict, out: Emitter) -> None:
    import torch

    from gpu_throughput import flops_per_token, peak_memory_mib
    from pgolf.train.run import run_training

    cfg, _ = resolve_config(spec["preset"], spec["overrides"], env={})
    device = worker_device(spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        summary = run_training(cfg, console=False,
                               interrupt_at_step=cfg.train.iterations if spec.get("train_only") else None)
        out.update(status=summary.get("status"))
    finally:
        out.update(peak_memory_mib=round(peak_memory_mib(device), 1))
    out.update(flops_per_token=flops_per_token(cfg))


# --- eval

def worker_eval(spec: dict, out: Emitter) -> None:
    """Each mode on a validation prefix of the run's artifact: once to warm up (compilation), then
    timed, with one compiled model throughout (pgolf.eval's scoring and TTT)."""
    import torch

    from pgolf.data.shards import load_validation_tokens
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.eval.run import load_target
    from pgolf.model.gpt import build_model

    device = worker_device(spec)
    cfg, state, _, _ = load_target(spec["run"], live=False)
    seq_len = cfg.train.train_seq_len
    val = load_validation_tokens(cfg.val_files(), seq_len)
    luts = load_tokenizer(cfg.data.tokenizer_path).byte_luts(cfg.model.vocab_size).to_torch(device)
    state = {k: v.to(device) for k, v in state.items()}
    model = build_model(cfg.model, device)
    model.load_state_dict(state, strict=True)
    scorer = torch.compile(model, dynamic=False) if device.type == "cuda" else model
    parts = [(m["name"], lambda m=m: eval_mode(m, model, scorer, state, val, luts, seq_len, spec["batch"], device))
             for m in spec["modes"]]
    timed_parts(spec, out, "rows", "mode", parts)


def eval_mode(mode: dict, model, scorer, state: dict, val, luts, seq_len: int, batch: int, device) -> dict:
    import torch

    from pgolf.eval.ttt import TTTConfig, run_ttt
    from pgolf.eval.windows import score_windows, to_result, window_plan

    tokens = val[: max(min(mode["tokens"], val.numel() - 1) // seq_len, 1) * seq_len + 1]
    targets = tokens.numel() - 1
    stride = mode["stride"] or seq_len

    def once() -> tuple[float, object]:
        model.load_state_dict(state)  # TTT adapts the weights: every pass starts from the artifact's
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if mode["ttt"] is not None:
            sums, _ = run_ttt(model, tokens, luts, seq_len, stride, batch, TTTConfig(**mode["ttt"]), device,
                              runner=scorer)
        else:
            sums = score_windows(scorer, tokens, window_plan(targets, seq_len, stride), luts, device, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, sums

    warm_s, _ = once()
    seconds, sums = once()
    return eval_row(to_result(sums), stride, warm_s, seconds)


def eval_row(result, stride: int, warm_s: float, seconds: float) -> dict:
    rate = result.tokens / seconds
    full = FULL_VAL_TARGETS / rate
    return {"val_bpb": result.val_bpb, "stride": stride, "tokens": result.tokens, "warm_seconds": round(warm_s, 3),
            "seconds": round(seconds, 3), "tokens_per_s": round(rate, 1), "full_split_1gpu_s": round(full, 1),
            "full_split_8gpu_s": round(full / TRACK_GPUS, 1),
            "within_budget": full / TRACK_GPUS <= EVAL_TIME_LIMIT_S}


# --- export

def worker_export(spec: dict, out: Emitter) -> None:
    from compression_bpb import SCHEMES as OVERRIDES, load_trained, scheme_row, validation_scorer
    from pgolf.data.shards import resolve_shards

    device = worker_device(spec)
    cfg, model = load_trained(Path(spec["run"]), device)
    score, targets = validation_scorer(cfg, device, spec["val_tokens"], spec["batch_tokens"])
    base = score(model)
    out.update(unquantized_val_bpb=round(base, 5), val_tokens=targets, compressor=spec["compressor"])
    train_files = resolve_shards(cfg.train_files())
    parts = [(name, lambda name=name: scheme_row(name, OVERRIDES[name], model, cfg, train_files, device, score, base,
                                                  spec["compressor"])) for name in spec["schemes"]]
    timed_parts(spec, out, "rows", "scheme", parts)


WORKERS = {"env": worker_env, "train": worker_train, "eval": worker_eval, "export": worker_export}


# ------------------------------------------------------------------------------------- main

def comma_list(choices) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return items
    return parse


def all_presets() -> list[str]:
    available = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.toml"))
    first = [p for p in FIRST_PRESETS if p in available]
    return first + [p for p in available if p not in first]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json / .md / .log")
    p.add_argument("--budget-seconds", type=float, default=None, help="the whole check's seconds (480; dry run 120)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="official shards and tokenizer (default: %(default)s)")
    p.add_argument("--official", type=Path, default=DEFAULT_OFFICIAL,
                   help="openai/parameter-golf's train_gpt.py (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="the same plan on CPU: tiny shapes, compile off")
    p.add_argument("--stages", type=comma_list(STAGES), default=list(STAGES), help="comma list (default: all)")
    presets = all_presets()
    p.add_argument("--presets", type=comma_list(presets), default=presets, help="comma list (default: all, in order "
                   "baseline, the records, the rest)")
    p.add_argument("--levers", type=comma_list(tuple(LEVERS)), default=list(LEVERS), help="comma list (default: all)")
    p.add_argument("--schemes", type=comma_list(tuple(SCHEMES)), default=list(SCHEMES),
                   help="comma list (default: all)")
    p.add_argument("--train-seconds", type=float, default=None, help="compression stage's training (120; dry run 2)")
    p.add_argument("--compressor", default="lzma", help="the compression stage's compressor (default lzma: no "
                   "optional package; auto picks the smallest installed)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for runs and workers (default: a "
                   "temporary one, deleted at the end)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.worker:
        raise SystemExit(worker_main(args.worker))
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    budget = Budget(args.budget_seconds or (120.0 if args.dry_run else 480.0))
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="pgolf-gpu-check-")) if temporary else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args, sizes, budget, argv)
    try:
        check.say(f"gpu check ({check.report['mode']}): budget {budget.seconds:.0f} s, out {args.out}, "
                  f"work {args.work}")
        run_stages(check)
    finally:
        check.save()
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)
    print(render_markdown(check.report))
    return check.report


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # workers are killed and the files written on the way out
    main()
