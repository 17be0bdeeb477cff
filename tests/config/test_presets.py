"""Presets in configs/: each resolves, builds, and holds the parameters its arithmetic says; a preset
that requires a capability pgolf lacks is refused by name; the fp16-embedding export switch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pgolf.compress.container import pack_artifact, unpack_artifact
from pgolf.cli import main as cli_main
from pgolf.compress.policy import effective_policy, plan_export
from pgolf.config import Config, ConfigError, ModelConfig
from pgolf.config.resolve import CAPABILITIES, REPO_CONFIG_DIR, resolve_config
from pgolf.model.gpt import GPT, count_parameters
from pgolf.compress.quant import dequantize_state_dict, policy_bits

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PRESETS = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.toml"))


def attention(d: int, kv_heads: int, heads: int) -> int:
    kv = kv_heads * (d // heads)
    return d * d + kv * d + kv * d + d * d  # c_q, c_k, c_v, proj


def controls(d: int, heads: int) -> int:
    return d + d + 2 * d + heads  # attn_scale, mlp_scale, resid_mix, q_gain


# Hand-computed: embedding + layers x (attention + MLP matrices + controls) + skip weights.
EXPECTED_PARAMS = {
    "baseline": 1024 * 512 + 9 * (attention(512, 4, 8) + 2 * 512 * 1024 + controls(512, 8)) + 4 * 512,
    "smoke": 260 * 128 + 4 * (attention(128, 2, 4) + 2 * 128 * 256 + controls(128, 4)) + 2 * 128,
    # SwiGLU: three matrices (gate, up, proj) of d x hidden.
    "seed_swiglu_576x7": 1024 * 576 + 7 * (attention(576, 4, 8) + 3 * 576 * 768 + controls(576, 8)) + 3 * 576,
    "seed_recurrence_swiglu_baseline": 1024 * 416 + 11 * (attention(416, 4, 8) + 3 * 416 * 1152 + controls(416, 8)) + 5 * 416,
    "ablation_relu2": 1024 * 512 + 9 * (attention(512, 4, 8) + 2 * 512 * 2048 + controls(512, 8)) + 4 * 512,
    "ablation_gelu": 1024 * 512 + 9 * (attention(512, 4, 8) + 2 * 512 * 2048 + controls(512, 8)) + 4 * 512,
    "ablation_silu": 1024 * 512 + 9 * (attention(512, 4, 8) + 2 * 512 * 2048 + controls(512, 8)) + 4 * 512,
    "ablation_swiglu": 1024 * 512 + 9 * (attention(512, 4, 8) + 3 * 512 * 1368 + controls(512, 8)) + 4 * 512,
    # #549: + BigramHash (table, projection, scale), SmearGate, value embeddings (table,
    # projection, scale, one scalar per listed layer).
    "pr549": 1024 * 512 + 11 * (attention(512, 4, 8) + 2 * 512 * 1536 + controls(512, 8)) + 5 * 512
             + (1536 * 128 + 512 * 128 + 1) + 512 + (1024 * 128 + 256 * 128 + 1 + 2),
    # Seed 001 on the #549 stack: #549 with SwiGLU (gate, up, proj of 512 x 1152) in its blocks.
    "seed_recurrence_swiglu": 1024 * 512 + 11 * (attention(512, 4, 8) + 3 * 512 * 1152 + controls(512, 8))
                              + 5 * 512 + (1536 * 128 + 512 * 128 + 1) + 512 + (1024 * 128 + 256 * 128 + 1 + 2),
    # #1855: 8192-token tied embedding; per layer attention, MLP 4x (fc, proj of 512 x 2048), controls
    # and the sparse attention gate (8 heads x 12 dims); 8 skip weights and 8 skip gates of 512 (17
    # applications: 8 encoder, 9 decoder); the two lanes' mixes for every layer (resid 2, post 2 x 2);
    # the BOS-masked SmearGate (12 gate weights + lambda).
    "pr1855": 8192 * 512 + 11 * (attention(512, 4, 8) + 2 * 512 * 2048 + controls(512, 8) + 8 * 12)
              + 8 * 512 + 8 * 512 + 11 * (2 + 2 * 2) + (12 + 1),
}
# (unique, effective) depth
EXPECTED_DEPTH = {"pr1855": (11, 17),  # 17 block applications with the loop on
                  "seed_recurrence_swiglu": (11, 22), "seed_recurrence_swiglu_baseline": (11, 22), "seed_swiglu_576x7": (7, 7), "baseline": (9, 9)}


def test_hand_arithmetic_matches_known_totals():
    assert EXPECTED_PARAMS["baseline"] == 17_059_912  # the official baseline's count
    assert EXPECTED_PARAMS["seed_swiglu_576x7"] == 16_864_760  # what the seed's own log reports
    assert EXPECTED_PARAMS["seed_recurrence_swiglu_baseline"] == 21_971_960
    assert EXPECTED_PARAMS["ablation_relu2"] == 26_497_096
    assert EXPECTED_PARAMS["pr549"] == 26_928_220  # what #549's log reports
    assert EXPECTED_PARAMS["pr1855"] == 35_945_671  # what #1855's README and logs report


def test_every_preset_has_a_hand_computed_count():
    assert set(PRESETS) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_resolves_and_builds_with_its_parameter_count(name):
    cfg, _ = resolve_config(name, [], env={})
    with torch.device("meta"):  # full size, no memory
        model = GPT(cfg.model)
    assert count_parameters(model) == EXPECTED_PARAMS[name]
    if name in EXPECTED_DEPTH:
        assert (model.unique_depth, model.effective_depth) == EXPECTED_DEPTH[name]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_starts_with_a_comment(name):
    first = (REPO_CONFIG_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and len(first) > 20


def test_ablation_mlps_match_within_one_percent():
    mlp = {}
    for name in ("relu2", "swiglu", "gelu", "silu"):
        cfg, _ = resolve_config(f"ablation_{name}", [], env={})
        assert cfg.model.mlp == name
        with torch.device("meta"):
            block = GPT(cfg.model).blocks[0]
        mlp[name] = count_parameters(block.mlp)
        # Only the MLP differs between the four.
        other = {k: v for k, v in cfg.to_dict().items() if k != "run"}
        other["model"] = {k: v for k, v in other["model"].items() if k not in ("mlp", "mlp_mult", "mlp_hidden")}
        if name == "relu2":
            reference = other
        assert other == reference
    assert mlp["relu2"] == mlp["gelu"] == mlp["silu"] == 2 * 512 * 2048
    assert mlp["swiglu"] == 3 * 512 * 1368
    assert max(mlp.values()) / min(mlp.values()) - 1 < 0.01


def test_seed_presets_switch_what_they_claim():
    seed, _ = resolve_config("seed_swiglu_576x7", [], env={})
    assert (seed.model.mlp, seed.model.mlp_hidden, seed.optim.muon_wd) == ("swiglu", 768, 0.02)
    assert seed.export.fp16_embedding and seed.train.warmdown_frac == 0.6 and seed.train.eval_stride == 64
    rec, _ = resolve_config("seed_recurrence_swiglu_baseline", [], env={})
    assert (rec.model.recurrence, rec.model.mlp, rec.optim.muon_wd, rec.train.eval_stride) == (2, "swiglu", 0.02, 64)
    bits = policy_bits(effective_policy(rec.export))
    assert bits("tok_emb.weight") == "fp16"
    assert [bits(f"blocks.{i}.mlp.up.weight") for i in range(11)] == [6] + [5] * 9 + [6]
    assert {bits(f"blocks.{i}.attn.{m}.weight") for i in range(11) for m in ("c_q", "c_k", "c_v", "proj")} == {6}


def test_seed_001_is_the_549_stack_with_recurrence_swiglu_and_int5_middle_mlps():
    stack, _ = resolve_config("pr549", [], env={})
    seed, _ = resolve_config("seed_recurrence_swiglu", [], env={})
    assert (seed.model.recurrence, seed.model.mlp, seed.model.mlp_hidden) == (2, "swiglu", 1152)
    differs = {f"{section}.{key}" for section, values in seed.to_dict().items() for key, value in values.items()
               if getattr(getattr(stack, section), key) != value}
    assert differs == {"run.name", "model.mlp", "model.mlp_hidden", "model.mlp_mult", "model.recurrence",
                       "export.policy"} - ({"model.mlp_mult"} if seed.model.mlp_mult == stack.model.mlp_mult else set())
    bits = policy_bits(effective_policy(seed.export))
    assert [bits(f"blocks.{i}.mlp.up.weight") for i in range(11)] == [6] + [5] * 9 + [6]
    assert {bits(f"blocks.{i}.attn.{m}.weight") for i in range(11) for m in ("c_q", "c_k", "c_v", "proj")} == {6}


def test_pr549_preset_is_the_record_recipe():
    cfg, _ = resolve_config("pr549", [], env={})
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp, m.mlp_slope, m.mlp_mult) == \
        (11, 512, 8, 4, "leaky_relu2", 0.5, 3)
    assert (m.embed, m.bigram_buckets, m.bigram_dim, m.post_norm, m.stream, m.ve_layers) == \
        (["bigram"], 1536, 128, ["smear"], ["value_embed"], [9, 10])
    assert (m.xsa_layers, m.rope_dims, m.rope_fp32, m.rope_ref_len, m.ln_scale, m.init) == \
        ([7, 8, 9, 10], 16, True, 1024, True, "orthogonal")
    assert (t.train_seq_len, t.train_batch_tokens, t.iterations, t.warmdown_iters, t.eval_stride) == \
        (2048, 786_432, 9000, 3500, 64)
    assert (t.grad_clip_norm, t.grad_clip_mode) == (0.3, "per_rank")
    assert (o.matrix_lr, o.scalar_lr, o.tied_embed_lr, o.muon_momentum, o.muon_momentum_warmup_start,
            o.muon_momentum_warmup_steps, o.muon_wd, o.adam_wd) == (0.025, 0.025, 0.035, 0.99, 0.92, 1500, 0.04, 0.04)
    assert cfg.ema.enabled and cfg.ema.decay == 0.997
    e = cfg.export
    assert (e.scheme, e.clip_rule, e.controls, e.compressor) == ("int6", "percentile", "fp16", "lzma6")


def test_pr1855_preset_is_the_record_recipe():
    cfg, _ = resolve_config("pr1855", [], env={})
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data
    assert (m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp, m.mlp_slope, m.mlp_mult) == \
        (8192, 11, 512, 8, 4, "leaky_relu2", 0.5, 4)
    assert (m.tie_embeddings, m.tied_embed_init_std, m.logit_softcap, m.qk_gain_init) == (True, 0.005, 30.0, 5.0)
    assert (m.xsa_layers, m.rope_dims, m.rope_fp32, m.rope_ref_len, m.ln_scale, m.init) == \
        (list(range(11)), 16, True, 0, True, "orthogonal")
    assert (m.layout, m.loop_start, m.loop_end, m.loop_passes, m.loop_start_frac) == ("loop", 3, 5, 3, 0.35)
    assert (m.skip_gates, m.parallel_from, m.attn_gate_dims, m.attn_gate_scale) == (True, 8, 12, 0.5)
    assert (m.embed, m.smear_dims, m.bos_id, m.post_norm, m.stream) == (["smear_bos"], 12, 1, [], [])
    assert d.caseops and d.data_path.endswith("fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")
    assert (t.train_seq_len, t.train_batch_tokens, t.max_wallclock_seconds, t.warmup_steps) == \
        (2048, 786_432, 600.0, 20)
    assert (t.warmdown_frac, t.min_lr, t.eval_stride, t.grad_clip_norm, t.grad_clip_mode) == \
        (0.85, 0.1, 0, 0.3, "per_rank")
    assert (o.matrix_lr, o.scalar_lr, o.tied_embed_lr, o.muon_momentum, o.muon_momentum_warmup_start,
            o.muon_momentum_warmup_steps, o.muon_backend_steps) == (0.026, 0.02, 0.03, 0.97, 0.92, 1500, 5)
    assert (o.muon_ns, o.muon_row_norm, o.muon_wd, o.adam_wd, o.embed_wd) == ("polar_express", True, 0.095, 0.02, 0.085)
    assert (o.beta1, o.beta2, o.adam_eps, o.parallel_muon, o.parallel_muon_bf16) == (0.9, 0.99, 1e-8, "auto", True)
    assert cfg.ema.enabled and cfg.ema.decay == 0.9965
    e = cfg.export
    assert (e.scheme, e.controls, e.compressor, e.gptq, e.gptq_act_order) == ("int6", "fp16", "lzma", True, True)
    bits = policy_bits(effective_policy(e))
    assert bits("tok_emb.weight") == 7
    with torch.device("meta"):
        model = GPT(m)
    assert model.looping  # built looping (as evaluation and export see it); training starts it at 35 %


# ----------------------------------------------------------------------------------------
# requires = [...]
# ----------------------------------------------------------------------------------------

def write_preset(tmp_path, text: str):
    path = tmp_path / "needs.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_preset_requiring_an_unbuilt_capability_is_refused(tmp_path, capsys):
    path = write_preset(tmp_path, '# needs a warp drive\nrequires = ["swiglu", "warp_drive"]\n'
                                  '[model]\nmlp = "swiglu"\n')
    with pytest.raises(ConfigError) as err:
        resolve_config(str(path), [], env={})
    assert (f"preset {path} requires capability 'warp_drive', which this version of pgolf does not have"
            in str(err.value))
    assert cli_main(["train", "--config", str(path)]) == 2
    assert "requires capability 'warp_drive'" in capsys.readouterr().err


def test_requires_is_not_a_config_section(tmp_path):
    path = write_preset(tmp_path, 'requires = ["swiglu", "recurrence"]\n[model]\nmlp = "swiglu"\nrecurrence = 2\n')
    cfg, _ = resolve_config(str(path), [], env={})
    assert cfg.model.recurrence == 2 and "requires" not in cfg.to_dict()
    bad = write_preset(tmp_path, 'requires = "swiglu"\n')
    with pytest.raises(ConfigError, match="requires must be a list of capability names"):
        resolve_config(str(bad), [], env={})


# A capability is listed only with the switch that provides it: each one resolves here.
CAPABILITY_SWITCHES = {
    "gqa": ["model.attention=gqa"], "rope": ["model.position=rope"], "unet": ["model.layout=unet"],
    "ema": ["ema.enabled=true"], "swa": ["swa.enabled=true"], "relu2": ["model.mlp=relu2"], "leaky_relu2": ["model.mlp=leaky_relu2"], "swiglu": ["model.mlp=swiglu"],
    "gelu": ["model.mlp=gelu"], "silu": ["model.mlp=silu"], "recurrence": ["model.recurrence=2"],
    "middle_cycle": ["model.num_layers=3", "model.cycle_stem=1", "model.cycle_core=1", "model.cycle_repeats=2",
                     "model.cycle_tail=1"],
    "muon_wd": ["optim.muon_wd=0.02"], "fp16_embedding": ["export.fp16_embedding=true"],
    "polar_express": ["optim.muon_ns=polar_express"], "muon_row_norm": ["optim.muon_row_norm=true"],
    "min_lr": ["train.min_lr=0.1"],
    "mixed_bits": ["export.policy=mlp:5,attn:6"], "gptq": ["export.gptq=true"],
    "bit_allocation": ["export.allocate=true"], "qat": ["qat.enabled=true"], "sliding_eval": ["train.eval_stride=64"],
    "ttt": None,  # an evaluation mode: pgolf eval --ttt
    "caseops": ["data.caseops=true"], "byte_sidecar": ["data.byte_sidecar=on"],
    "bigram": ["model.embed=bigram"], "smear": ["model.post_norm=smear"], "value_embed": ["model.stream=value_embed"],
    "xsa": ["model.xsa_layers=-1"], "partial_rope": ["model.rope_dims=16"], "ln_scale": ["model.ln_scale=true"],
    "orthogonal_init": ["model.init=orthogonal"],
    "loop": ["model.layout=loop", "model.loop_start=3", "model.loop_end=5", "model.loop_passes=3",
             "model.loop_start_frac=0.35"],
    "skip_gates": ["model.skip_gates=true"], "parallel_residual": ["model.parallel_from=5"],
    "attn_gate": ["model.attn_gate_dims=12"], "smear_bos": ["model.embed=smear_bos"],
    "doc_mask": ["model.doc_mask=true", "model.max_span=2048"], "doc_packing": ["data.doc_packing=true"],
    "packed_row": ["model.doc_mask=true", "data.packed_row=true"],
    "sdclip": ["export.scheme=int6", "export.clip_rule=sdclip"], "lqer": ["export.lqer_rank=4"],
    "attn_gate_int8": ["model.attn_gate_dims=12", "export.attn_gate_int8=true"],
    "gptq_embedding": ["export.gptq=true", "export.gptq_embedding=true"],
    "per_group": ["export.layout=per_group", "export.group_backend=lzma"],  # lzma: installed everywhere
}


@pytest.mark.parametrize("capability", sorted(CAPABILITIES))
def test_every_capability_has_its_switch(capability):
    assert set(CAPABILITY_SWITCHES) == set(CAPABILITIES)
    if CAPABILITY_SWITCHES[capability] is None:
        assert importlib.util.find_spec(f"pgolf.eval.{capability}") is not None
    else:
        resolve_config(None, CAPABILITY_SWITCHES[capability], env={})


# ----------------------------------------------------------------------------------------
# export.fp16_embedding
# ----------------------------------------------------------------------------------------

def exported(fp16_embedding: bool, policy=(), scheme="int8"):
    cfg = Config()
    # Large enough that the embedding (1024 x 256) and the MLP matrices are quantized at all.
    cfg.model = ModelConfig(vocab_size=1024, num_layers=1, model_dim=256, num_heads=4, num_kv_heads=2)
    cfg.export.fp16_embedding, cfg.export.policy, cfg.export.scheme = fp16_embedding, list(policy), scheme
    torch.manual_seed(0)
    model = GPT(cfg.model)
    plan = plan_export(model, cfg, [], torch.device("cpu"), code_bytes=0)
    qdict, _ = unpack_artifact(pack_artifact(plan.qdict, meta={}, compressor="zlib"))
    return model, qdict


@pytest.mark.parametrize("scheme", ["int8", "int6"])
def test_fp16_embedding_stores_the_embedding_as_fp16_and_the_rest_as_before(scheme):
    model, plain = exported(False, scheme=scheme)
    _, fp16 = exported(True, scheme=scheme)
    emb = model.tok_emb.weight.detach()
    assert plain["tok_emb.weight"].kind in ("int8_per_row", "int_per_row")
    q = fp16["tok_emb.weight"]
    assert q.kind == "float" and q.data.dtype == torch.float16 and torch.equal(q.data, emb.half())
    assert torch.equal(dequantize_state_dict(fp16)["tok_emb.weight"], emb.half().float())
    assert set(plain) == set(fp16)
    quantized = [n for n, t in plain.items() if t.kind in ("int8_per_row", "int_per_row") and n != "tok_emb.weight"]
    assert "blocks.0.mlp.fc.weight" in quantized
    for name in plain:
        if name != "tok_emb.weight":
            a, b = plain[name], fp16[name]
            assert (a.kind, a.bits) == (b.kind, b.bits) and torch.equal(a.data, b.data), name


def test_fp16_embedding_rule_comes_before_the_policy():
    _, qdict = exported(True, policy=[["tok_emb", 4], ["mlp", 5]])
    assert qdict["tok_emb.weight"].kind == "float" and qdict["tok_emb.weight"].data.dtype == torch.float16
    assert qdict["blocks.0.mlp.fc.weight"].bits == 5
