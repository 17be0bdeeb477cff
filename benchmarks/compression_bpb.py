"""Export schemes of one trained run: artifact bytes, bytes per parameter, roundtrip val_bpb change.

For each scheme the run's final weights are quantized through the export plan (the same code
`pgolf train` uses), packed with every compressor / storage / layout (the smallest kept),
reloaded from the packed bytes and scored on the run's validation tokens.

    python benchmarks/compression_bpb.py runs/<id> --out compression.json

benchmarks/gpu_check.py measures its compression stage with the functions below.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Callable

import torch

from pgolf.compress.container import describe_artifact, pack_artifact, unpack_artifact
from pgolf.runs import latest_checkpoint
from pgolf.compress.policy import plan_export
from pgolf.config import Config, config_from_dict
from pgolf.data.shards import load_validation_tokens, resolve_shards
from pgolf.eval.windows import evaluate_bpb
from pgolf.model.gpt import build_model
from pgolf.compress.quant import dequantize_state_dict
from pgolf.runs import read_json
from pgolf.data.tokenizer import load_tokenizer

SCHEMES = {
    "int8 (official)": {},
    "int8 + clip search": {"clip_search": "on"},
    "int6": {"scheme": "int6"},
    "int5": {"scheme": "int5"},
    "int4": {"scheme": "int4"},
    "int6 + GPTQ": {"scheme": "int6", "gptq": True},
    "int5 + GPTQ": {"scheme": "int5", "gptq": True},
    "int4 + GPTQ": {"scheme": "int4", "gptq": True},
    "attn int6 / mlp int5 + GPTQ": {"scheme": "int6", "policy": [["mlp", 5]], "gptq": True},
}


def load_trained(run: Path, device: torch.device) -> tuple[Config, torch.nn.Module]:
    """The run's config and its latest checkpoint's weights in a model on device."""
    cfg = config_from_dict(read_json(run / "config.json")["config"])
    state = torch.load(latest_checkpoint(run / "checkpoints"), map_location=device, weights_only=True)["model"]
    model = build_model(cfg.model, device)
    model.load_state_dict(state)
    return cfg, model


def validation_scorer(cfg: Config, device: torch.device, max_tokens: int = 0,
                      batch_tokens: int = 32768) -> tuple[Callable[[torch.nn.Module], float], int]:
    """A function scoring a model's val_bpb on the run's validation tokens (the first max_tokens,
    else the run's train.val_max_tokens, 0: all), and the number of targets it scores."""
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    luts = tokenizer.byte_luts(cfg.model.vocab_size).to_torch(device)
    seq_len = cfg.train.train_seq_len
    val = load_validation_tokens(cfg.val_files(), seq_len)
    cap = max_tokens or cfg.train.val_max_tokens
    if cap:
        val = val[: max(cap // seq_len, 1) * seq_len + 1]

    def score(m: torch.nn.Module) -> float:
        return evaluate_bpb(m, val, luts, seq_len, max(batch_tokens, seq_len), device).val_bpb

    return score, val.numel() - 1


def scheme_row(name: str, overrides: dict, model: torch.nn.Module, cfg: Config, train_files: list[Path],
               device: torch.device, score: Callable[[torch.nn.Module], float], base_bpb: float,
               compressor: str = "auto") -> dict:
    """Quantize model as cfg.export with `overrides` asks, pack, reload from the bytes, score."""
    c = copy.deepcopy(cfg)
    for key, value in overrides.items():
        setattr(c.export, key, value)
    plan = plan_export(model, c, train_files, device, code_bytes=0)
    blob = pack_artifact(plan.qdict, {"scheme": name}, compressor=compressor)
    info = describe_artifact(blob, estimate=True)
    qdict, _ = unpack_artifact(blob)
    reloaded = build_model(cfg.model, device)
    reloaded.load_state_dict({k: v.to(device) for k, v in dequantize_state_dict(qdict).items()})
    bpb = score(reloaded)
    quantized = sum(n for fmt, n in info["params"].items() if fmt.startswith("int"))
    params = sum(info["params"].values())
    # Compressed bytes attributed to integer codes and their scales (an estimate: the
    # payload is one stream) per integer-quantized parameter.
    int_bytes = sum(n for part, n in info["breakdown"].items() if "codes" in part or part == "scales")
    return {"scheme": name, "bytes": len(blob), "params": params, "quantized_params": quantized,
            "bytes_per_param": round(len(blob) / params, 4),
            "bytes_per_quantized_param": round(int_bytes / max(quantized, 1), 4), "compressor": info["compressor"],
            "storage": info["storage"], "layout": info["layout"], "val_bpb": round(bpb, 5),
            "delta_bpb": round(bpb - base_bpb, 5), "export_seconds": round(plan.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory with checkpoints/")
    parser.add_argument("--compressor", default="auto")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    run = Path(args.run)
    device = torch.device("cpu")
    cfg, model = load_trained(run, device)
    score, val_targets = validation_scorer(cfg, device)
    base_bpb = score(model)
    train_files = resolve_shards(cfg.train_files())
    rows = []
    for name, overrides in SCHEMES.items():
        rows.append(scheme_row(name, overrides, model, cfg, train_files, device, score, base_bpb, args.compressor))
        print(json.dumps(rows[-1]), flush=True)
    result = {"run": str(run), "unquantized_val_bpb": round(base_bpb, 5), "val_tokens": val_targets, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
