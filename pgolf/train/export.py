"""Export stage: quantize the trained weights, write the artifact, account its bytes, then
reload it from disk into the model and score the roundtrip (the number that is submitted)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pgolf
from pgolf.compress.accounting import SizeReport, size_report
from pgolf.compress.container import describe_artifact, pack_artifact, read_artifact, write_artifact
from pgolf.compress.policy import ExportPlan, plan_export
from pgolf.eval.windows import EvalResult
from pgolf.compress.quant import dequantize_state_dict
from pgolf.eval.receipt import Receipt, state_fingerprint, write_receipt
from pgolf.runs import RunDir
from pgolf.train.shipping import describe_code

ARTIFACT_NAME = RunDir.ARTIFACT


@dataclass
class ExportResult:
    path: Path
    size: SizeReport
    roundtrip: EvalResult
    stride: int  # window stride of the roundtrip evaluation (train_seq_len: the standard one)
    calibration: dict | None = None  # calibration_record, when GPTQ or the allocator calibrated


def artifact_meta(cfg) -> dict:
    """The metadata an artifact carries: its run id (cfg.run.run_id, set to the run directory's
    name when training starts) and the resolved config. The planner packs the same, so its
    byte estimate includes it."""
    return {"run_id": cfg.run.run_id, "config": cfg.to_dict()}


def counted_code_bytes(cfg=None) -> tuple[int, str]:
    """Counted code bytes: the exact length of the single-file ``train_gpt.py`` that
    `pgolf submit` ships for ``cfg`` (a Config or its dict; None: the default config), or,
    inside a running bundle, of that file. Returns (bytes, how they were counted)."""
    running = getattr(pgolf, "__bundle_file__", None)
    if running:  # the bundler is not shipped: a bundle counts itself
        data = Path(running).read_bytes()
        return len(data), describe_code(data, f"the length of this file, {Path(running).name}")
    from pgolf.train.bundle import code_bytes_for  # the bundler, never shipped, owns the file's form

    return code_bytes_for(cfg)


def size_to_dict(report: SizeReport) -> dict:
    return {**asdict(report), "overage": report.overage}


def quantize_for_export(model, cfg, train_files, device, code_bytes: int, log) -> ExportPlan:
    """Quantize model's weights as cfg.export asks (plan_export), logging what the plan did. Shared
    by training's export and `pgolf export` (a re-export from a checkpoint)."""
    plan = plan_export(model, cfg, train_files, device, code_bytes)
    for line in plan.lines:
        log(line)
    return plan


def pack_export(plan: ExportPlan, cfg) -> bytes:
    """The artifact's bytes: plan's tensors and artifact_meta(cfg), packed as cfg.export asks."""
    e = cfg.export
    return pack_artifact(plan.qdict, meta=artifact_meta(cfg), compressor=e.compressor, storage=e.storage,
                         layout=e.layout, row_order=e.row_order, group_backend=e.group_backend)


def describe_export(blob: bytes, log) -> dict:
    """Log the artifact's format line; returns its estimated per-component byte breakdown."""
    described = describe_artifact(blob, estimate=True)
    formats = ", ".join(f"{fmt} {n:,}" for fmt, n in described["params"].items())
    log(f"export: {described['compressor']}, storage {described['storage']}, layout "
        f"{described['layout']}: {len(blob):,} bytes; parameters by format: {formats}")
    return described["breakdown"]


def export_and_roundtrip(trainer, cfg, run_dir: Path, logger) -> ExportResult:
    """Rank 0 writes the artifact; every rank reloads it from disk and scores it."""
    info = trainer.info
    path = RunDir(run_dir).artifact

    code_bytes, code_description = counted_code_bytes(cfg)  # the length of this run's train_gpt.py
    plan = quantize_for_export(trainer.base_model, cfg, trainer.data.train_files, info.device, code_bytes,
                               logger.log)
    calibration = None
    if cfg.export.gptq or cfg.export.allocate:  # was training data read inside the budget? (optional module)
        from pgolf.train.calibration import calibration_record, log_calibration

        calibration = calibration_record(cfg, trainer.training_time_ms, plan.calibration_seconds, trainer.reserve_s)
        log_calibration(calibration, cfg, logger)

    def write() -> dict:
        blob = pack_export(plan, cfg)
        # The run directory belongs to this run alone; an artifact already in it is a stale one
        # from an attempt that stopped before finishing (a resumed run replaces it).
        write_artifact(path, blob, overwrite=True)
        return describe_export(blob, logger.log)

    breakdown = info.main_only(write)
    # The digest of the file as written: `pgolf submit` refuses an artifact that differs from it.
    report = size_report(path.stat().st_size, code_bytes, code_description, breakdown=breakdown,
                         artifact_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    qdict, _meta = read_artifact(path)
    state = {k: v.to(info.device) for k, v in dequantize_state_dict(qdict).items()}
    trainer.base_model.load_state_dict(state, strict=True)
    fingerprint = state_fingerprint(trainer.base_model)
    seq_len = cfg.train.train_seq_len
    stride = cfg.train.eval_stride or seq_len
    kind = "standard" if stride == seq_len else "sliding"
    logger.log(f"roundtrip eval: {kind} windows, seq_len {seq_len}, stride {stride} (train.eval_stride)")
    roundtrip = trainer.validate(stride=None if stride == seq_len else stride)
    receipt = Receipt(kind, {"seq_len": seq_len, "stride": stride}, roundtrip.tokens, fingerprint)
    receipt.add_score(0, roundtrip.tokens, fingerprint, roundtrip.loss_sum, roundtrip.tokens, roundtrip.bytes)
    receipt.finalize()
    # How the sums were accumulated (windows per batch, ranks, device, compiled forward), so that
    # `pgolf audit --rescore` can redo the same computation.
    receipt.info = {"source": f"artifact {path}", "world_size": info.world_size, "device": str(info.device),
                    "batch_windows": cfg.train.val_batch_size // (info.world_size * info.grad_accum_steps) // seq_len,
                    "compiled": hasattr(trainer.fast_model, "_orig_mod"), "fused_loss": bool(trainer.fused_loss)}
    # A receipt left by an attempt that stopped before finishing is replaced, like the artifact.
    receipt_path = info.main_only(write_receipt, RunDir(run_dir).roundtrip_receipt, receipt, overwrite=True)
    logger.event("final", size=size_to_dict(report), roundtrip=roundtrip.to_dict(), roundtrip_stride=stride,
                 receipt=str(receipt_path))
    return ExportResult(path, report, roundtrip, stride, calibration)
