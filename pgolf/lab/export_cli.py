"""`pgolf export RUN`: re-export a run's artifact from its last checkpoint into a new file.

The weights come from the run's newest checkpoint (for a finished run: the exported weights,
EMA applied), the settings from its saved config, with `export.*` keys overridable
(export.scheme=int6, export.compressor=lzma, ...). The quantize/pack steps are training's own
(pgolf.train.export). The new artifact never replaces a file: by default it goes to
`<run>/exports/model-<UTC time>.pgolf`, and never to the run's model.pgolf. Nothing is scored
unless --eval, which scores the new artifact's roundtrip on the run's validation data as
`pgolf eval` does.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
from datetime import datetime, timezone
from pathlib import Path

from pgolf.config import ConfigError, apply_overrides, config_from_dict
from pgolf.config.checks import validate
from pgolf.rules import EXIT_OK, EXIT_OVER_CAP
from pgolf.runs import RunDir, RunError, checkpoint_step, find_run_dir, read_json
from pgolf.runtime.files import atomic_write

EXPORTS_DIR = "exports"  # inside a run directory: artifacts re-exported by `pgolf export`
OVERRIDABLE = "export."


def export_overrides(overrides: list[str]) -> list[str]:
    """The overrides, each `export.key=value`; anything else is refused (ConfigError)."""
    refused = [o for o in overrides if not o.strip().startswith(OVERRIDABLE)]
    if refused:
        raise ConfigError(
            f"pgolf export overrides only export.* keys (how the trained weights are quantized and packed); "
            f"refused: {', '.join(refused)}. The weights are fixed by the run's checkpoint: to change model, "
            f"data or training settings, train a new run with `pgolf train ... {refused[0]}`")
    return overrides


def default_export_path(run_dir: Path, now: datetime | None = None) -> Path:
    """`<run>/exports/model-<UTC time>.pgolf`, with -2, -3, ... when that name is taken."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    folder = Path(run_dir) / EXPORTS_DIR
    path, n = folder / f"model-{stamp}.pgolf", 1
    while path.exists():
        n += 1
        path = folder / f"model-{stamp}-{n}.pgolf"
    return path


def check_out_path(run_dir: Path, out: Path) -> None:
    """Refuse (ConfigError) an output that exists or is the run's own artifact."""
    if out.resolve() == RunDir(run_dir).artifact.resolve():
        raise ConfigError(f"--out {out} is the run's own artifact, which `pgolf export` never replaces; "
                          f"choose a new file (default: {Path(run_dir) / EXPORTS_DIR}/model-<time>.pgolf)")
    if out.exists():
        raise ConfigError(f"--out {out} already exists and is never overwritten; choose a new file name "
                          f"(or omit --out for a fresh one under {Path(run_dir) / EXPORTS_DIR}/)")


def write_new_file(path: Path, blob: bytes) -> None:
    """Write blob to path, which must not exist (nor appear meanwhile): never replaced, never half-written."""
    try:
        atomic_write(path, blob, replace=False)
    except FileExistsError:
        raise ConfigError(f"{path} appeared while exporting and is never overwritten; run again") from None


