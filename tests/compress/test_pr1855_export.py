"""PR #1855's export as pgolf options: SDClip (export.clip_rule=sdclip, k per role) and the grouped
intN of LQER's factors against float64 references written from the definitions, LQER (export.lqer_*)
through the container and the reload, the attention gates int8 per row (export.attn_gate_int8),
GPTQ of the tied embedding from the head's input (export.gptq_embedding), and every switch off
leaving the artifact's bytes as they were."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.compress.container import describe_artifact, pack_artifact, unpack_artifact
from pgolf.compress.gptq import EMBEDDING_WEIGHT, calibration_batches, collect_hessians
from pgolf.compress.lqer import add_lqer, lqer_candidates
from pgolf.compress.policy import attention_gate_names, plan_export
from pgolf.compress.quant import (LQER_A, LQER_B, SDCLIP_K, dequantize_state_dict, quantize_state_dict,
                                  sdclip_group)
from pgolf.compress.quantizers.groups import code_range, quantize_int_group
from pgolf.compress.quantizers.rows import quantize_int_per_row, sdclip_scales
from pgolf.config import Config, ConfigError, apply_overrides
from pgolf.config.checks import validate
from pgolf.data.shards import write_shard
from pgolf.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# float32 arithmetic (the record's) and float64 agree far better than this, so a float64 value
# can round to another fp16 scale or code only when it lies this close to a rounding tie.
TIE = 2.0 ** -18


def fp16_agrees(stored: torch.Tensor, raw64: torch.Tensor) -> bool:
    """fp16 ``stored`` is fp16(raw64), except where raw64 lies within TIE of an fp16 tie."""
    down, up = (raw64 * (1 - TIE)).half(), (raw64 * (1 + TIE)).half()
    stored = stored.half()
    return bool(((stored == down) | (stored == up)).all()) and int((stored != raw64.half()).sum()) <= 2


def codes_agree(codes: torch.Tensor, x64: torch.Tensor, s64: torch.Tensor, lo: int, hi: int) -> None:
    """codes = clamp(round(x / s), lo, hi), s the stored scale in float64, except at ties."""
    ratio = x64 / s64
    ref = torch.clamp(torch.round(ratio), lo, hi)
    off = codes.double() != ref
    assert bool(((ratio - ratio.floor() - 0.5).abs()[off] < TIE * ratio.abs()[off]).all())
    assert int(off.sum()) <= 2


def heavy(rows, cols, seed, scale=0.05, df=3):
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(rows, cols, df, generator=g).pow(2).sum(-1)
    return torch.randn(rows, cols, generator=g) / (chi2 / df).sqrt() * scale


# ------------------------------------------------------------------ SDClip

def ref_sdclip(w: torch.Tensor, bits: int, k: float) -> torch.Tensor:
    """k * std(row) / qmax in float64, std the sample standard deviation (n - 1), from its definition."""
    x = w.double()
    n = x.shape[1]
    mean = x.sum(1, keepdim=True) / n
    std = (((x - mean) ** 2).sum(1) / (n - 1)).sqrt()
    return k * std / (2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits,k", [(6, 11.5), (6, 13.0), (7, 14.0), (5, 12.85), (8, 3.0)])
def test_sdclip_matches_the_float64_reference(bits, k):
    for w in (heavy(96, 700, 1), torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02,
              torch.randn(33, 8, generator=torch.Generator().manual_seed(3))):  # 8 columns: n - 1 shows
        qt = quantize_int_per_row(w, bits, clip_rule="sdclip", sdclip_k=k)
        assert qt.scale.dtype == torch.float16 and torch.equal(qt.scale.float(), sdclip_scales(w, bits, k))
        raw = ref_sdclip(w, bits, k)
        assert fp16_agrees(qt.scale, raw)
        qmax = 2 ** (bits - 1) - 1
        codes_agree(qt.data, w.double(), qt.scale.double()[:, None], -qmax, qmax)
    # the population std (n) would give other scales on 8 columns: the sample one is the rule
    short = torch.randn(40, 8, generator=torch.Generator().manual_seed(4))
    pop = ref_sdclip(short, 6, 12.0) * ((8 - 1) / 8) ** 0.5
    assert not fp16_agrees(sdclip_scales(short, 6, 12.0), pop)


def test_sdclip_clips_outliers_and_refuses_what_it_cannot_do():
    w = torch.randn(16, 400, generator=torch.Generator().manual_seed(5)) * 0.1
    w[3, 7] = 5.0  # far beyond k std: clipped to the largest code
    qt = quantize_int_per_row(w, 6, clip_rule="sdclip", sdclip_k=11.5)
    assert int(qt.data[3, 7]) == 31 and float(qt.scale[3]) * 31 < 5.0
    zero = quantize_int_per_row(torch.zeros(4, 10), 6, clip_rule="sdclip", sdclip_k=11.5)
    assert bool((zero.data == 0).all()) and bool((zero.scale > 0).all())  # the record's would be NaN codes
    with pytest.raises(ValueError, match="needs its k"):
        quantize_int_per_row(w, 6, clip_rule="sdclip")
    with pytest.raises(ValueError, match="positive"):
        sdclip_scales(w, 6, 0.0)
    # without the search (export.clip_search=off) it is max-abs, as the other rules
    assert torch.equal(quantize_int_per_row(w, 6, clip_search=False, clip_rule="sdclip", sdclip_k=11.5).scale,
                       quantize_int_per_row(w, 6, clip_search=False).scale)


def state_dict():
    g = torch.Generator().manual_seed(8)
    return {
        "tok_emb.weight": torch.randn(1024, 96, generator=g) * 0.9,
        "blocks.0.attn.c_q.weight": heavy(320, 256, 9),
        "blocks.0.mlp.fc.weight": torch.randn(512, 256, generator=g) * 0.7,
        "bigram.proj.weight": torch.randn(600, 128, generator=g) * 0.1,
        "blocks.0.attn_scale": torch.rand(256, generator=g),
    }


def test_sdclip_k_by_tensor_group_in_the_state_dict():
    sd = state_dict()
    qd, _ = quantize_state_dict(sd, scheme="int6", bits_for=lambda n, t: 7 if n == "tok_emb.weight" else None,
                                clip_rule="sdclip")
    assert [sdclip_group(n) for n in sd] == ["embed", "attn", "mlp", "other", "other"]
    for name in list(sd)[:4]:
        bits = qd[name].bits
        assert torch.equal(qd[name].scale.float(), sdclip_scales(sd[name], bits, SDCLIP_K[sdclip_group(name)])), name
    custom, _ = quantize_state_dict(sd, scheme="int6", clip_rule="sdclip", sdclip_k=lambda n: 5.0)
    fc = "blocks.0.mlp.fc.weight"
    assert torch.equal(custom[fc].scale.float(), sdclip_scales(sd[fc], 6, 5.0))


# ------------------------------------------------------------------ grouped intN (LQER's factors)

@pytest.mark.parametrize("bits,group", [(2, None), (4, 64), (3, 16), (8, 32)])
def test_int_group_matches_the_float64_reference(bits, group):
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits)) * 0.3
    qt = quantize_int_group(x, bits, group)
    lo, hi = code_range(bits)
    assert (lo, hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    g = x.numel() if group is None else group
    flat = x.double().reshape(-1, g)
    raw = flat.abs().amax(1) / (2 ** (bits - 1) - 0.5)  # 1.5 for int2, 7.5 for int4
    assert qt.scale.shape == (x.numel() // g,) and fp16_agrees(qt.scale, raw)
    codes_agree(qt.data.reshape(-1, g), flat, qt.scale.double()[:, None], lo, hi)
    assert int(qt.data.min()) >= lo and int(qt.data.max()) <= hi
    if bits == 2:  # the largest |value| lands half-way (scale 1 here): -max rounds to -2, +max is clamped to 1
        assert quantize_int_group(torch.tensor([[-1.5, 0.4, 1.2]]), 2).data.tolist() == [[-2, 0, 1]]
        assert quantize_int_group(torch.tensor([[1.5, -0.4, -1.2]]), 2).data.tolist() == [[1, 0, -1]]
    with pytest.raises(ValueError, match="positive divisor"):
        quantize_int_group(x, bits, 100)


# ------------------------------------------------------------------ LQER

def quantized_state(scheme="int6"):
    sd = state_dict()
    qd, _ = quantize_state_dict(sd, scheme=scheme, clip_rule="sdclip")
    return sd, qd


def test_lqer_corrects_the_worst_tensors_with_their_error_svd():
    sd, qd = quantized_state()
    errs = lqer_candidates(sd, qd)
    # the 2-D tensors stored as per-row codes, more than 65,536 elements (the record's GPTQ'd ones)
    assert list(errs) == ["tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "bigram.proj.weight"]
    top = sorted(errs, key=lambda n: -errs[n])[:2]
    result = add_lqer(sd, qd, rank=4, top=2)
    assert list(result.errors) == top
    for name in top:
        assert list(result.qdict).index(name + LQER_A) == list(result.qdict).index(name) + 1
        a, b = result.qdict[name + LQER_A], result.qdict[name + LQER_B]
        assert (a.kind, a.bits, tuple(a.data.shape), a.scale.numel()) == ("int_group", 2, (sd[name].shape[0], 4), 1)
        assert (b.kind, b.bits, tuple(b.data.shape)) == ("int_group", 4, (4, sd[name].shape[1]))
        assert b.scale.numel() == 4 * sd[name].shape[1] // 64
        before, after = result.errors[name]
        assert before == pytest.approx(errs[name]) and after < before
    assert set(result.qdict) - set(qd) == {n + s for n in top for s in (LQER_A, LQER_B)}


def test_lqer_factors_approach_the_float64_best_rank_r_correction():
    # with wide codes the stored correction is the float64 truncated SVD of the error
    sd, qd = quantized_state()
    name = "blocks.0.mlp.fc.weight"
    result = add_lqer(sd, qd, rank=3, top=4, a_bits=8, b_bits=8, group=8)
    E = sd[name].double() - qd[name].data.double() * qd[name].scale.double()[:, None]
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    deq = dequantize_state_dict(result.qdict)[name].double()
    got = deq - qd[name].data.double() * qd[name].scale.double()[:, None]
    assert float((got - best).norm()) < 0.02 * float(best.norm())
    # and it removes (nearly) what the best rank-3 correction removes
    assert float((E - got).norm()) == pytest.approx(float((E - best).norm()), rel=1e-3)


@pytest.mark.parametrize("storage,layout", [("bytes", "plain"), ("packed", "grouped")])
def test_lqer_round_trips_through_the_container_and_the_reload(storage, layout):
    sd, qd = quantized_state()
    result = add_lqer(sd, qd, rank=4, top=3)
    blob = pack_artifact(result.qdict, {"m": 1}, compressor="zlib", storage=storage, layout=layout)
    back, _ = unpack_artifact(blob)
    assert list(back) == list(result.qdict)
    deq = dequantize_state_dict(back)
    assert list(deq) == list(sd)  # the factors are folded in, not loaded as tensors
    for name in sd:
        plain = dequantize_state_dict({name: qd[name]})[name]
        if name not in result.errors:
            assert torch.equal(deq[name], plain), name
            continue
        a, b = back[name + LQER_A], back[name + LQER_B]
        # the record's reload: W_hat + (qA * sA) @ (qB * sB), every product in float32
        qa = a.data.float() * float(a.scale)
        g = b.data.numel() // b.scale.numel()
        qb = (b.data.reshape(-1, g).float() * b.scale.float()[:, None]).reshape(b.data.shape)
        assert torch.equal(deq[name], plain + qa @ qb), name
        assert float((deq[name] - sd[name]).norm()) < float((plain - sd[name]).norm())
    assert describe_artifact(blob)["params"]["int2g"] == sum(sd[n].shape[0] * 4 for n in result.errors)


def test_lqer_falls_back_to_per_row_factors_when_the_group_does_not_divide():
    sd, qd = quantized_state()
    result = add_lqer(sd, qd, rank=3, top=1, group=7 * 64)  # 3 x cols is no multiple of 448
    (name,) = result.errors
    a, b = result.qdict[name + LQER_A], result.qdict[name + LQER_B]
    assert (a.kind, a.bits, b.kind, b.bits) == ("int_per_row", 4, "int_per_row", 4)
    assert a.scale.numel() == sd[name].shape[0] and b.scale.numel() == 3
    assert float((dequantize_state_dict(result.qdict)[name] - sd[name]).norm()) < result.errors[name][0]


def test_orphan_lqer_factors_are_refused():
    sd, qd = quantized_state()
    result = add_lqer(sd, qd, rank=2, top=1)
    (name,) = result.errors
    broken = {k: v for k, v in result.qdict.items() if k != name + LQER_B}
    with pytest.raises(ValueError, match="needs both factors"):
        dequantize_state_dict(broken)


# ------------------------------------------------------------------ through plan_export

OVERRIDES = ["model.vocab_size=512", "model.num_layers=2", "model.model_dim=256", "model.num_heads=4",
             "model.num_kv_heads=2", "model.attn_gate_dims=8", "train.train_seq_len=32", "export.gptq_seqs=4",
             "export.gptq_calibration=train_after_budget"]


def config(*extra: str) -> Config:
    cfg = Config()
    apply_overrides(cfg, OVERRIDES + list(extra))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def model_and_files(tmp_path_factory):
    cfg = config()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # trained-like: no zero-initialised gates or projections
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tokens = np.random.default_rng(0).integers(0, 512, size=4 * 32 * 4 + 1, dtype=np.int64)
    shard = write_shard(tmp_path_factory.mktemp("shards") / "fineweb_train_000000.bin", tokens)
    return model, [Path(shard)]


def plan_bytes(model, files, *extra: str) -> tuple[bytes, dict]:
    cfg = config(*extra)
    plan = plan_export(model, cfg, files, torch.device("cpu"), code_bytes=0)
    return pack_artifact(plan.qdict, {}, compressor="zlib", storage="bytes", layout="plain"), plan.qdict


def test_every_switch_off_leaves_the_artifact_bytes_alone(model_and_files):
    model, files = model_and_files
    base = ["export.scheme=int6", "export.gptq=true"]
    blob, qdict = plan_bytes(model, files, *base)
    assert not any(n.endswith((LQER_A, LQER_B)) for n in qdict)
    # the new keys with their defaults, and SDClip's ks while another clip rule is on, change nothing
    inert = ["export.lqer_rank=0", "export.lqer_top=5", "export.attn_gate_int8=false",
             "export.gptq_embedding=false", "export.sdclip_k_mlp=3.0", "export.sdclip_k_embed=2.0"]
    assert plan_bytes(model, files, *base, *inert)[0] == blob
    # and the path without any of them is the plain quantize_state_dict + GPTQ export as before
    assert qdict["blocks.0.attn.gate"].kind == "float" and qdict["blocks.0.attn.gate"].data.dtype == torch.float16


def test_pr1855_export_through_plan_export(model_and_files):
    model, files = model_and_files
    keys = ["export.scheme=int6", "export.policy=tok_emb:7", "export.clip_rule=sdclip", "export.gptq=true",
            "export.gptq_act_order=true", "export.gptq_embedding=true", "export.attn_gate_int8=true",
            "export.lqer_rank=4", "export.lqer_top=3", "export.controls=fp16"]
    blob, qd = plan_bytes(model, files, *keys)
    state = model.state_dict()
    e = config(*keys).export
    # GPTQ kept SDClip's scales (k by role), the embedding at int7 included
    for name, k, bits in (("tok_emb.weight", e.sdclip_k_embed, 7), ("blocks.0.mlp.fc.weight", e.sdclip_k_mlp, 6),
                          ("blocks.1.mlp.proj.weight", e.sdclip_k_mlp, 6)):
        assert qd[name].bits == bits and torch.equal(qd[name].scale.float(), sdclip_scales(state[name], bits, k))
    plain, _ = plan_bytes(model, files, *[k for k in keys if "gptq_embedding" not in k])
    assert plain != blob  # the embedding's codes are GPTQ's only with its Hessian
    # the attention gates: int8 per row, max|row| / 127
    assert attention_gate_names(model) == ["blocks.0.attn.gate", "blocks.1.attn.gate"]
    for name in attention_gate_names(model):
        g = qd[name]
        assert (g.kind, g.bits) == ("int_per_row", 8)
        raw = state[name].double().abs().amax(1) / 127
        assert fp16_agrees(g.scale, raw)
        codes_agree(g.data, state[name].double(), g.scale.double()[:, None], -127, 127)
    # LQER on the three tensors of largest error; the reload applies it
    assert sum(n.endswith(LQER_A) for n in qd) == 3
    back, _ = unpack_artifact(blob)
    fresh = GPT(config(*keys).model)
    fresh.load_state_dict(dequantize_state_dict(back), strict=True)


def test_embedding_hessian_is_the_head_input(model_and_files):
    model, files = model_and_files
    batches = calibration_batches(files, 32, 4, batch_seqs=2)
    hs = collect_hessians(model, batches, embedding=True)
    assert "hidden_states" not in model.__dict__  # the wrapper is gone
    with torch.no_grad():
        X = torch.cat([model.hidden_states(x).reshape(-1, 256) for x, _ in batches])
    assert torch.allclose(hs[EMBEDDING_WEIGHT], X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    assert set(hs) - {EMBEDDING_WEIGHT} == set(collect_hessians(model, batches))
    untied = GPT(config("model.tie_embeddings=false").model)
    with pytest.raises(ValueError, match="tie_embeddings"):
        collect_hessians(untied, batches, embedding=True)


def test_new_keys_are_validated_with_their_names():
    for key, value in (("export.sdclip_k_mlp", 0), ("export.lqer_rank", -1), ("export.lqer_a_bits", 1),
                       ("export.lqer_b_group", 0), ("export.clip_rule", "sd")):
        with pytest.raises(ConfigError, match=key):
            config(f"{key}={value}")
    # a switch that would do nothing names what to set
    for overrides, fix in ((["export.gptq_embedding=true"], "set export.gptq=true"),
                           (["export.gptq=true", "export.gptq_embedding=true", "model.tie_embeddings=false"],
                            "model.tie_embeddings=true"),
                           (["export.attn_gate_int8=true", "model.attn_gate_dims=0"], "set model.attn_gate_dims")):
        with pytest.raises(ConfigError, match=fix):
            config(*overrides)


def test_lqer_ships_only_with_configs_that_use_it():
    from pgolf.train.bundle import bundle_modules

    assert "pgolf.compress.lqer" not in bundle_modules(Config())
    assert "pgolf.compress.lqer" in bundle_modules(config("export.lqer_rank=4"))
    # the reload needs no optional module: the factors' kind and the folding are always shipped
    assert {"pgolf.compress.quantizers.groups", "pgolf.compress.quant"} <= set(bundle_modules(Config()))
