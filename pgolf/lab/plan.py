"""The planner: what a config costs before it is trained.

`plan_config(cfg)` reports, for the model the config builds:

* parameters per component (embedding incl. an untied head, attention, MLP, control scalars),
  counted on the model itself, and its unique vs effective depth (recurrence);
* FLOPs per token and per step, forward and backward, counted exactly by
  torch.utils.flop_counter on one train_seq_len sequence of the model moved to the meta
  device (matmuls, attention as run, recurrence included; dense attention: causal kernels
  skip about half of the attention FLOPs);
* the steps that fit in the wall-clock budget at a throughput given or measured by the newest
  finished run in run.runs_dir with the same model, batch and sequence length;
* the artifact bytes, an estimate: trained-like weights (pgolf.lab.plan_weights) go through the
  export training uses (pgolf.compress.policy.plan_export, pgolf.compress.container.pack_artifact with the
  config's scheme, policy, compressor, storage and layout) and are really compressed; the code
  bytes are counted exactly as the export counts them.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pgolf.config import Config, ConfigError, config_from_dict
from pgolf.lab.plan_weights import DEFAULT_LAWS, DriftLaw, draw_trained_state, laws_from_run
from pgolf.model import roles
from pgolf.model.gpt import GPT
from pgolf.rules import EXIT_OVER_CAP, SIZE_CAP_BYTES
from pgolf.runs import RunDir, read_json
from pgolf.train.export import counted_code_bytes

COMPONENTS = ("embedding", "attention", "mlp", "control", "other")
# The allocator weighs errors by Hessians; for a size estimate a few sequences suffice.
PLAN_CALIBRATION_SEQS = 4
# FLOP counter ops that multiply activations by weights; the rest (bmm, SDPA) is attention.
WEIGHT_MATMUL_OPS = ("aten.mm", "aten.addmm", "aten._scaled_mm")


def build_initial_model(cfg: Config) -> GPT:
    """The model as training builds it (same seed: same initial weights), fp32 on CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return GPT(cfg.model)


# ----------------------------------------------------------------------------- parameters

def component_of(model: nn.Module, name: str, param: torch.Tensor | None = None) -> str:
    """embedding (embedding tables and an untied output head), attention, mlp, control (the
    fp32 scalars) or other: the parameter's role's planner component (pgolf.model.roles), for
    matrices the slot owning them."""
    return roles.component_of(model, name)


