"""PR #549's export as pgolf options: its int6 clip rule (export.clip_rule=percentile) against a
float64 reference written from the definition, fp16 controls (export.controls), lzma preset 6
(export.compressor=lzma6), the int8 default of embedding tables under narrower schemes, and the
[export] block that reproduces the record's export."""

import lzma
import math
import tomllib
from pathlib import Path

import pytest
import torch

from pgolf.compress.container import COMPRESSOR_ORDER, describe_artifact, pack_artifact, unpack_artifact
from pgolf.compress.policy import plan_export
from pgolf.compress.quant import dequantize_state_dict, quantize_state_dict
from pgolf.compress.quantizers.rows import PERCENTILE_CANDIDATES, percentile_scales, quantize_int_per_row
from pgolf.config import Config, ConfigError, ModelConfig, apply_mapping
from pgolf.config.checks import validate
from pgolf.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# The record's export, in pgolf's words (README "Compression" quotes this block).
PR549_EXPORT = r"""
[export]
scheme = "int8"
policy = [['\.attn\.|\.mlp\.', 6]]
clip_rule = "percentile"
controls = "fp16"
compressor = "lzma6"
"""


# ------------------------------------------------------------------ the reference, in float64

# The rule runs in float32 (the record's t.float()); float64 agrees with it to far better than this,
# so a float64 value can only round to another fp16 scale or code when it lies this close to a tie.
TIE = 2.0 ** -18


def ref_candidates(w: torch.Tensor, bits: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per candidate p: (unrounded scales, fp16 scales, whole-tensor MSE), from the definition:
    clip_r = linear-interpolated p-quantile of |w_r| (p = 1: the max) at the rank p * (n - 1) as
    the record's torch.quantile of float32 weights computes it (in float32: that rounding moves
    a heavy-tailed clip by ~1e-5), scale = fp16(max(clip/qmax, 1/qmax)),
    codes = clamp(round(w / scale), -qmax, qmax); MSE = mean((codes * scale - w)^2)."""
    qmax = 2 ** (bits - 1) - 1
    x = w.double()
    srt = x.abs().sort(dim=1).values
    n = x.shape[1]
    out = []
    for p in (0.999, 0.9995, 0.9999, 0.99999, 1.0):
        pos = float(torch.tensor(p, dtype=torch.float32) * (n - 1))
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        clip = srt[:, lo] + (srt[:, hi] - srt[:, lo]) * (pos - lo)
        raw = torch.maximum(clip / qmax, torch.full_like(clip, 1.0 / qmax))
        s = raw.half().double()
        q = torch.clamp(torch.round(x / s[:, None]), -qmax, qmax)
        out.append((raw, s, float(((q * s[:, None] - x) ** 2).mean())))
    return out


def ref_best(w, bits):
    cands = ref_candidates(w, bits)
    return min(range(len(cands)), key=lambda i: (cands[i][2], i)), cands


def agrees(scale: torch.Tensor, raw: torch.Tensor) -> bool:
    """``scale`` (fp16) is fp16(raw), except where raw lies within TIE of an fp16 rounding tie."""
    down, up = (raw * (1 - TIE)).half(), (raw * (1 + TIE)).half()
    scale = scale.half()
    return bool(((scale == down) | (scale == up)).all()) and int((scale != raw.half()).sum()) <= 2


def check_against_reference(w, bits, scale, codes) -> int:
    """The implementation's scales are one candidate's (for every row), the candidate of least
    whole-tensor MSE; its codes are round(w / scale) clamped. Returns the candidate's index."""
    best, cands = ref_best(w, bits)
    chosen = [i for i, (raw, _, _) in enumerate(cands) if agrees(scale, raw)]
    assert chosen, "the scales are no single candidate's"
    assert best in chosen or cands[chosen[0]][2] <= cands[best][2] * (1 + 1e-6), (chosen, best)
    qmax = 2 ** (bits - 1) - 1
    ratio = w.double() / scale.double()[:, None]
    ref = torch.clamp(torch.round(ratio), -qmax, qmax)
    off = codes.double() != ref
    assert bool(((ratio - ratio.floor() - 0.5).abs()[off] < TIE * ratio.abs()[off]).all())
    assert int(off.sum()) <= 2
    return best if best in chosen else chosen[0]


