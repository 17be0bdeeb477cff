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

    python benchmarks/record_equivalence.py --kind pr1855 --record PATH/TO/1855/train_gpt.py

The same for PR #1855 (the 1.06108 record, records/track_10min_16mb/..._LQER_SparseGate_...) against
pgolf's `pr1855` preset. Its imports of FlashAttention-3 (plain and varlen) and Triton are stubbed:
plain attention is SDPA, the varlen call SDPA per cu_seqlens segment, the Triton kernels (fused
softcapped CE, fused LeakyReLU^2 MLP) are training-only and never reached in eval mode. It is
compared with the depth-recurrence loop on (record `looping_active`, pgolf `model.looping`), then
off (the plain U-Net of the first 35 % of training), on random tokens without BOS (id 1); then on
tokens with BOS inside, plain causal on both sides (the BOS-masked SmearGate; attention crosses the
documents there on both, as neither is given cu_seqlens); then the record's varlen path with one
segment per row against pgolf's plain causal attention.
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


def unbank(state: dict[str, torch.Tensor], layers: int, renames=None) -> dict[str, torch.Tensor]:
    """#549's stacked banks as per-layer matrices under pgolf's names; the other tensors by a
    name table (#549 name -> pgolf name; `renames`, default RENAMES). #1855 banks the same way."""
    renames = RENAMES if renames is None else renames
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
            out[renames(name) if callable(renames) else renames.get(name, name)] = tensor
    return out


# #549 state-dict names that pgolf spells differently (the rest are the same).
RENAMES: dict[str, str] = {
    "bigram.scale": "embed_addons.0.scale", "bigram.embed.weight": "embed_addons.0.table.weight",
    "bigram.proj.weight": "embed_addons.0.proj.weight", "smear.gate": "post_norm_addons.0.gate",
    "ve_shared.scale": "stream_addons.0.scale", "ve_shared.embed.weight": "stream_addons.0.table.weight",
    "ve_shared.proj.weight": "stream_addons.0.proj.weight",
    "ve_layer_scales.0": "blocks.9.attn.ve_scale", "ve_layer_scales.1": "blocks.10.attn.ve_scale",
}


def pgolf_twin(theirs: torch.nn.Module, preset: str, label: str, renames=None):
    """pgolf's model of `preset` holding the record model's weights (banks unstacked), or None
    (after saying why) when the two state dicts do not name the same tensors."""
    cfg, _ = resolve_config(preset, [], env={})
    ours = GPT(cfg.model).float().eval()
    mapped = unbank(theirs.state_dict(), cfg.model.num_layers, renames=renames)
    ours_state = ours.state_dict()
    missing, unexpected = sorted(set(ours_state) - set(mapped)), sorted(set(mapped) - set(ours_state))
    if missing or unexpected:
        print(f"state dicts differ: pgolf only {missing}; {label} only {unexpected}", file=sys.stderr)
        return None
    ours.load_state_dict({name: mapped[name].reshape(ours_state[name].shape) for name in ours_state})
    print(f"parameters: {label} {sum(p.numel() for p in theirs.parameters()):,}, "
          f"pgolf {sum(p.numel() for p in ours.parameters()):,}")
    return ours, cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("pr549", "pr1855"), default="pr549", help="which record (default pr549)")
    parser.add_argument("--record", type=Path, required=True, help="the record's train_gpt.py")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "pr1855":
        return main_1855(args)
    record = load_record(args.record)
    theirs = record.GPT(**RECORD_MODEL_ARGS).float().eval()
    randomize(theirs, args.seed)
    twin = pgolf_twin(theirs, "pr549", "#549")
    if twin is None:
        return 1
    ours, cfg = twin
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


# ------------------------------------------------------------------------------------------
# PR #1855
# ------------------------------------------------------------------------------------------

# #1855's run command (its README) over its Hyperparameters defaults: what its GPT reads.
RECORD_1855_ARGS = dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
                        tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                        rope_dims=16, rope_yarn=False, rope_train_seq_len=2048, train_seq_len=2048, ln_scale=True,
                        qk_gain_init=5.0, xsa_last_n=11, skip_gates_enabled=True, num_loops=2, loop_start=3,
                        loop_end=5, parallel_start_layer=8, parallel_final_lane="mean", fused_ce_enabled=False,
                        attn_out_gate_enabled=False, attn_out_gate_src="proj", gated_attn_enabled=False,
                        gated_attn_init_std=0.01, sparse_attn_gate_enabled=True, sparse_attn_gate_init_std=0.0,
                        sparse_attn_gate_scale=0.5, gate_window=12, smear_gate_enabled=True)
BOS = 1


def sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=0, max_seqlen_k=0, causal=True,
                window_size=(-1, -1)):
    """FlashAttention-3's varlen call ((total, H, D), one causal segment per cu_seqlens span) on SDPA."""
    assert causal and tuple(window_size) == (-1, -1) and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds = cu_seqlens_q.tolist()
    return torch.cat([sdpa_flash(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(bounds, bounds[1:])
                      if b > a])


class _Anything(types.ModuleType):
    """A stand-in module whose every attribute exists (tl.constexpr in the kernels' annotations)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object


def load_record_1855(path: Path) -> types.ModuleType:
    flash = types.ModuleType("flash_attn_interface")
    flash.flash_attn_func, flash.flash_attn_varlen_func = sdpa_flash, sdpa_varlen
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
    triton.cdiv = lambda a, b: -(-a // b)
    language, tools, descriptor = _Anything("triton.language"), types.ModuleType("triton.tools"), \
        types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = object
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    saved = {name: sys.modules.get(name) for name in
             ("flash_attn_interface", "triton", "triton.language", "triton.tools", "triton.tools.tensor_descriptor")}
    sys.modules.update({"flash_attn_interface": flash, "triton": triton, "triton.language": language,
                        "triton.tools": tools, "triton.tools.tensor_descriptor": descriptor})
    # The record's module-level @torch.compile (its Newton-Schulz) would import torch's compiler
    # stack, which probes a module named triton: compile is the identity while it loads.
    compile_ = torch.compile
    torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
    try:
        spec = importlib.util.spec_from_file_location("record_1855", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        torch.compile = compile_
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    module.BOS_ID = BOS  # set by its data loaders (to 1) before any forward
    return module


def rename_1855(name: str) -> str:
    """#1855 state-dict names (banks aside) under pgolf's."""
    fixed = {"parallel_post_lambdas": "lane_post", "parallel_resid_lambdas": "lane_resid",
             "smear_gate.weight": "embed_addons.0.gate", "smear_lambda": "embed_addons.0.lam"}
    if name in fixed:
        return fixed[name]
    return name.replace(".attn.attn_gate_w", ".attn.gate")


def main_1855(args) -> int:
    record = load_record_1855(args.record)
    theirs = record.GPT(types.SimpleNamespace(**RECORD_1855_ARGS)).float().eval()
    randomize(theirs, args.seed)
    twin = pgolf_twin(theirs, "pr1855", "#1855", renames=rename_1855)
    if twin is None:
        return 1
    ours, cfg = twin
    gen = torch.Generator().manual_seed(args.seed + 1)
    worst = 0.0

    def compare(label: str, tokens: torch.Tensor, varlen: bool = False) -> None:
        nonlocal worst
        with torch.no_grad():
            if varlen:  # one packed row per call; cu_seqlens at its start and at every BOS in it
                rows = []
                for row in tokens:
                    starts = torch.cat([torch.tensor([0]), (row == BOS).nonzero().flatten(), torch.tensor([row.numel()])])
                    cu = torch.unique(starts).to(torch.int32)
                    rows.append(theirs.forward_logits(row[None], cu_seqlens=cu, max_seqlen=int(cu.diff().max())))
                expected = torch.cat(rows).float()
            else:
                expected = theirs.forward_logits(tokens).float()
            got = ours.logits(tokens).float()
        diff = (expected - got).abs().max().item()
        worst = max(worst, diff)
        print(f"{label}: max |logit difference| {diff:.3e} (logits within ±{expected.abs().max():.2f})")

    for looping in (True, False):
        theirs.looping_active, ours.looping = looping, looping
        state = "loop on (17 block applications)" if looping else "loop off (plain 11-block U-Net)"
        for seq_len in args.seq_len:
            no_bos = torch.randint(BOS + 1, cfg.model.vocab_size, (args.batch, seq_len), generator=gen)
            compare(f"{state}, seq_len {seq_len}, no BOS", no_bos)
        seq_len = args.seq_len[-1]
        with_bos = torch.randint(BOS + 1, cfg.model.vocab_size, (args.batch, seq_len), generator=gen)
        with_bos[torch.rand(with_bos.shape, generator=gen) < 0.02] = BOS
        with_bos[:, seq_len // 2] = BOS
        compare(f"{state}, seq_len {seq_len}, BOS inside ({int((with_bos == BOS).sum())}), record varlen at each BOS",
                with_bos, varlen=True)
        compare(f"{state}, seq_len {args.seq_len[0]}, no BOS, record varlen (one segment)",
                torch.randint(BOS + 1, cfg.model.vocab_size, (args.batch, args.seq_len[0]), generator=gen), varlen=True)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