def reexport(run: str, out: str | None = None, overrides: list[str] | tuple = (), runs_dir: str = "runs",
             device: str = "auto", log=print) -> dict:
    """Re-export `run`'s last checkpoint into a new artifact; returns its path, the export
    settings used and the size report (pgolf.compress.accounting.SizeReport)."""
    import torch

    from pgolf.compress.accounting import size_report
    from pgolf.model.gpt import build_model
    from pgolf.runtime.distributed import pick_device
    from pgolf.train.export import counted_code_bytes, describe_export, pack_export, quantize_for_export

    export_overrides(list(overrides))
    try:
        run_dir = find_run_dir(run, runs_dir)
    except RunError as exc:
        raise ConfigError(str(exc)) from None
    saved = config_from_dict(read_json(RunDir(run_dir).config)["config"])
    cfg = copy.deepcopy(saved)
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    if not cfg.run.run_id:
        cfg.run.run_id = run_dir.name  # the artifact's meta names its run, as training's does
    path = Path(out) if out else default_export_path(run_dir)
    check_out_path(run_dir, path)
    ckpt = RunDir(run_dir).latest_checkpoint()
    if ckpt is None:
        raise RunError(f"run {run_dir} has no checkpoint to export from; continue it with "
                       f"`pgolf train --resume {run_dir}` or train it again")
    status = RunDir(run_dir).read_summary().get("status")
    if status not in ("done", "over_cap"):
        log(f"note: run {run_dir.name} did not finish (status: {status or 'no summary'}); {ckpt.name} holds its "
            f"training weights at step {checkpoint_step(ckpt)}, without the end-of-training steps (EMA, QAT off) "
            f"that a finished run exports")

    dev = pick_device(device, 0)
    model = build_model(cfg.model, dev)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=True)
    changed = {k: v for k, v in vars(cfg.export).items() if vars(saved.export)[k] != v}
    log(f"export: run {run_dir.name}, weights from {ckpt.name}; export settings: "
        + (", ".join(f"export.{k}={v}" for k, v in changed.items()) + " (the rest as the run)" if changed
           else "the run's own"))

    code_bytes, code_description = counted_code_bytes(cfg)
    plan = quantize_for_export(model, cfg, _calibration_files(cfg, log), dev, code_bytes, log)
    blob = pack_export(plan, cfg)
    write_new_file(path, blob)
    breakdown = describe_export(blob, log)
    report = size_report(len(blob), code_bytes, code_description, breakdown=breakdown,
                         artifact_sha256=hashlib.sha256(blob).hexdigest())
    for line in report.lines():
        log(line)
    log(f"artifact: {path} ({'fits' if report.fits else 'OVER'} the {report.cap:,}-byte cap)")
    return {"path": path, "run_dir": run_dir, "checkpoint": ckpt, "config": cfg, "changed": changed,
            "size": report}


def _calibration_files(cfg, log) -> list[Path]:
    """The run's training shards, for GPTQ / the bit allocator (which calibrate on them); none
    are read otherwise."""
    if not (cfg.export.gptq or cfg.export.allocate) or cfg.export.gptq_calibration == "self_generated":
        return []
    log("note: this re-export calibrates on the training shards after training, which records rule out; "
        "export.gptq_calibration=self_generated reads none")
    from pgolf.data.shards import resolve_shards

    if cfg.data.source == "synthetic":
        from pgolf.data.synthetic import ensure_synthetic_corpus

        ensure_synthetic_corpus(cfg.data, log=log)
    try:
        return resolve_shards(cfg.train_files())
    except FileNotFoundError as exc:
        raise RunError(f"export.gptq / export.allocate calibrate on the run's training shards, which are not "
                       f"here ({exc}); make them available at {cfg.train_files()} or export without them") from None


def score_export(path: Path, cfg, device: str = "auto", log=print) -> dict:
    """Score the artifact's roundtrip as training does (the run's validation tokens, window stride
    train.eval_stride) with `pgolf eval`'s machinery; the receipt goes beside the artifact."""
    from pgolf.eval.run import EvalOptions, run_eval

    opts = EvalOptions(stride=cfg.train.eval_stride or None, max_tokens=cfg.train.val_max_tokens, device=device)
    return run_eval(str(path), opts, log=log)


def cmd_export(args: argparse.Namespace) -> int:
    result = reexport(args.run, args.out, args.overrides, args.runs_dir, args.device)
    if args.eval:
        scored = score_export(result["path"], result["config"], args.device)
        print(f"roundtrip of {result['path'].name}: val_loss {scored['val_loss']:.8f} val_bpb {scored['val_bpb']:.8f}")
    return EXIT_OK if result["size"].fits else EXIT_OVER_CAP


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="re-export a run's artifact from its last checkpoint into a new file (export.* overridable)",
        description="Quantize and pack the run's last checkpoint again, with the run's export settings or "
                    "export.* overrides, into a new file (never over an existing one, never over the run's "
                    "model.pgolf); prints the size report. Exit status 3 when it is over the cap.")
    p.add_argument("run", help="run id or run directory")
    p.add_argument("overrides", nargs="*", metavar="export.key=value",
                   help="override export settings, e.g. export.scheme=int6 export.compressor=lzma")
    p.add_argument("--out", default=None, metavar="PATH",
                   help=f"the new artifact (default: <run>/{EXPORTS_DIR}/model-<UTC time>.pgolf); must not exist")
    p.add_argument("--eval", action="store_true",
                   help="also score the new artifact's roundtrip on the run's validation data (receipt beside it)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--runs-dir", default="runs", help="where run ids are looked up (default runs)")
    p.set_defaults(handler=cmd_export)
