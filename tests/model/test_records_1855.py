"""PR #1855's model as config switches (RECORDS.md B2-B7): its parameter count, its block order
and skip pairing, its forward (looped and not) against a float64 reference written here from the
definitions, the BOS-masked smear and its document boundary, roles, validation, and every switch
off leaving the official model bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.config import Config, ConfigError, OptimConfig, apply_overrides
from pgolf.config.checks import validate
from pgolf.lab.plan import count_parameters_by_component
from pgolf.model.config import ModelConfig
from pgolf.model.embed import SmearBOS
from pgolf.model.gpt import GPT, count_parameters, model_config_problems
from pgolf.model.layout import unet
from pgolf.model.roles import Role, export_passthrough, param_roles
from pgolf.train.optim import build_optimizers
from tests.model.test_attention_records import reference_attention
from tests.model.test_model import randomise
from tests.model.test_records_549 import assert_off_is_official

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

RECORD_1855 = dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp="leaky_relu2",
                   mlp_mult=4, qk_gain_init=5.0, xsa_layers=list(range(11)), rope_dims=16, rope_fp32=True,
                   ln_scale=True, init="orthogonal", skip_gates=True, layout="loop", loop_start=3, loop_end=5,
                   loop_passes=3, loop_start_frac=0.35, parallel_from=8, attn_gate_dims=12, attn_gate_scale=0.5,
                   embed=["smear_bos"])
TINY = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2)
# Every switch on, small: blocks 2..3 looped 3 times, lanes from block 4, a gate on 6 input dims, smear on 5.
TINY_1855 = dict(**TINY, mlp="leaky_relu2", mlp_mult=4, qk_gain_init=5.0, xsa_layers=list(range(6)), rope_dims=4,
                 rope_fp32=True, ln_scale=True, init="orthogonal", skip_gates=True, layout="loop", loop_start=2,
                 loop_end=3, loop_passes=3, loop_start_frac=0.35, parallel_from=4, attn_gate_dims=6,
                 embed=["smear_bos"], smear_dims=5)
# Written out from the definition: 0 1 | 2 3 x3 | 4 5; first half encoder, the rest decoder.
TINY_LOOPED = ([0, 1, 2, 3, 2], [3, 2, 3, 4, 5])
TINY_PLAIN = ([0, 1, 2], [3, 4, 5])


def test_the_records_parameter_count():
    cfg = ModelConfig(**RECORD_1855)
    assert model_config_problems(cfg) == []
    with torch.device("meta"):
        model = GPT(cfg)
    assert count_parameters(model) == 35_945_671  # PR #1855's log
    assert count_parameters_by_component(model) == {
        "embedding": 8192 * 512, "attention": 11 * (2 * 512 * 512 + 2 * 256 * 512), "mlp": 11 * 2 * 2048 * 512,
        # skip weights and gates (8 each), the lanes' 11 x 2 + 11 x 2 x 2, per block 4 x 512 + 8 heads + the
        # 8 x 12 output gate, the smear's 12 + 1
        "control": 2 * 8 * 512 + 11 * 6 + 11 * (4 * 512 + 8 + 8 * 12) + 13,
        "other": 0, "total": 35_945_671}


def test_the_records_block_order_and_skips():
    with torch.device("meta"):
        model = GPT(ModelConfig(**RECORD_1855))
    s = model.schedule
    assert list(s.encoder) + list(s.decoder) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert (len(s.encoder), len(s.decoder), s.num_skips, model.effective_depth) == (8, 9, 8, 17)
    assert s.unlooped == unet(model.cfg) and (s.unlooped.encoder, s.unlooped.decoder) == (tuple(range(5)),
                                                                                            tuple(range(5, 11)))
    assert model.skip_weights.shape == model.skip_gates.shape == (8, 512)
    assert model.lane_resid.shape == (11, 2) and model.lane_post.shape == (11, 2, 2)


def block_calls(model: GPT, tokens) -> list[int]:
    calls = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.logits(tokens)
    for h in hooks:
        h.remove()
    return calls


def test_the_looping_flag_chooses_the_order():
    model = GPT(ModelConfig(**TINY_1855))
    tokens = torch.randint(0, 64, (1, 5))
    assert model.looping and block_calls(model, tokens) == sum(TINY_LOOPED, [])
    model.looping = False  # the early phase (pgolf.train.looping)
    assert block_calls(model, tokens) == sum(TINY_PLAIN, [])


# ----------------------------------------------------------------------------------------
# The whole forward against a float64 reference
# ----------------------------------------------------------------------------------------

def reference_1855(model: GPT, tokens: torch.Tensor, encoder: list[int], decoder: list[int]) -> torch.Tensor:
    cfg, P = model.cfg, {n: p.detach().double() for n, p in model.named_parameters()}
    eps = torch.finfo(torch.float32).eps

    def rms(t):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    # BOS-masked smear on the raw embedding: e_t + lam sigmoid(w . e_t[:5]) e_{t-1}, none into a BOS (id 1)
    e = P["tok_emb.weight"][tokens]
    g = P["embed_addons.0.lam"] * torch.sigmoid(e[:, 1:, :5] @ P["embed_addons.0.gate"]) * (tokens[:, 1:] != 1)
    x = x0 = rms(torch.cat((e[:, :1], e[:, 1:] + g[..., None] * e[:, :-1]), 1))

    def branches(i, a, m):
        pre, f = f"blocks.{i}.", 1 / math.sqrt(i + 1)
        mix = P[pre + "resid_mix"]
        att = P[pre + "attn_scale"] * reference_attention(
            model.blocks[i].attn, (rms(mix[0] * a + mix[1] * x0) * f).float(), rope_dims=4, xsa=True)
        if m is None:  # sequential: the MLP reads the stream after the attention
            a = mix[0] * a + mix[1] * x0 + att
        h = rms(a if m is None else m) * f @ P[pre + "mlp.fc.weight"].T
        mlp = P[pre + "mlp_scale"] * (torch.where(h > 0, h, 0.5 * h) ** 2 @ P[pre + "mlp.proj.weight"].T)
        return a, att, mlp

    outs = []
    for i in encoder:
        a, _, mlp = branches(i, x, None)
        x = a + mlp
        outs.append(x)
    m = None
    for j, i in enumerate(decoder):
        if m is None and i >= 4:  # lanes from the first decoder block >= parallel_from
            m = x
        if j < len(encoder):  # decoder j reads encoder output len - 1 - j, through its gate
            s = torch.sigmoid(P["skip_gates"][j])
            x = s * x + (1 - s) * P["skip_weights"][j] * outs[len(encoder) - 1 - j]
        if m is None:
            a, _, mlp = branches(i, x, None)
            x = a + mlp
        else:
            _, att, mlp = branches(i, x, m)
            r, p = P["lane_resid"][i], P["lane_post"][i]
            x, m = r[0] * x + p[0, 0] * att + p[1, 0] * mlp, r[1] * m + p[0, 1] * att + p[1, 1] * mlp
    z = rms((x + m) / 2) @ P["tok_emb.weight"].T
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


@pytest.mark.parametrize("looping", [True, False])
def test_forward_matches_the_reference(looping):
    torch.manual_seed(0)
    model = randomise(GPT(ModelConfig(**TINY_1855)), seed=4)
    model.looping = looping
    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    tokens[0, 6] = tokens[1, 0] = 1  # BOS: one mid-row, one first
    with torch.no_grad():
        got = model.logits(tokens).double()
    ref = reference_1855(model, tokens, *(TINY_LOOPED if looping else TINY_PLAIN))
    assert torch.allclose(got, ref, atol=2e-4) and ref.abs().max() > 1.0


def test_the_records_switches_train_on_cpu():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_1855))
    tokens = torch.randint(0, 64, (2, 13))
    loss = model(tokens, tokens.roll(-1, 1))
    assert abs(loss.item() - math.log(64)) < 0.1
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # Lanes from block 4: the rows of the blocks before it get no gradient (#1855's shapes).
    assert model.lane_resid.grad[:4].abs().sum() == 0 and model.lane_resid.grad[4:].abs().min() > 0


def test_the_unlooped_model_is_the_plain_unet():
    torch.manual_seed(3)
    plain = randomise(GPT(ModelConfig(**TINY)), seed=1)
    loop = GPT(ModelConfig(**TINY, layout="loop", loop_start=2, loop_end=3, loop_passes=3))
    state = plain.state_dict()
    state["skip_weights"] = torch.cat((state["skip_weights"], torch.randn(2, 32)))  # 5 skips looped, 3 plain
    loop.load_state_dict(state)
    loop.looping = False
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(plain.logits(tokens), loop.logits(tokens))


def test_the_switch_under_torch_compile():
    """A flipped flag is a guard failure: the compiled model recompiles and follows it."""
    torch.manual_seed(0)
    model = randomise(GPT(ModelConfig(**TINY_1855)), seed=2)
    compiled = torch.compile(model.logits, backend="eager", fullgraph=True, dynamic=False)
    tokens = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        for looping in (False, True, False):
            model.looping = looping
            assert torch.allclose(compiled(tokens), model.logits(tokens), atol=1e-6)


# ----------------------------------------------------------------------------------------
# The BOS-masked smear
# ----------------------------------------------------------------------------------------

def test_smear_bos_against_its_definition_and_off_at_init():
    cfg = ModelConfig(**TINY, embed=["smear_bos"], smear_dims=5, bos_id=7)
    smear = SmearBOS(cfg)
    x = torch.randn(2, 9, 32)
    tokens = torch.randint(8, 64, (2, 9))
    tokens[0, 3] = tokens[1, 0] = tokens[1, 5] = 7
    assert torch.equal(smear(x, tokens), x)  # w = 0, lam = 0
    with torch.no_grad():
        smear.gate.normal_()
        smear.lam.fill_(0.7)
    got = smear(x, tokens).double()
    X, w = x.double(), smear.gate.detach().double()
    for b in range(2):
        for t in range(9):
            want = X[b, t].clone()
            if t > 0 and tokens[b, t] != 7:
                want += 0.7 * torch.sigmoid(X[b, t, :5] @ w) * X[b, t - 1]
            assert torch.allclose(got[b, t], want, atol=1e-6), (b, t)


def test_smear_bos_never_reads_across_a_document_start():
    torch.manual_seed(0)
    smear = SmearBOS(ModelConfig(**TINY, embed=["smear_bos"]))  # bos_id 1
    emb = torch.nn.Embedding(64, 32)
    with torch.no_grad():
        smear.gate.normal_()
        smear.lam.fill_(1.0)
    tokens = torch.randint(2, 64, (1, 12))
    tokens[0, 5] = 1  # a document starts at 5
    other = tokens.clone()
    other[0, :5] = 2 + (tokens[0, :5] - 1) % 62  # every token before it changes
    with torch.no_grad():
        a, b = smear(emb(tokens), tokens), smear(emb(other), other)
        assert torch.equal(a[:, 5:], b[:, 5:]) and not torch.equal(a[:, :5], b[:, :5])
        # The mask is what keeps it: with another BOS id the previous document leaks into position 5.
        smear.bos_id = 0
        assert not torch.equal(smear(emb(tokens), tokens)[:, 5:], smear(emb(other), other)[:, 5:])


# ----------------------------------------------------------------------------------------
# Roles, off-by-default, validation
# ----------------------------------------------------------------------------------------

def test_roles_and_groups():
    model = GPT(ModelConfig(**TINY_1855))
    roles = param_roles(model)
    gates = ["skip_gates", "lane_resid", "lane_post", "embed_addons.0.gate", "embed_addons.0.lam",
             *(f"blocks.{i}.attn.gate" for i in range(6))]
    assert all(roles[n] is Role.GATE for n in gates) and roles["skip_weights"] is Role.CONTROL
    assert all(export_passthrough(model)[n] == "fp16" for n in gates)
    opts = build_optimizers(model, OptimConfig(), torch.device("cpu"))
    scalar = {id(p) for g in opts.adam_scalar.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[n]) in scalar for n in gates)  # Adam at the scalar lr, as #1855's scalar group


@pytest.mark.parametrize("keys", [
    dict(skip_gates=False, parallel_from=-1, attn_gate_dims=0, attn_gate_scale=0.9, smear_dims=12, bos_id=1,
         loop_start=0, loop_end=0, loop_passes=1, loop_start_frac=0.0),
    dict(layout="unet"),
])
def test_switches_off_are_the_official_model_bit_for_bit(keys):
    assert_off_is_official(TINY, keys)


@pytest.mark.parametrize("keys, message", [
    (dict(loop_passes=3), "model.loop_passes applies only with model.layout=loop"),
    (dict(layout="loop", loop_start=2, loop_end=6, loop_passes=2), "model.layout=loop needs 0 <= model.loop_start"),
    (dict(layout="loop", loop_start=2, loop_end=3), "model.loop_passes >= 2"),
    (dict(layout="loop", loop_start=2, loop_end=3, loop_passes=2, recurrence=2), "model.layout=loop excludes"),
    (dict(parallel_from=6), "model.parallel_from must be a block index below model.num_layers=6"),
    (dict(attn_gate_dims=33), "model.attn_gate_dims must be at most model.model_dim=32"),
    (dict(smear_dims=4), "model.smear_dims applies only with model.embed including smear_bos"),
    (dict(doc_mask=True, bos_id=10_000), "model.doc_mask needs model.attention=gqa and model.bos_id below"),
    (dict(embed=["smear_bos"], smear_dims=40), "model.smear_dims must be at most model.model_dim=32"),
])
def test_bad_settings_are_refused_by_name(keys, message):
    assert any(message in p for p in model_config_problems(ModelConfig(**{**TINY, **keys})))


@pytest.mark.parametrize("override, key", [("model.loop_start_frac=1.5", "model.loop_start_frac"),
                                           ("model.parallel_from=-2", "model.parallel_from"),
                                           ("model.attn_gate_scale=0", "model.attn_gate_scale")])
def test_ranges(override, key):
    cfg = Config()
    apply_overrides(cfg, [override])
    with pytest.raises(ConfigError, match=key):
        validate(cfg)