def count_parameters_by_component(model: nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        counts[component_of(model, name, param)] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------- FLOPs

def count_flops(model: nn.Module, seq_len: int) -> dict[str, float]:
    """FLOPs per token of one forward and one backward pass over a sequence of seq_len tokens.
    Moves `model` to the meta device (no memory, no arithmetic): pass a model you are done with."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to_empty(device="meta")
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fwd:
        loss = model(tokens, tokens)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    by_op = {str(op): n for op, n in fwd.get_flop_counts().get("Global", {}).items()}
    weights = sum(n for op, n in by_op.items() if op in WEIGHT_MATMUL_OPS)
    forward, backward = fwd.get_total_flops(), bwd.get_total_flops()
    return {"forward": forward / seq_len, "backward": backward / seq_len, "total": (forward + backward) / seq_len,
            "forward_matmul": weights / seq_len, "forward_attention": (forward - weights) / seq_len}


# ------------------------------------------------------------------------------ throughput

def _run_device(run_dir: Path) -> str | None:
    log = RunDir(run_dir).log
    if not log.is_file():
        return None
    with open(log, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    found = re.search(r"device: (\S+)\s+world_size: (\d+)", first)
    return f"{found.group(1)} x {found.group(2)}" if found else None


def measured_throughput(cfg: Config) -> dict | None:
    """Tokens/s of the newest finished run in run.runs_dir with this model config, batch tokens
    and sequence length: its steps x train_batch_tokens over its training time."""
    best = None
    for summary_path in Path(cfg.run.runs_dir).glob(f"*/{RunDir.SUMMARY}"):
        try:
            summary = read_json(summary_path)
            run_cfg = config_from_dict(read_json(RunDir(summary_path.parent).config)["config"])
        except (OSError, ValueError, KeyError, TypeError):  # damaged, or from an incompatible version
            continue
        steps, ms = summary.get("steps") or 0, summary.get("train_time_ms") or 0
        if summary.get("status") not in ("done", "over_cap") or steps <= 0 or ms <= 0:
            continue
        t, rt = cfg.train, run_cfg.train
        if (run_cfg.model != cfg.model or (rt.train_batch_tokens, rt.train_seq_len)
                != (t.train_batch_tokens, t.train_seq_len)):
            continue
        mtime = summary_path.stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, summary_path.parent, steps, ms)
    if best is None:
        return None
    _, run_dir, steps, ms = best
    return {"tokens_per_sec": steps * cfg.train.train_batch_tokens / (ms / 1000.0), "run": str(run_dir),
            "run_steps": steps, "run_train_seconds": ms / 1000.0, "device": _run_device(run_dir)}


def step_budget(cfg: Config, tokens_per_sec: float | None, source: str | None) -> dict:
    """Steps that fit in the wall-clock budget (less any GPTQ reserve) at tokens_per_sec, and
    the steps training will run: that, or train.iterations when it comes first."""
    t = cfg.train
    budget = t.max_wallclock_seconds - cfg.export.gptq_reserve_seconds if t.max_wallclock_seconds > 0 else None
    out = {"tokens_per_sec": tokens_per_sec, "source": source, "wallclock_seconds": budget,
           "iterations": t.iterations, "step_seconds": None, "steps_fit": None, "steps": t.iterations,
           "stopped_by": "iterations" if budget is None else "unknown"}
    if tokens_per_sec:
        step_s = t.train_batch_tokens / tokens_per_sec
        out["step_seconds"] = step_s
        out["iterations_seconds"] = t.iterations * step_s
        if budget is not None:
            fit = math.floor(budget * tokens_per_sec / t.train_batch_tokens + 1e-9)
            out["steps_fit"] = fit
            out["steps"] = min(fit, t.iterations)
            out["stopped_by"] = "wallclock" if fit < t.iterations else "iterations"
    out["train_tokens"] = out["steps"] * t.train_batch_tokens
    return out


# -------------------------------------------------------------------------------- artifact

def _calibration_files(cfg: Config, tmp: Path) -> list[Path]:
    """The config's training shards when present; else one shard of random tokens (GPTQ and the
    allocator need activations; their bit widths and sizes hardly depend on what the text is)."""
    from pgolf.data.shards import resolve_shards, write_shard

    try:
        return resolve_shards(cfg.train_files())
    except FileNotFoundError:
        pass
    n = PLAN_CALIBRATION_SEQS * cfg.train.train_seq_len + 1
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (n,), generator=gen, dtype=torch.int32)
    return [write_shard(tmp / "plan_train_000000.bin", tokens)]


def estimate_artifact(model: GPT, cfg: Config, steps: int, laws: dict[str, DriftLaw]) -> dict:
    """Draw trained-like weights into `model` and export them as training would: quantize
    (plan_export), pack and compress (pack_artifact). Returns bytes and what was chosen."""
    from pgolf.compress.container import describe_artifact
    from pgolf.compress.policy import plan_export
    from pgolf.train.export import artifact_meta
    from pgolf.runs import new_run_id

    notes = []
    plan_cfg = copy.deepcopy(cfg)
    plan_cfg.run.run_id = cfg.run.run_id or new_run_id(cfg)  # the meta stores the run id, as in training
    meta = artifact_meta(plan_cfg)  # before the export settings below are adjusted for speed
    e = plan_cfg.export
    start = time.perf_counter()
    draw_trained_state(model, cfg, steps, laws)
    code_bytes, code_description = counted_code_bytes(cfg)
    if e.gptq:  # GPTQ moves codes, not bit widths: the baseline at int6 is 0.02% apart, at minutes of CPU
        e.gptq = False
        notes.append("export.gptq: estimated with plain rounding (GPTQ keeps the bit widths; its codes "
                     "compress alike)")
    with tempfile.TemporaryDirectory(prefix="pgolf-plan-") as tmp:
        train_files = []
        if e.allocate:
            e.gptq_seqs = min(e.gptq_seqs, PLAN_CALIBRATION_SEQS)
            train_files = _calibration_files(cfg, Path(tmp))
            notes.append(f"export.allocate: Hessians from {e.gptq_seqs} sequences for the estimate")
        plan = plan_export(model, plan_cfg, train_files, torch.device("cpu"), code_bytes)
    blob = _pack(plan.qdict, meta, e, notes)
    described = describe_artifact(blob)  # components before compression: a per-component split would cost
    # another compression of the whole payload (training logs it; the planner reports the total)
    model_bytes = len(blob)
    total = model_bytes + code_bytes
    return {"estimate": True, "model_bytes": model_bytes, "code_bytes": code_bytes,
            "code_description": code_description, "total_bytes": total, "cap": SIZE_CAP_BYTES,
            "fits": total <= SIZE_CAP_BYTES, "overage": max(0, total - SIZE_CAP_BYTES),
            "components_raw": described["components"], "params_by_format": described["params"],
            "compressor": described["compressor"], "storage": described["storage"], "layout": described["layout"],
            "export_lines": plan.lines, "notes": notes, "seconds": time.perf_counter() - start}


def _pack(qdict: dict, meta: dict, e, notes: list[str]) -> bytes:
    """pack_artifact as the export calls it, except that with a compressor other than zlib the
    storage x layout combinations under "auto" are ranked by zlib and only the best is compressed
    with the slow ones (zstd 22, lzma extreme, brotli 11 take tens of seconds each on ~15 MB)."""
    from pgolf.compress.container import pack_artifact

    storage, layout = e.storage, e.layout
    if e.compressor != "zlib" and "auto" in (storage, layout) and layout != "per_group":  # per_group: nothing to rank
        trials: list[dict] = []
        pack_artifact(qdict, meta=meta, compressor="zlib", storage=storage, layout=layout, trials=trials)
        if len(trials) > 1:
            chosen = next(t for t in trials if t["chosen"])
            storage, layout = chosen["storage"], chosen["layout"]
            notes.append(f"storage {storage} and layout {layout} ranked best by zlib; only that combination went "
                         f"through compressor {e.compressor} (training tries every one: within ~0.4%)")
    return pack_artifact(qdict, meta=meta, compressor=e.compressor, storage=storage, layout=layout,
                         row_order=e.row_order, group_backend=e.group_backend)


def levers(cfg: Config, size: dict, total_params: int) -> list[str]:
    """Ways to get under the cap, for the over-cap message, most direct first."""
    e = cfg.export
    bits_per_param = 8 * size["model_bytes"] / max(total_params, 1)
    out = [f"about {math.ceil(size['overage'] * 8 / bits_per_param):,} fewer parameters at the current "
           f"{bits_per_param:.2f} bits per parameter: a smaller model.model_dim, model.num_layers or MLP "
           "(model.mlp_mult / model.mlp_hidden); model.recurrence reuses blocks without adding parameters"]
    if e.scheme in ("int8", "int6") and not e.allocate:
        lower = {"int8": "int6", "int6": "int5"}[e.scheme]
        out.insert(0, f"lower bits: export.scheme={lower}, or per-tensor widths in export.policy (e.g. mlp:5)")
    if not e.allocate:
        out.append("export.allocate=true: bits chosen per tensor to fit the cap")
    if getattr(e, "fp16_embedding", False):
        out.append("export.fp16_embedding=false: quantize the tied embedding instead of keeping it in fp16")
    elif any(spec in ("fp16", "fp32") for _, spec in e.policy):
        out.append("drop the fp16/fp32 entries of export.policy")
    if e.compressor != "auto":
        out.append("export.compressor=auto: the smallest of zlib, zstd, lzma (and brotli when installed)")
    return out


# ------------------------------------------------------------------------------------ plan

def plan_config(cfg: Config, *, tokens_per_sec: float | None = None, from_run: str | None = None) -> dict:
    """The whole plan of `cfg` as a JSON-ready dict (see the module docstring)."""
    start = time.perf_counter()
    if tokens_per_sec is not None and tokens_per_sec <= 0:
        raise ConfigError(f"--tokens-per-sec must be positive, got {tokens_per_sec}")
    model = build_initial_model(cfg)
    params = count_parameters_by_component(model)
    depth = {"unique": getattr(model, "unique_depth", cfg.model.num_layers),
             "effective": getattr(model, "effective_depth", cfg.model.num_layers)}

    throughput = None if tokens_per_sec else measured_throughput(cfg)
    if tokens_per_sec:
        source = "given (--tokens-per-sec)"
    elif throughput:
        tokens_per_sec = throughput["tokens_per_sec"]
        device = f" on {throughput['device']}" if throughput["device"] else ""
        source = f"measured by run {throughput['run']}{device}"
    else:
        source = None
    time_plan = step_budget(cfg, tokens_per_sec, source)
    if throughput:
        time_plan["run"] = throughput

    laws, weights_source = DEFAULT_LAWS, "default drift laws (pgolf.lab.plan_weights.DEFAULT_LAWS)"
    if from_run:
        laws, measured = laws_from_run(from_run)
        weights_source = f"measured on {measured['run']} ({measured['checkpoint']}, step {measured['step']})"
    size = estimate_artifact(model, cfg, time_plan["steps"], laws)
    size["weights"] = {"steps": time_plan["steps"], "source": weights_source,
                       "laws": {k: v.to_dict() for k, v in laws.items()}}
    if time_plan["stopped_by"] == "unknown":
        size["notes"].append(f"weights drawn as after train.iterations={cfg.train.iterations} steps: no throughput "
                             "is known, so the wall-clock limit on steps is not applied (give --tokens-per-sec)")

    flops = count_flops(model, cfg.train.train_seq_len)  # model is on the meta device from here on
    per_step = {k: v * cfg.train.train_batch_tokens for k, v in flops.items()}
    plan = {
        "params": params,
        "depth": depth,
        "tokens": {"seq_len": cfg.train.train_seq_len, "per_step": cfg.train.train_batch_tokens},
        "flops": {"per_token": flops, "per_step": per_step, "note": "dense attention counted; causal kernels skip "
                  "about half of the attention FLOPs"},
        "time": time_plan,
        "size": size,
    }
    if time_plan["tokens_per_sec"]:
        plan["time"]["train_flops"] = per_step["total"] * time_plan["steps"]
    if not size["fits"]:
        plan["levers"] = levers(cfg, size, params["total"])
    plan["seconds"] = time.perf_counter() - start
    return plan


# --------------------------------------------------------------------- fast lower bound

# The fast bound assumes no compressor takes the quantized codes of trained weights below a quarter
# of their raw width. Measured: the baseline's int8 codes compress to ~0.85 of 8 bits after 13,800
# steps, ~0.75 after 1,000, ~0.41 after 100 (small weights under int8's 1/127 row-scale floor).
COMPRESSION_FLOOR = 0.25
# Runs planned shorter than this keep near-initial weights (zero-initialised projections, tiny
# rows) that compress without a useful floor: the bound counts their code bytes only.
SHORT_RUN_STEPS = 100
# Within this fraction under the cap, the bound warns: the real artifact is likely over.
NEAR_CAP_FRACTION = 0.03


def smallest_export_bits(cfg: Config) -> int:
    """The fewest bits per weight the config's export can give any tensor: the scheme's width,
    any narrower integer width in export.policy, and 4 when the allocator may choose widths."""
    from pgolf.compress.quant import SCHEMES

    e = cfg.export
    bits = [SCHEMES.get(e.scheme, min(SCHEMES.values()))]
    bits += [spec for _, spec in e.policy if isinstance(spec, int) and not isinstance(spec, bool)]
    if e.allocate:
        bits.append(4)  # pgolf.compress.allocate chooses among 8/6/5/4
    return min(bits)


def count_parameters_meta(cfg: Config) -> int:
    """The model's parameter count, built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    return sum(p.numel() for p in model.parameters())


