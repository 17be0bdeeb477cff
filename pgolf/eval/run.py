"""`pgolf eval`: score a run's artifact (reloaded from disk) standard, sliding or with TTT.

Every evaluation writes a receipt that `pgolf audit` re-checks, and reports its wall time with
a projection for the full validation split against the evaluation budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from pgolf.compress.container import read_artifact
from pgolf.config import Config, ConfigError, config_from_dict
from pgolf.config.ranges import COUNT, MOMENTUM, Range, at_least, positive, range_problems
from pgolf.data.shards import check_token_range, load_validation_tokens, validation_bytes
from pgolf.runtime.distributed import DistInfo, setup_distributed, teardown_distributed
from pgolf.eval.windows import score_windows, to_result, window_plan
from pgolf.model.gpt import build_model
from pgolf.compress.quant import dequantize_state_dict
from pgolf.eval.receipt import Receipt, state_fingerprint, write_receipt
from pgolf.rules import EVAL_TIME_LIMIT_S
from pgolf.runs import RunDir, RunHooks, read_json
from pgolf.data.tokenizer import check_vocab, load_tokenizer
from pgolf.eval.ttt import TTTConfig, run_ttt
from pgolf.eval.doc_ttt import DocTTTConfig, run_doc_ttt
from pgolf.eval.lora import SITES



@dataclass
class EvalOptions:
    stride: int | None = None  # None: the run's train.eval_stride (0: seq_len, the standard evaluation)
    seq_len: int | None = None  # None: the run's train_seq_len
    batch_windows: int = 64
    max_tokens: int = 0  # 0: the whole validation split
    ttt: TTTConfig | None = None
    doc_ttt: DocTTTConfig | None = None  # per-document LoRA TTT (pgolf.eval.doc_ttt); excludes ttt
    live: bool = False  # score the run's last checkpoint instead of the artifact
    data_dir: str | None = None
    receipt_path: str | None = None
    budget_seconds: float = EVAL_TIME_LIMIT_S
    device: str = "auto"
    compile: str = "auto"  # auto (on for CUDA) | on | off


# `pgolf eval`'s numeric options by EvalOptions / TTTConfig field -> (option, valid range).
EVAL_OPTION_RULES: dict[str, tuple[str, Range]] = {
    "stride": ("--stride", COUNT),
    "seq_len": ("--seq-len", COUNT),
    "batch_windows": ("--batch", COUNT),
    "max_tokens": ("--max-tokens", at_least(0, "0: the whole validation split")),
    "budget_seconds": ("--budget", positive()),
}
TTT_OPTION_RULES: dict[str, tuple[str, Range]] = {
    "chunk_tokens": ("--ttt-chunk", COUNT),
    "lr": ("--ttt-lr", at_least(0.0, "0: score the chunks without adapting")),
    "momentum": ("--ttt-momentum", MOMENTUM),
    "epochs": ("--ttt-epochs", at_least(0, "0: score the chunks without adapting")),
    "freeze_blocks": ("--ttt-freeze", at_least(0, "0: adapt every block")),
    "grad_clip": ("--ttt-clip", at_least(0.0, "0: no clipping")),
    "batch_seqs": ("--ttt-batch", COUNT),
}
DOC_TTT_OPTION_RULES: dict[str, tuple[str, Range]] = {
    "chunk_tokens": ("--doc-chunk", COUNT),
    "context": ("--doc-context", COUNT),
    "batch_docs": ("--doc-batch", COUNT),
    "rank": ("--lora-rank", COUNT),
    "alpha": ("--lora-alpha", positive()),
    "lr": ("--lora-lr", at_least(0.0, "0: score the documents without adapting")),
    "beta2": ("--lora-beta2", MOMENTUM),
    "weight_decay": ("--lora-wd", at_least(0.0)),
    "phase_lr": ("--phase-lr", at_least(0.0, "0: phases leave the base model as it is")),
    "phase_momentum": ("--phase-momentum", MOMENTUM),
    "phase_epochs": ("--phase-epochs", at_least(0, "0: no global phase training")),
    "phase_chunk_tokens": ("--phase-chunk", COUNT),
    "phase_batch_seqs": ("--phase-batch", COUNT),
    "phase_clip": ("--phase-clip", at_least(0.0, "0: no clipping")),
}


def check_eval_options(opts: EvalOptions, ttt: TTTConfig | None = None, doc_ttt: DocTTTConfig | None = None) -> None:
    """Raise ConfigError (a usage error) naming every option outside its range; ttt and doc_ttt
    default to opts'. None means the option's default (--stride, --seq-len: from the run)."""
    problems = []
    doc_ttt = doc_ttt or opts.doc_ttt
    if opts.ttt and opts.doc_ttt:
        problems.append("score-first SGD TTT (--ttt) and per-document LoRA TTT (--ttt-mode doc_lora) exclude "
                        "each other: choose one")
    if doc_ttt is not None:
        if not all(isinstance(n, int) and n >= 1 for n in doc_ttt.phases) or list(doc_ttt.phases) != sorted(
                set(doc_ttt.phases)):
            problems.append(f"--phases must be increasing positive document counts, e.g. 833,1666,2500 (none: no "
                            f"global phases), got {','.join(map(str, doc_ttt.phases))}")
        if not doc_ttt.sites or set(doc_ttt.sites) - set(SITES):
            problems.append(f"--lora-sites must name some of {','.join(SITES)}, got {','.join(doc_ttt.sites)}")
    for obj, rules in ((opts, EVAL_OPTION_RULES), (ttt or opts.ttt, TTT_OPTION_RULES), (doc_ttt, DOC_TTT_OPTION_RULES)):
        if obj is not None:
            values = {option: getattr(obj, name) for name, (option, _) in rules.items()
                      if getattr(obj, name) is not None}
            problems += range_problems(values, {option: rule for option, rule in rules.values()})
    if problems:
        raise ConfigError("invalid options:\n  " + "\n  ".join(problems))


def load_target(target: str, live: bool) -> tuple[Config, dict, Path, str]:
    """(config, state dict, folder for receipts, description) of a run directory or artifact."""
    path = Path(target)
    if path.is_dir():
        cfg = config_from_dict(read_json(RunDir(path).config)["config"])
        if live:
            ckpt = RunDir(path).latest_checkpoint()
            if ckpt is None:
                raise FileNotFoundError(f"run {path} has no checkpoint to evaluate live weights from")
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
            return cfg, state, RunDir(path).receipts, f"live weights of {ckpt}"
        artifact = RunDir(path).artifact
        if not artifact.exists():
            raise FileNotFoundError(f"run {path} has no artifact {RunDir.ARTIFACT}: it did not finish; "
                                    f"evaluate its last checkpoint with --live")
    elif path.is_file():
        if live:
            raise ValueError("--live needs a run directory, not an artifact file")
        artifact = path
    else:
        raise FileNotFoundError(f"no run directory or artifact at {target}")
    qdict, meta = read_artifact(artifact)
    if "config" not in meta:
        raise ValueError(f"artifact {artifact} carries no config; evaluate it through its run directory")
    cfg = config_from_dict(meta["config"]) if not path.is_dir() else cfg
    folder = RunDir(path).receipts if path.is_dir() else artifact.parent
    return cfg, dequantize_state_dict(qdict), folder, f"artifact {artifact}"


def use_data_dir(cfg: Config, data_dir: str | None) -> Config:
    """Point cfg at the official-format shards in data_dir (`--data`); None leaves it as is."""
    if data_dir:
        cfg.data.source, cfg.data.data_path = "shards", str(data_dir)
        cfg.data.train_pattern, cfg.data.val_pattern = "fineweb_train_*.bin", "fineweb_val_*.bin"
    return cfg


def _receipt_path(folder: Path, kind: str, given: str | None) -> Path:
    if given:
        return Path(given)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = folder / f"eval-{kind}-{stamp}.json", 1
    while path.exists():
        n += 1
        path = folder / f"eval-{kind}-{stamp}-{n}.json"
    return path


def run_eval(target: str, opts: EvalOptions, log=print, hooks: RunHooks = RunHooks()) -> dict:
    check_eval_options(opts)
    start = time.perf_counter()  # the projection counts reading and decompressing the artifact too
    cfg, state, folder, source = load_target(target, opts.live)
    use_data_dir(cfg, opts.data_dir)
    load_seconds = time.perf_counter() - start
    info = setup_distributed(opts.device)
    try:
        result = _evaluate(cfg, state, folder, source, opts, info, log if info.is_main else (lambda *_: None),
                           load_seconds)
        if info.is_main and Path(target).is_dir() and not (opts.live or opts.data_dir):
            hooks.eval_scored(Path(target), result["kind"], result, result["stride"])
        info.barrier()  # on success, no rank tears down while another still has collectives in flight
        return result
    finally:
        teardown_distributed(info)


def _evaluate(cfg: Config, state: dict, folder: Path, source: str, opts: EvalOptions, info: DistInfo, log,
              load_seconds: float = 0.0) -> dict:
    seq_len = opts.seq_len or cfg.train.train_seq_len
    # By default the run's own protocol, the stride its roundtrip was scored with (within the window).
    stride = min(cfg.train.eval_stride or seq_len, seq_len) if opts.stride is None else opts.stride
    if not 0 < stride <= seq_len:
        raise ConfigError(f"--stride must be within 1..{seq_len} (the window length), got {stride}")
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    check_vocab(tokenizer, cfg.model.vocab_size)
    val_tokens = load_validation_tokens(cfg.val_files(), seq_len)
    check_token_range(val_tokens, cfg.model.vocab_size, f"validation shards {cfg.val_files()}")
    full_targets = val_tokens.numel() - 1
    if opts.max_tokens and opts.max_tokens < full_targets:
        val_tokens = val_tokens[: max(opts.max_tokens // seq_len, 1) * seq_len + 1]
    targets = val_tokens.numel() - 1
    luts = validation_bytes(cfg, tokenizer, val_tokens.numel(), info.device)
    model = build_model(cfg.model, info.device)
    model.load_state_dict({k: v.to(info.device) for k, v in state.items()}, strict=True)
    # The compiled module shares the parameters: TTT updates and fingerprints see the same weights.
    scorer = model
    if not opts.doc_ttt and (opts.compile == "on" or (opts.compile == "auto" and info.device.type == "cuda")):
        scorer = torch.compile(model, dynamic=False)
    kind = "doc_lora" if opts.doc_ttt else "ttt" if opts.ttt else ("standard" if stride == seq_len else "sliding")
    given = " (the run's train.eval_stride)" if opts.stride is None and stride < seq_len else ""
    how = (f"context {opts.doc_ttt.context}, chunk {opts.doc_ttt.chunk_tokens}" if opts.doc_ttt else
           f"seq_len {seq_len}, stride {stride}{given}")
    log(f"eval: {source}; {kind}, {how}, {targets:,} of {full_targets:,} targets")

    if info.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if opts.doc_ttt:  # eager: its LoRA hooks and varying window lengths do not suit the compiled graph
        def doc_progress(batch: int, batches: int, phase_docs: int | None) -> None:
            if phase_docs is not None:
                log(f"doc_lora global phase on the {phase_docs} documents scored")
            elif batch % 20 == 0:
                log(f"doc_lora batch {batch}/{batches}")

        sums, receipt = run_doc_ttt(model, val_tokens, luts, opts.doc_ttt, info.device, info.rank, info.world_size,
                                    progress=doc_progress)
    elif opts.ttt:
        sums, receipt = run_ttt(model, val_tokens, luts, seq_len, stride, opts.batch_windows, opts.ttt, info.device,
                                info.rank, info.world_size,
                                progress=lambda n, total, s: log(f"ttt chunk {n}/{total}") if n % 50 == 0 else None,
                                runner=scorer)
    else:
        receipt = Receipt(kind, {"seq_len": seq_len, "stride": stride}, targets, state_fingerprint(model))
        sums = score_windows(scorer, val_tokens, window_plan(targets, seq_len, stride), luts, info.device,
                             opts.batch_windows, info.rank, info.world_size)
        receipt.add_score(0, targets, receipt.initial_state, sums.loss_sum, sums.tokens, sums.bytes)
        receipt.finalize()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = to_result(sums)
    projected = load_seconds + seconds * full_targets / targets
    receipt.info = {"source": source, "eval_seconds": round(seconds, 3), "projected_full_seconds": round(projected, 1),
                    "load_seconds": round(load_seconds, 3),
                    "world_size": info.world_size, "device": str(info.device),
                    # how the sums were accumulated, for `pgolf audit --rescore`
                    "batch_windows": opts.batch_windows, "compiled": scorer is not model, "fused_loss": False,
                    "data_dir": opts.data_dir}
    receipt_path = info.main_only(write_receipt, _receipt_path(folder, kind, opts.receipt_path), receipt)
    log(f"{kind} val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
        f"({result.tokens:,} tokens, {result.bytes:,} bytes)")
    log(f"eval_time: {seconds:.1f} s ({targets / seconds:,.0f} tokens/s) after {load_seconds:.1f} s loading the "
        f"artifact; full split projected {projected:.1f} s of the {opts.budget_seconds:.0f} s budget")
    if projected > opts.budget_seconds:
        log(f"WARNING: projected evaluation time {projected:.0f} s exceeds the {opts.budget_seconds:.0f} s budget")
    log(f"receipt: {receipt_path} (check it with `pgolf audit {receipt_path}`)")
    return {"kind": kind, "stride": stride, **result.to_dict(), "eval_seconds": seconds,
            "load_seconds": load_seconds, "projected_full_seconds": projected,
            "over_budget": projected > opts.budget_seconds, "receipt": str(receipt_path)}
