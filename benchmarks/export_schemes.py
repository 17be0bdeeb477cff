"""PR #1855's export pieces one at a time on a small trained model: artifact bytes, bytes per
parameter, weight reconstruction error and the roundtrip val_bpb change of SDClip
(export.clip_rule=sdclip), GPTQ, the GPTQ'd int7 embedding (export.gptq_embedding), int8 attention
gates (export.attn_gate_int8) and LQER (export.lqer_rank).

Without a run, trains one first (a few minutes on CPU): the `pr1855` preset scaled down on the shared
FineWeb sp1024 sample, wide enough (384) that attention and MLP matrices and the 1024 x 384 tied
embedding are quantized at all (only tensors of more than 65,536 elements are); no CaseOps (the
sample is sp1024 text). Each scheme is then exported from the same weights through the export plan
(pgolf.compress.policy.plan_export, the code `pgolf train` runs), packed with the run's compressor
(storage and layout "auto"), reloaded from the bytes and scored on the first --val-tokens
validation tokens (benchmarks/compression_bpb.py's measurement).

    python benchmarks/export_schemes.py                      # train the small model, then measure
    python benchmarks/export_schemes.py runs/<id> --out export_schemes.json

Columns: artifact bytes (model only, no code); bytes per parameter (artifact / all parameters);
weight MSE: mean over every parameter of (w - w_reloaded)^2; rel. error: sum (w - w_hat)^2 / sum w^2
over the tensors stored as integer codes (LQER's correction included); val_bpb of the reload and its
change from the unquantized weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compression_bpb import load_trained, validation_scorer
from pgolf.compress.container import describe_artifact, pack_artifact, unpack_artifact
from pgolf.compress.policy import plan_export
from pgolf.compress.quant import LQER_A, LQER_B, dequantize_state_dict
from pgolf.config.resolve import data_dir_overrides, resolve_config
from pgolf.data.shards import resolve_shards
from pgolf.model.gpt import build_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "fineweb_sp1024_sample"

# The small model: pr1855's stack at 4 x 384 (6/3 heads of 64, RoPE on 16), blocks 1-2 looped twice
# from 35 % of training, lanes from block 3; 120 steps of 2,048 tokens in rows of 256.
TRAIN = ["model.vocab_size=1024", "model.num_layers=4", "model.model_dim=384", "model.num_heads=6",
         "model.num_kv_heads=3", "model.xsa_layers=0,1,2,3", "model.loop_start=1", "model.loop_end=2",
         "model.loop_passes=2", "model.parallel_from=3", "model.max_span=256", "data.caseops=false",
         "train.iterations=120", "train.train_batch_tokens=2048", "train.train_seq_len=256",
         "train.val_batch_size=32768", "train.val_max_tokens=32768", "train.max_wallclock_seconds=0",
         "train.warmup_steps=0", "train.train_log_every=20", "optim.muon_momentum_warmup_steps=40",
         "ema.decay=0.95", "export.gptq=false",
         "export.gptq_seqs=64", "run.run_id=export-schemes"]

# name -> export overrides, on top of the run's export (pr1855: int6, tok_emb int7, fp16 small
# tensors, lzma). Each row adds one piece; the last is #1855's whole export.
SCHEMES = {
    "int6 row search (pgolf today, no GPTQ)": {},
    "int6 SDClip": {"clip_rule": "sdclip"},
    "int6 row search + GPTQ": {"gptq": True},
    "int6 row search + GPTQ + LQER r4 top3": {"gptq": True, "lqer_rank": 4},
    "int6 SDClip + GPTQ": {"clip_rule": "sdclip", "gptq": True},
    "  + GPTQ'd int7 embedding": {"clip_rule": "sdclip", "gptq": True, "gptq_embedding": True},
    "  + int8 attention gates": {"clip_rule": "sdclip", "gptq": True, "gptq_embedding": True, "attn_gate_int8": True},
    "  + LQER r4 top3 (#1855's export)": {"clip_rule": "sdclip", "gptq": True, "gptq_embedding": True,
                                          "attn_gate_int8": True, "lqer_rank": 4},
}
COMMON = {"gptq_act_order": True, "gptq_seqs": 64, "gptq_calibration": "train_after_budget"}


def train_small(runs_dir: Path) -> Path:
    from pgolf.train.run import run_training

    overrides = data_dir_overrides(SAMPLE, TRAIN) + TRAIN + [f"run.runs_dir={runs_dir}"]
    cfg, _ = resolve_config("pr1855", overrides, env={})
    start = time.perf_counter()
    summary = run_training(cfg, console=False)
    print(f"trained {summary['run_id']} in {time.perf_counter() - start:.0f} s: pre-quant val_bpb "
          f"{summary['pre_quant']['val_bpb']:.4f}", flush=True)
    return runs_dir / summary["run_id"]


def measure(name: str, overrides: dict, model, cfg, train_files, score, base_bpb: float) -> dict:
    c = copy.deepcopy(cfg)
    for key, value in {**COMMON, **overrides}.items():
        setattr(c.export, key, value)
    plan = plan_export(model, c, train_files, torch.device("cpu"), code_bytes=0)
    blob = pack_artifact(plan.qdict, {}, compressor=c.export.compressor)
    qdict, _ = unpack_artifact(blob)
    state = dequantize_state_dict(qdict)
    reloaded = build_model(cfg.model, torch.device("cpu"))
    reloaded.load_state_dict(state, strict=True)
    ref = model.state_dict()
    params = sum(t.numel() for t in ref.values())
    sq = sum(float((ref[n].double() - state[n].double()).square().sum()) for n in ref)
    coded = [n for n, qt in qdict.items() if qt.kind in ("int_per_row", "int8_per_row")
             and not n.endswith((LQER_A, LQER_B))]
    rel = (sum(float((ref[n].double() - state[n].double()).square().sum()) for n in coded)
           / sum(float(ref[n].double().square().sum()) for n in coded))
    bpb = score(reloaded)
    info = describe_artifact(blob)
    return {"scheme": name.strip(), "bytes": len(blob), "params": params, "bytes_per_param": len(blob) / params,
            "weight_mse": sq / params, "rel_error_coded": rel, "val_bpb": bpb, "delta_bpb": bpb - base_bpb,
            "params_by_format": info["params"], "export_seconds": plan.seconds, "lines": plan.lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run directory with checkpoints/ (default: train the small model)")
    parser.add_argument("--runs-dir", help="where to train it (default: a temporary directory)")
    parser.add_argument("--val-tokens", type=int, default=32768, help="validation tokens scored per scheme")
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="pgolf-export-schemes-") as tmp:
        run = Path(args.run) if args.run else train_small(Path(args.runs_dir or tmp))
        cfg, model = load_trained(run, torch.device("cpu"))
        score, targets = validation_scorer(cfg, torch.device("cpu"), args.val_tokens)
        base = score(model)
        train_files = resolve_shards(cfg.train_files())
        print(f"{run}: {sum(p.numel() for p in model.parameters()):,} parameters, unquantized val_bpb {base:.4f} "
              f"on {targets:,} tokens; compressor {cfg.export.compressor}", flush=True)
        rows = []
        for name, overrides in SCHEMES.items():
            rows.append(measure(name, overrides, model, cfg, train_files, score, base))
            r = rows[-1]
            print(f"{name:<40} {r['bytes']:>10,} {r['bytes_per_param']:>7.4f} {r['weight_mse']:>10.3e} "
                  f"{r['rel_error_coded']:>10.3e} {r['val_bpb']:>8.4f} {r['delta_bpb']:>+8.4f}  "
                  f"({r['export_seconds']:.0f} s)", flush=True)
    print(f"\n| scheme | artifact bytes | bytes/param | weight MSE | rel. error (coded) | val_bpb | Δ val_bpb |\n"
          f"|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['bytes']:,} | {r['bytes_per_param']:.4f} | {r['weight_mse']:.3e} | "
              f"{r['rel_error_coded']:.3e} | {r['val_bpb']:.4f} | {r['delta_bpb']:+.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "unquantized_val_bpb": base, "val_tokens": targets,
                                              "rows": rows}, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