def fast_size_bound(cfg: Config) -> dict:
    """A LOWER bound on the config's artifact bytes, in well under a second for the baseline:
    parameters (counted on the meta device) x the smallest bits the export can reach x
    COMPRESSION_FLOOR (0 for runs of under SHORT_RUN_STEPS iterations), plus the exact counted
    code bytes. A config over the cap by this bound
    cannot fit; one under it may still be over (`pgolf plan` estimates the real size)."""
    start = time.perf_counter()
    params = count_parameters_meta(cfg)
    bits = smallest_export_bits(cfg)
    code_bytes, _ = counted_code_bytes(cfg)
    floor = COMPRESSION_FLOOR if cfg.train.iterations >= SHORT_RUN_STEPS else 0.0
    model_bytes = math.floor(params * bits / 8 * floor)
    total = model_bytes + code_bytes
    bound = {"params": params, "bits": bits, "compression_floor": floor, "model_bytes": model_bytes,
             "code_bytes": code_bytes, "total_bytes": total, "cap": SIZE_CAP_BYTES,
             "fits": total <= SIZE_CAP_BYTES, "overage": max(0, total - SIZE_CAP_BYTES),
             "near_cap": SIZE_CAP_BYTES * (1 - NEAR_CAP_FRACTION) <= total <= SIZE_CAP_BYTES}
    if not bound["fits"]:
        bound["levers"] = (levers(cfg, bound, params) if model_bytes
                           else ["the counted code alone is over the cap: ship less code"])
    bound["seconds"] = time.perf_counter() - start
    return bound