def heavy(rows, cols, seed, scale=0.5, df=3):
    """Student-t(df) samples times ``scale``: outliers make clipping pay."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(rows, cols, df, generator=g).pow(2).sum(-1)
    return torch.randn(rows, cols, generator=g) / (chi2 / df).sqrt() * scale


CASES = {
    "gaussian": lambda: torch.randn(96, 700, generator=torch.Generator().manual_seed(1)) * 0.8,
    "student-t": lambda: heavy(96, 700, 2),
    "uniform": lambda: (torch.rand(64, 900, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 3.0,
    "heavy and light rows": lambda: torch.cat([heavy(40, 512, 4, scale=2.0),
                                               torch.randn(40, 512, generator=torch.Generator().manual_seed(5)) * 0.9]),
}


def test_percentile_rule_matches_the_float64_reference():
    winners = set()
    for bits in (6, 4, 8):
        for case, make in CASES.items():
            w = make()
            qt = quantize_int_per_row(w, bits, clip_rule="percentile")
            assert qt.scale.dtype == torch.float16 and torch.equal(qt.scale.float(), percentile_scales(w, bits))
            winners.add(check_against_reference(w, bits, qt.scale, qt.data))
            assert int(qt.data.abs().max()) <= 2 ** (bits - 1) - 1
    assert len(winners) >= 3, f"winners {winners}: the MSE choice is hardly exercised"


def test_one_candidate_for_the_whole_tensor_by_whole_tensor_mse():
    # Rows whose own best quantile differs: the rule still picks one p for all of them.
    g = torch.Generator().manual_seed(6)
    w = torch.cat([heavy(48, 600, 5, scale=1.5), torch.rand(48, 600, generator=g) * 4 - 2])
    best, cands = ref_best(w, 6)
    per_row = torch.stack([((torch.round(w.double() / s[:, None]).clamp(-31, 31) * s[:, None] - w.double()) ** 2)
                           .sum(1) for _, s, _ in cands]).argmin(0)
    assert len(set(per_row.tolist())) > 1  # a per-row choice would mix candidates
    qt = quantize_int_per_row(w, 6, clip_rule="percentile")
    assert check_against_reference(w, 6, qt.scale, qt.data) == best
    assert len(PERCENTILE_CANDIDATES) == 5 and PERCENTILE_CANDIDATES[-1] == 1.0


def test_scale_floor_binds_for_tiny_weights():
    g = torch.Generator().manual_seed(7)
    tiny = torch.randn(80, 300, generator=g) * 0.01  # every row's max is far below 1.0
    floor = torch.tensor(1.0 / 31).half()
    s = percentile_scales(tiny, 6)
    assert torch.equal(s, floor.float().expand(80))
    qt = quantize_int_per_row(tiny, 6, clip_rule="percentile")
    check_against_reference(tiny, 6, qt.scale, qt.data)
    # mixed: only the tiny rows sit on the floor
    w = torch.cat([tiny, torch.randn(80, 300, generator=g) * 2.0])
    qt = quantize_int_per_row(w, 6, clip_rule="percentile")
    check_against_reference(w, 6, qt.scale, qt.data)
    assert bool((qt.scale[:80] == floor).all()) and bool((qt.scale[80:] > floor).all())


def test_percentile_needs_the_search_and_a_known_rule():
    w = torch.randn(8, 40)
    plain = quantize_int_per_row(w, 6, clip_search=False, clip_rule="percentile")
    assert torch.equal(plain.scale, quantize_int_per_row(w, 6, clip_search=False).scale)  # max-abs
    with pytest.raises(ValueError, match="clip rule must be one of row_search, percentile"):
        quantize_int_per_row(w, 6, clip_rule="quantile")
    with pytest.raises(ValueError, match="clip_rule must be one of"):
        quantize_state_dict({"w": w}, clip_rule="nope")
    with pytest.raises(ValueError, match="controls must be one of fp32, fp16"):
        quantize_state_dict({"w": w}, controls="bf16")


# ------------------------------------------------------------------ through the container

def state_dict():
    g = torch.Generator().manual_seed(8)
    return {
        "tok_emb.weight": torch.randn(1024, 96, generator=g) * 0.9,
        "blocks.0.attn.c_q.weight": heavy(320, 256, 9),
        "blocks.0.mlp.fc.weight": torch.randn(512, 256, generator=g) * 0.7,
        "blocks.0.attn_scale": torch.rand(256, generator=g),
        "blocks.0.attn.q_gain": torch.full((4,), 1.5),
        "bigram.proj.weight": torch.randn(256, 128, generator=g) * 0.1,  # 32,768: small, fp16
    }


@pytest.mark.parametrize("compressor", ["lzma6", "zlib"])
def test_roundtrip_dequantizes_to_codes_times_scales(compressor):
    sd = state_dict()
    qd, _ = quantize_state_dict(sd, scheme="int6", clip_rule="percentile")
    blob = pack_artifact(qd, {"t": 1}, compressor=compressor, storage="auto", layout="auto")
    back, meta = unpack_artifact(blob)
    deq = dequantize_state_dict(back)
    for name in ("blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight"):
        q, s = back[name].data, back[name].scale
        assert back[name].kind == "int_per_row" and back[name].bits == 6
        assert torch.equal(q, qd[name].data) and torch.equal(s, qd[name].scale)
        check_against_reference(sd[name], 6, s, q)
        assert torch.equal(deq[name].double(), q.double() * s.double()[:, None])
    assert back["tok_emb.weight"].kind == "int8_per_row"  # the embedding stays int8 (by its name here)
    assert describe_artifact(blob)["compressor"] == compressor


def test_controls_fp16_stores_every_small_float_as_fp16():
    sd = state_dict()
    official, _ = quantize_state_dict(sd, scheme="int6")
    fp16, _ = quantize_state_dict(sd, scheme="int6", controls="fp16")
    for name in ("blocks.0.attn_scale", "blocks.0.attn.q_gain"):
        assert official[name].data.dtype == torch.float32
        assert fp16[name].kind == "float" and fp16[name].data.dtype == torch.float16
        assert torch.equal(fp16[name].data, sd[name].half()) and fp16[name].orig_dtype == "float32"
    # roles say fp32: controls=fp16 overrides that too; nothing else changes
    roles = {n: "fp32" for n in sd}
    assert quantize_state_dict(sd, roles=roles)[0]["bigram.proj.weight"].data.dtype == torch.float32
    assert quantize_state_dict(sd, roles=roles, controls="fp16")[0]["bigram.proj.weight"].data.dtype == torch.float16
    for name in sd:
        if sd[name].numel() > 65_536:
            assert torch.equal(official[name].data, fp16[name].data), name


def test_lzma6_is_lzma_preset_6_and_lzma_is_9_extreme():
    qd, _ = quantize_state_dict(state_dict(), scheme="int6")
    for name, preset in (("lzma6", 6), ("lzma", 9 | lzma.PRESET_EXTREME)):
        blob = pack_artifact(qd, {}, compressor=name, storage="bytes", layout="plain")
        info = describe_artifact(blob)
        payload = blob[len(blob) - info["compressed_payload_bytes"]:]
        assert lzma.compress(lzma.decompress(payload), preset=preset) == payload
        assert info["compressor"] == name
    assert "lzma6" not in COMPRESSOR_ORDER  # "auto" tries the strongest settings only


def test_config_validates_the_new_options():
    assert PR549_EXPORT.strip() in (Path(__file__).parents[2] / "README.md").read_text()
    cfg = Config()
    apply_mapping(cfg, tomllib.loads(PR549_EXPORT), origin="PR549_EXPORT")
    validate(cfg)
    for key, value, message in (("clip_rule", "pct", "export.clip_rule must be one of row_search, percentile"),
                                ("controls", "bf16", "export.controls must be one of fp32, fp16"),
                                ("compressor", "lzma7", "export.compressor must be one of")):
        bad = Config()
        setattr(bad.export, key, value)
        with pytest.raises(ConfigError, match=message):
            validate(bad)


# ------------------------------------------------------------------ the embedding default

def model_and_cfg(**export):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=1024, num_layers=1, model_dim=384, num_heads=6, num_kv_heads=3,
                            tie_embeddings=export.pop("tie", True))
    for k, v in export.items():
        setattr(cfg.export, k, v)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # trained-like: no zero-initialised matrices, rows above the 1/qmax floor
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(heavy(*p.shape, seed=len(n)))
    return model, cfg


def export(**kw):
    model, cfg = model_and_cfg(**kw)
    return model, plan_export(model, cfg, [], torch.device("cpu"), code_bytes=0).qdict


@pytest.mark.parametrize("scheme", ["int6", "int5", "int4"])
@pytest.mark.parametrize("tie", [True, False])
def test_narrow_schemes_keep_embedding_and_head_at_official_int8(scheme, tie):
    _, int8 = export(tie=tie)
    model, narrow = export(scheme=scheme, tie=tie)
    tables = ["tok_emb.weight"] + ([] if tie else ["lm_head.weight"])
    for name in tables:
        assert (narrow[name].kind, narrow[name].bits) == ("int8_per_row", 8), name
        assert torch.equal(narrow[name].data, int8[name].data) and torch.equal(narrow[name].scale, int8[name].scale)
    bits = int(scheme[3:])
    assert narrow["blocks.0.mlp.fc.weight"].bits == bits and narrow["blocks.0.attn.c_q.weight"].bits == bits
    # the policy and fp16_embedding still decide
    _, pinned = export(scheme=scheme, tie=tie, policy=[["tok_emb|lm_head", bits]])
    assert all((pinned[n].kind, pinned[n].bits) == ("int_per_row", bits) for n in tables)
    _, fp16 = export(scheme=scheme, tie=tie, fp16_embedding=True)
    assert fp16["tok_emb.weight"].kind == "float" and fp16["tok_emb.weight"].data.dtype == torch.float16


def test_the_pr549_export_block():
    """scheme int8 + policy attn/mlp -> 6 + percentile + fp16 controls + lzma6 is #549's export:
    attention and MLP matrices by its int6 rule, the embedding official int8, every small tensor fp16."""
    model, cfg = model_and_cfg()
    apply_mapping(cfg, tomllib.loads(PR549_EXPORT), origin="PR549_EXPORT")
    validate(cfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    qd = plan_export(model, cfg, [], torch.device("cpu"), code_bytes=0).qdict
    official, _ = quantize_state_dict(state)
    for name, t in state.items():
        qt = qd[name]
        if t.numel() <= 65_536:
            assert qt.kind == "float" and qt.data.dtype == torch.float16, name
        elif ".attn." in name or ".mlp." in name:
            assert (qt.kind, qt.bits) == ("int_per_row", 6), name
            check_against_reference(t, 6, qt.scale, qt.data)
        else:
            assert qt.kind == "int8_per_row" and torch.equal(qt.data, official[name].data), name
    blob = pack_artifact(qd, {}, compressor=cfg.export.compressor, storage=cfg.export.storage, layout=cfg.export.layout)
    assert describe_artifact(blob)["compressor"] == "lzma6"
