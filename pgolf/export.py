"""Export stage: quantize the trained weights, write the artifact, account its bytes, then
reload it from disk into the model and score the roundtrip (the number that is submitted)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pgolf.artifact import SizeReport, pack_artifact, read_artifact, size_report, write_artifact
from pgolf.evaluate import EvalResult
from pgolf.quant import dequantize_state_dict, quantize_state_dict
from pgolf.receipt import Receipt, state_fingerprint, write_receipt

ARTIFACT_NAME = "model.pgolf"


@dataclass
class ExportResult:
    path: Path
    size: SizeReport
    roundtrip: EvalResult


def size_to_dict(report: SizeReport) -> dict:
    return {**asdict(report), "overage": report.overage}


def export_and_roundtrip(trainer, cfg, run_dir: Path, logger) -> ExportResult:
    """Rank 0 writes the artifact; every rank reloads it from disk and scores it."""
    info = trainer.info
    path = run_dir / ARTIFACT_NAME

    def write() -> None:
        qdict, stats = quantize_state_dict(trainer.base_model.state_dict(), scheme="int8")
        meta = {"run_id": run_dir.name, "config": cfg.to_dict(), "scheme": "int8"}
        blob = pack_artifact(qdict, meta=meta, compressor=cfg.export.compressor)
        # The run directory belongs to this run alone; an artifact already in it is a stale one
        # from an attempt that stopped before finishing (a resumed run replaces it).
        write_artifact(path, blob, overwrite=True)
        logger.log(f"export: int8 + {cfg.export.compressor}: {len(blob):,} bytes "
                   f"({stats.param_count:,} params, payload {stats.payload_bytes:,} bytes before compression)")

    info.main_only(write)
    report = size_report(path.stat().st_size)
    qdict, _meta = read_artifact(path)
    state = {k: v.to(info.device) for k, v in dequantize_state_dict(qdict).items()}
    trainer.base_model.load_state_dict(state, strict=True)
    fingerprint = state_fingerprint(trainer.base_model)
    roundtrip = trainer.validate()
    seq_len = cfg.train.train_seq_len
    receipt = Receipt("standard", {"seq_len": seq_len, "stride": seq_len}, roundtrip.tokens, fingerprint)
    receipt.add_score(0, roundtrip.tokens, fingerprint, roundtrip.loss_sum, roundtrip.tokens, roundtrip.bytes)
    receipt.finalize()
    receipt.info = {"source": f"artifact {path}", "world_size": info.world_size, "device": str(info.device)}
    # A receipt left by an attempt that stopped before finishing is replaced, like the artifact.
    receipt_path = info.main_only(write_receipt, run_dir / "receipts" / "roundtrip.json", receipt, overwrite=True)
    logger.event("final", size=size_to_dict(report), roundtrip=roundtrip.to_dict(), receipt=str(receipt_path))
    return ExportResult(path, report, roundtrip)
