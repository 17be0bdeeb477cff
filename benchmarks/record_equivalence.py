"""pgolf's `pr549` model against PR #549's own model class: the same weights, the same logits?

    python benchmarks/record_equivalence.py --record PATH/TO/549/train_gpt.py [--seq-len 2048 512]

PATH is the record's `train_gpt.py` from openai/parameter-golf
(records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon/); keep it outside the
repository or in a git-ignored folder. The script imports it with its FlashAttention-3 call
replaced by PyTorch's SDPA (same math, CPU-capable), builds its GPT with #549's settings, gives
every parameter random values (the record's zero-initialised tables and projections would hide
the components they belong to), copies them into pgolf's `pr549` model (unstacking #549's
parameter banks into per-layer matrices) and compares fp32 logits on random tokens at each
sequence length. Lengths above 1024 exercise #549's RoPE base rescaling.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from pgolf.config.resolve import resolve_config
from pgolf.model.gpt import GPT

# #549's run command (its README) over its Hyperparameters defaults: the model's arguments.
RECORD_MODEL_ARGS = dict(vocab_size=1024, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0,
                         tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                         qk_gain_init=1.5, bigram_vocab_size=1536, bigram_dim=128, xsa_last_n=4, rope_dims=16,
                         ln_scale=True, ve_enabled=True, ve_dim=128, ve_layers="9,10")


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """FlashAttention-3's call signature ((B, T, H, D) layout, GQA by head groups) on SDPA."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def load_record(path: Path) -> types.ModuleType:
    stub = types.ModuleType("flash_attn_interface")
    stub.flash_attn_func = sdpa_flash
    sys.modules.setdefault("flash_attn_interface", stub)
    spec = importlib.util.spec_from_file_location("record_549", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn afresh: scalars near 1 (gains, mixes), tables and matrices small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.5 + 0.5 * noise.abs() if p.ndim <= 1 else 0.03 * noise)


def unbank(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """#549's stacked banks as per-layer matrices under pgolf's names; the other tensors by a
    name table (#549 name -> pgolf name)."""
    out = {}
    for i in range(layers):
        out[f"blocks.{i}.attn.c_q.weight"] = state["qo_bank"][i]
        out[f"blocks.{i}.attn.proj.weight"] = state["qo_bank"][layers + i]
        out[f"blocks.{i}.attn.c_k.weight"] = state["kv_bank"][i]
        out[f"blocks.{i}.attn.c_v.weight"] = state["kv_bank"][layers + i]
        out[f"blocks.{i}.mlp.fc.weight"] = state["mlp_up_bank"][i]
        out[f"blocks.{i}.mlp.proj.weight"] = state["mlp_down_bank"][i]
    for name, tensor in state.items():
        if not name.endswith("_bank"):
            out[RENAMES.get(name, name)] = tensor
    return out


# #549 state-dict names that pgolf spells differently (the rest are the same).
RENAMES: dict[str, str] = {
    "bigram.scale": "embed_addons.0.scale", "bigram.embed.weight": "embed_addons.0.table.weight",
    "bigram.proj.weight": "embed_addons.0.proj.weight", "smear.gate": "post_norm_addons.0.gate",
    "ve_shared.scale": "stream_addons.0.scale", "ve_shared.embed.weight": "stream_addons.0.table.weight",
    "ve_shared.proj.weight": "stream_addons.0.proj.weight",
    "ve_layer_scales.0": "blocks.9.attn.ve_scale", "ve_layer_scales.1": "blocks.10.attn.ve_scale",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True, help="PR #549's train_gpt.py")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    record = load_record(args.record)
    theirs = record.GPT(**RECORD_MODEL_ARGS).float().eval()
    randomize(theirs, args.seed)
    cfg, _ = resolve_config("pr549", [], env={})
    ours = GPT(cfg.model).float().eval()
    mapped = unbank(theirs.state_dict(), cfg.model.num_layers)
    ours_state = ours.state_dict()
    missing, unexpected = sorted(set(ours_state) - set(mapped)), sorted(set(mapped) - set(ours_state))
    if missing or unexpected:
        print(f"state dicts differ: pgolf only {missing}; #549 only {unexpected}", file=sys.stderr)
        return 1
    ours.load_state_dict({name: mapped[name].reshape(ours_state[name].shape) for name in ours_state})
    print(f"parameters: #549 {sum(p.numel() for p in theirs.parameters()):,}, "
          f"pgolf {sum(p.numel() for p in ours.parameters()):,}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    worst = 0.0
    for seq_len in args.seq_len:
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, seq_len), generator=gen)
        with torch.no_grad():
            expected = theirs.forward_logits(tokens).float()
            got = ours.logits(tokens).float()
        diff = (expected - got).abs().max().item()
        worst = max(worst, diff)
        print(f"seq_len {seq_len}: max |logit difference| {diff:.3e} (logits within ±{expected.abs().max():.2f})")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
