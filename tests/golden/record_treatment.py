"""Record (or check) how every parameter is treated, for the baseline and the shapes the presets
use: optimizer and learning rate, CUDA training dtype, export storage at int8 and int6, QAT
eligibility and planner component. Recorded before parameter roles replaced name patterns;
tests/test_golden_baseline.py keeps the role-derived treatment equal to it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pgolf.config import Config, apply_overrides
from pgolf.model.gpt import GPT, build_model
from pgolf.train.optim import build_optimizers
from pgolf.lab.plan import component_of
from pgolf.train.qat import qat_layers
from pgolf.compress.quant import quantize_state_dict
from pgolf.model.roles import export_treatment

GOLDEN = Path(__file__).with_name("treatment.json")
SHAPES = {
    "baseline": [],
    "untied_head": ["model.tie_embeddings=false", "model.num_layers=4"],
    "recurrence_swiglu": ["model.recurrence=2", "model.mlp=swiglu", "model.num_layers=5"],
    "middle_cycle": ["model.num_layers=5", "model.cycle_stem=1", "model.cycle_core=3", "model.cycle_repeats=2",
                     "model.cycle_tail=1"],
}


def _cuda_dtype(cfg: Config) -> dict[str, str]:
    """build_model's CUDA casting (bf16 body, fp32 linears and controls), replayed on CPU."""
    class FakeCuda:
        type = "cuda"

    move = GPT.to
    GPT.to = lambda self, device: self  # stay on CPU; only the casting is replayed
    try:
        model = build_model(cfg.model, FakeCuda())
    finally:
        GPT.to = move
    return {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters()}


def treatment(overrides: list[str]) -> dict[str, dict]:
    cfg = Config()
    apply_overrides(cfg, overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opts = build_optimizers(model, cfg.optim, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict] = {n: {} for n in names.values()}
    for opt_name in ("adam_token", "muon", "adam_scalar", "adam_head"):
        opt = getattr(opts, opt_name)
        for group in (opt.param_groups if opt is not None else []):
            for p in group["params"]:
                assert "optimizer" not in out[names[id(p)]], names[id(p)]
                out[names[id(p)]].update(optimizer=opt_name, lr=group["base_lr"])
    dtypes = _cuda_dtype(cfg)
    roles = export_treatment(model)  # the export reads roles (recorded: the official name patterns)
    int8 = quantize_state_dict(model.state_dict(), roles=roles)[0]
    int6 = quantize_state_dict(model.state_dict(), scheme="int6", clip_search=False, roles=roles)[0]
    qat = {n + ".weight" for n, _ in qat_layers(model, cfg.qat.pattern)}
    for name, p in model.named_parameters():
        out[name].update(cuda_dtype=dtypes[name], int8=[int8[name].kind, str(int8[name].data.dtype), int8[name].orig_dtype],
                         int6=[int6[name].kind, str(int6[name].data.dtype), int6[name].orig_dtype, int6[name].bits],
                         qat=name in qat, component=component_of(model, name, p))
    return out


def measure() -> dict:
    return {shape: treatment(overrides) for shape, overrides in SHAPES.items()}


if __name__ == "__main__":
    result = measure()
    print(json.dumps(result["baseline"], indent=1)[:3000])
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