def describe_bound(bound: dict) -> str:
    """One line: the lower bound and how it was reached."""
    return (f"artifact lower bound {bound['total_bytes']:,} bytes (cap {bound['cap']:,}): "
            f"{bound['params']:,} parameters x {bound['bits']} bits x compression floor "
            f"{bound['compression_floor']:g} = {bound['model_bytes']:,} + code {bound['code_bytes']:,}")


def size_gate(cfg, force: bool, command: str = "pgolf train") -> int | None:
    """Before anything is built on the device: refuse (EXIT_OVER_CAP, with the levers) a config
    whose artifact cannot fit by the planner's fast lower bound, unless `force`; warn when the
    bound is within a few percent of the cap. None: go on training."""
    bound = fast_size_bound(cfg)
    if not bound["fits"]:
        lines = [f"{command}: this config cannot fit: {describe_bound(bound)}, over by at least "
                 f"{bound['overage']:,} bytes. Levers:"]
        lines += [f"  - {lever}" for lever in bound["levers"]]
        if force:
            print("\n".join([*lines, "--force: training anyway (the run will end over_cap)"]), file=sys.stderr)
            return None
        lines.append("`pgolf plan` estimates the real size; --force trains anyway")
        print("\n".join(lines), file=sys.stderr)
        return EXIT_OVER_CAP
    if bound["near_cap"]:
        print(f"{command}: warning: {describe_bound(bound)} is within {100 * NEAR_CAP_FRACTION:g}% of the cap; "
              "the real artifact is very likely over it (run `pgolf plan` for an estimate)", file=sys.stderr)
    return None
