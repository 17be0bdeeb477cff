"""Architecture switches: the MLP registry, depth recurrence, the middle cycle, and their config
checks. Each is pinned by hand-written formulas or loops built from the model's own blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pgolf.config import ConfigError, ModelConfig
from pgolf.config.resolve import resolve_config
from pgolf.model.gpt import GPT
from pgolf.model.layout import block_schedule
from pgolf.model.mlp import MLP, MLP_VARIANTS, gated_hidden_size, mlp_hidden_size
from pgolf.eval.audit import audit_file
from pgolf.runs import read_metrics
from pgolf.train.run import run_training
from tests.model.test_model import randomise
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(vocab_size=64, model_dim=32, num_heads=4, num_kv_heads=2)


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, "num_layers": 5, **overrides}))


def ids(seed: int = 5, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# MLP registry
# ----------------------------------------------------------------------------------------

def _gelu(h):
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def _silu(h):
    return h / (1.0 + torch.exp(-h))


# Every variant's MLP written out in float64 from its weights. A new variant adds its line here.
REFERENCE_MLPS = {
    "relu2": lambda W, x, slope: (torch.clamp(x @ W["fc"].T, min=0) ** 2) @ W["proj"].T,
    "leaky_relu2": lambda W, x, slope: (torch.where(x @ W["fc"].T > 0, x @ W["fc"].T, slope * (x @ W["fc"].T)) ** 2)
    @ W["proj"].T,
    "gelu": lambda W, x, slope: _gelu(x @ W["fc"].T) @ W["proj"].T,
    "silu": lambda W, x, slope: _silu(x @ W["fc"].T) @ W["proj"].T,
    "swiglu": lambda W, x, slope: (_silu(x @ W["gate"].T) * (x @ W["up"].T)) @ W["proj"].T,
}


def test_every_registered_variant_has_a_reference():
    assert set(REFERENCE_MLPS) == set(MLP_VARIANTS)
    assert ModelConfig().mlp == "relu2"


@pytest.mark.parametrize("dim, hidden", [(512, 1408), (576, 1536), (384, 1024), (416, 1152), (128, 384), (64, 192)])
def test_swiglu_hidden_is_8_thirds_rounded_up_to_64(dim, hidden):
    assert gated_hidden_size(dim) == hidden == 64 * math.ceil(int(dim * 8 / 3) / 64)
    assert mlp_hidden_size(ModelConfig(model_dim=dim, mlp="swiglu")) == hidden


def test_hidden_size_from_mult_or_explicit():
    assert mlp_hidden_size(ModelConfig()) == 1024  # official: 2 x 512
    assert mlp_hidden_size(ModelConfig(mlp="gelu", mlp_mult=4)) == 2048
    assert mlp_hidden_size(ModelConfig(mlp="swiglu", mlp_hidden=768)) == 768
    assert mlp_hidden_size(ModelConfig(mlp="silu", mlp_mult=4, mlp_hidden=100)) == 100


@pytest.mark.parametrize("variant", sorted(MLP_VARIANTS))
def test_variant_forward_matches_formula(variant):
    torch.manual_seed(0)
    cfg = ModelConfig(model_dim=16, mlp=variant, mlp_hidden=24, mlp_slope=0.3)
    mlp = MLP(cfg)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.5)  # zero-initialised proj too, so every path contributes
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    W = {name.removesuffix(".weight"): p.detach().double() for name, p in mlp.named_parameters()}
    expected = REFERENCE_MLPS[variant](W, x.double(), 0.3)
    with torch.no_grad():
        got = mlp(x)
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.5
    if variant == "leaky_relu2":  # the slope is used: the negative side is not relu's zero
        relu2 = REFERENCE_MLPS["relu2"](W, x.double(), 0.0)
        assert not torch.allclose(got.double(), relu2, atol=1e-3)


@pytest.mark.parametrize("variant", sorted(MLP_VARIANTS))
def test_variant_parameters_and_initialisation(variant):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=1, model_dim=256, mlp=variant, mlp_mult=4 if variant != "swiglu" else 2)
    mlp = GPT(cfg).blocks[0].mlp
    hidden = 704 if variant == "swiglu" else 1024
    inputs = ("gate", "up") if variant == "swiglu" else ("fc",)  # relu2's names stay fc/proj
    shapes = {name: tuple(p.shape) for name, p in mlp.named_parameters()}
    assert shapes == {**{f"{n}.weight": (hidden, 256) for n in inputs}, "proj.weight": (256, hidden)}
    assert torch.count_nonzero(mlp.proj.weight) == 0
    for n in inputs:  # the default init of relu^2's fc: U(-1/sqrt(in), 1/sqrt(in))
        w = mlp.get_parameter(f"{n}.weight")
        bound = 1 / math.sqrt(256)
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert abs(w.mean().item()) < 0.01 * bound


def test_default_init_is_unchanged_by_the_registry():
    # relu2 is built exactly as before: same parameter order, so the same seed gives the same weights.
    a, b = tiny(seed=3), tiny(seed=3, mlp="relu2", mlp_slope=0.1)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert "blocks.0.mlp.fc.weight" in dict(a.named_parameters())


@pytest.mark.parametrize("variant", sorted(MLP_VARIANTS))
def test_variant_initial_loss_is_near_uniform(variant):
    model = tiny(mlp=variant)
    x = ids(1, (2, 16))
    with torch.no_grad():
        assert abs(model(x, x.roll(-1, 1)).item() - math.log(64)) < 0.02


# ----------------------------------------------------------------------------------------
# Depth recurrence and the middle cycle, against loops written here from the blocks
# ----------------------------------------------------------------------------------------

def rms(x):
    return F.rms_norm(x, (x.size(-1),))


def head(model: GPT, x: torch.Tensor) -> torch.Tensor:
    cap = model.cfg.logit_softcap
    return cap * torch.tanh(F.linear(rms(x), model.tok_emb.weight) / cap)


def flat_unet(model: GPT, tokens, x=None, x0=None, skip_every_pass: bool = False):
    """The baseline's forward: first half kept for skips, second half adds them in reverse."""
    if x is None:
        x = x0 = rms(model.tok_emb(tokens))
    n = len(model.blocks)
    kept = []
    for i in range(n // 2):
        x = model.blocks[i](x, x0)
        kept.append(x)
    for j, i in enumerate(range(n // 2, n)):
        if kept:
            x = x + model.skip_weights[j] * kept.pop()
        x = model.blocks[i](x, x0)
    return x


def recurrent_reference(model: GPT, tokens, passes: int, skips_on_every_pass: bool = False):
    x = x0 = rms(model.tok_emb(tokens))
    for _ in range(passes - 1):
        if skips_on_every_pass:
            x = flat_unet(model, tokens, x, x0)
        else:
            for block in model.blocks:
                x = block(x, x0)
    return head(model, flat_unet(model, tokens, x, x0))


def test_recurrence_one_is_the_flat_model_bit_for_bit():
    default, explicit = tiny(seed=2), tiny(seed=2, recurrence=1)
    randomise(default, seed=7)
    randomise(explicit, seed=7)
    x = ids()
    with torch.no_grad():
        logits = default.logits(x)
        assert torch.equal(logits, explicit.logits(x))
        assert torch.equal(logits, head(default, flat_unet(default, x)))
    assert default.unique_depth == default.effective_depth == 5


@pytest.mark.parametrize("passes", [2, 3])
def test_recurrence_runs_plain_passes_then_the_unet(passes):
    model = randomise(tiny(recurrence=passes), seed=4)
    x = ids()
    with torch.no_grad():
        got = model.logits(x)
        assert torch.equal(got, recurrent_reference(model, x, passes))
        # Skips on the earlier passes too would be a different function: the test can tell.
        assert not torch.allclose(got, recurrent_reference(model, x, passes, skips_on_every_pass=True), atol=1e-3)
        assert not torch.allclose(got, recurrent_reference(model, x, 1), atol=1e-3)
    assert (model.unique_depth, model.effective_depth) == (5, 5 * passes)
    assert model.skip_weights.shape == (2, 32)  # one set of skips, used on the final pass


def block_order(model: GPT, tokens) -> list[int]:
    order = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: order.append(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.logits(tokens)
    for h in handles:
        h.remove()
    return order


def test_recurrence_block_order():
    assert block_order(tiny(num_layers=3, recurrence=3), ids()) == [0, 1, 2] * 3


def test_gradient_reaches_shared_blocks_from_every_pass():
    """Give pass p its own copy of the block parameters: every copy gets a non-zero gradient, and
    their sum is the shared parameters' gradient."""
    model = randomise(tiny(num_layers=3, recurrence=2), seed=6)
    x, y = ids(1), ids(2)
    model(x, y).backward()
    names = [n for n, _ in model.blocks[0].named_parameters()]
    copies = [[{n: p.detach().clone().requires_grad_() for n, p in b.named_parameters()} for b in model.blocks]
              for _ in range(2)]
    h = h0 = rms(model.tok_emb(x))
    for i, block in enumerate(model.blocks):  # pass 1: plain
        h = functional_call(block, copies[0][i], (h, h0))
    kept = []
    h = functional_call(model.blocks[0], copies[1][0], (h, h0))  # pass 2: the U-Net over 3 blocks
    kept.append(h)
    h = h + model.skip_weights[0] * kept.pop()
    for i in (1, 2):
        h = functional_call(model.blocks[i], copies[1][i], (h, h0))
    loss = F.cross_entropy(head(model, h).reshape(-1, 64), y.reshape(-1))
    loss.backward()
    for i, block in enumerate(model.blocks):
        for n in names:
            shared = block.get_parameter(n).grad
            per_pass = [copies[p][i][n].grad for p in range(2)]
            for p in range(2):
                assert per_pass[p].abs().sum() > 0, (i, n, p)
            assert torch.allclose(shared, per_pass[0] + per_pass[1], atol=1e-6, rtol=1e-4), (i, n)


def cycle_reference(model: GPT, tokens, stem: int, core: int, repeats: int):
    x = x0 = rms(model.tok_emb(tokens))
    kept = []
    for i in range(stem):
        x = model.blocks[i](x, x0)
        kept.append(x)
    for _ in range(repeats):
        for i in range(stem, stem + core):
            x = model.blocks[i](x, x0)
    for j, i in enumerate(range(stem + core, len(model.blocks))):
        if kept:
            x = x + model.skip_weights[j] * kept.pop()
        x = model.blocks[i](x, x0)
    return head(model, x)


@pytest.mark.parametrize("stem, core, repeats, tail", [(2, 2, 3, 3), (3, 1, 2, 1), (0, 2, 2, 1), (1, 3, 1, 1)])
def test_middle_cycle_order_and_skips(stem, core, repeats, tail):
    layout = dict(cycle_stem=stem, cycle_core=core, cycle_repeats=repeats, cycle_tail=tail)
    model = randomise(tiny(num_layers=stem + core + tail, **layout), seed=8)
    x = ids()
    expected_order = [*range(stem), *list(range(stem, stem + core)) * repeats, *range(stem + core, stem + core + tail)]
    assert block_order(model, x) == expected_order
    assert model.skip_weights.shape == (min(stem, tail), 32)
    assert (model.unique_depth, model.effective_depth) == (stem + core + tail, stem + core * repeats + tail)
    with torch.no_grad():
        assert torch.equal(model.logits(x), cycle_reference(model, x, stem, core, repeats))


def test_middle_cycle_tail_takes_stem_outputs_last_first():
    schedule = block_schedule(ModelConfig(num_layers=7, cycle_stem=2, cycle_core=2, cycle_repeats=3, cycle_tail=3))
    assert schedule.encoder == (0, 1) and schedule.middle == (2, 3) * 3 and schedule.decoder == (4, 5, 6)
    assert schedule.plain == () and schedule.num_skips == 2
    # Tail block 4 gets stem block 1's output and block 5 gets block 0's: zeroing skip weight 0
    # removes exactly stem 1's contribution.
    model = randomise(tiny(num_layers=7, cycle_stem=2, cycle_core=2, cycle_repeats=3, cycle_tail=3), seed=9)
    x = ids()
    with torch.no_grad():
        model.skip_weights[0].zero_()
        got = model.logits(x)
        h = h0 = rms(model.tok_emb(x))
        h = model.blocks[0](h, h0)
        stem0 = h
        h = model.blocks[1](h, h0)
        for _ in range(3):
            h = model.blocks[3](model.blocks[2](h, h0), h0)
        h = model.blocks[4](h, h0)
        h = model.blocks[5](h + model.skip_weights[1] * stem0, h0)
        h = model.blocks[6](h, h0)
    assert torch.equal(got, head(model, h))


# ----------------------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.mlp=relu3"], "model.mlp must be one of relu2, leaky_relu2, gelu, silu, swiglu, got 'relu3'"),
    (["model.mlp=swiglu", "model.mlp_mult=4"], "model.mlp_mult=4 does not apply to model.mlp=swiglu"),
    (["model.mlp_hidden=-1"], "model.mlp_hidden must be >= 0"),
    (["model.mlp=leaky_relu2", "model.mlp_slope=1.5"], "model.mlp_slope must be within [0, 1]"),
    (["model.recurrence=0"], "model.recurrence must be >= 1"),
    (["model.cycle_stem=2", "model.cycle_core=3", "model.cycle_repeats=2", "model.cycle_tail=2"],
     "model.num_layers=9 must equal model.cycle_stem + model.cycle_core + model.cycle_tail = 7"),
    (["model.num_layers=7", "model.cycle_stem=2", "model.cycle_core=3", "model.cycle_repeats=2",
      "model.cycle_tail=2", "model.recurrence=2"], "model.recurrence and the middle cycle"),
    (["model.num_layers=4", "model.cycle_stem=2", "model.cycle_tail=2"], "needs model.cycle_core >= 1"),
    (["model.num_layers=4", "model.cycle_stem=1", "model.cycle_core=2", "model.cycle_tail=1"],
     "model.cycle_repeats >= 1"),
    (["train.eval_stride=2000"], "train.eval_stride must be within 0..train.train_seq_len=1024"),
    (["model.attention=mha"], "model.attention must be one of gqa, got 'mha'"),
    (["model.position=alibi"], "model.position must be one of rope, got 'alibi'"),
    (["model.layout=ring"], "model.layout must be one of unet, recurrence, middle_cycle, loop, auto, got 'ring'"),
    (["model.layout=unet", "model.recurrence=2"], "model.layout=unet runs every block once"),
])
def test_bad_architecture_switches_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, overrides, env={})
    assert message in str(err.value)


def test_swiglu_error_names_the_fix():
    with pytest.raises(ConfigError, match=r"1408\); set model.mlp_hidden instead"):
        resolve_config(None, ["model.mlp=swiglu", "model.mlp_mult=4"], env={})
    cfg, _ = resolve_config(None, ["model.mlp=swiglu", "model.mlp_mult=4", "model.mlp_hidden=1024"], env={})
    assert mlp_hidden_size(cfg.model) == 1024


def test_good_switches_resolve():
    cfg, _ = resolve_config(None, ["model.mlp=leaky_relu2", "model.mlp_slope=0.5", "model.recurrence=2",
                                   "train.eval_stride=64"], env={})
    assert (cfg.model.mlp, cfg.model.recurrence, cfg.train.eval_stride) == ("leaky_relu2", 2, 64)


# ----------------------------------------------------------------------------------------
# Tiny end-to-end runs
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [["model.mlp=leaky_relu2"], ["model.mlp=swiglu"], ["model.mlp=gelu"],
                                      ["model.mlp=silu"]])
def test_tiny_training_run_per_mlp_variant(tmp_path, switches):
    cfg = tiny_config(tmp_path, "train.iterations=2", "train.val_loss_every=0", "train.warmup_steps=0", *switches)
    summary = run_training(cfg, console=False)
    assert summary["status"] == "done" and summary["steps"] == 2
    assert math.isfinite(summary["roundtrip"]["val_bpb"])
    log = (tmp_path / "runs" / summary["run_id"] / "train.log").read_text()
    assert f"architecture: mlp {switches[0].split('=')[1]}" in log


def test_tiny_training_run_with_recurrence_and_sliding_final_eval(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=3", "train.val_loss_every=0", "model.recurrence=2",
                      "train.eval_stride=16")
    summary = run_training(cfg, console=False)
    run_dir = tmp_path / "runs" / summary["run_id"]
    assert summary["status"] == "done" and summary["roundtrip_stride"] == 16
    log = (run_dir / "train.log").read_text()
    assert "unique_depth: 3  effective_depth: 6" in log
    assert "roundtrip eval: sliding windows, seq_len 64, stride 16" in log
    receipt = json.loads((run_dir / "receipts" / "roundtrip.json").read_text())
    assert receipt["kind"] == "sliding" and receipt["settings"] == {"seq_len": 64, "stride": 16}
    assert summary["roundtrip"]["tokens"] == summary["pre_quant"]["tokens"] == 4096  # every target once
    assert audit_file(run_dir / "receipts" / "roundtrip.json").val_bpb == summary["roundtrip"]["val_bpb"]
    final = [e for e in read_metrics(run_dir) if e["event"] == "final"][0]
    assert final["roundtrip_stride"] == 16


def test_tiny_training_run_standard_final_eval_by_default(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=2", "train.val_loss_every=0", "model.num_layers=3",
                      "model.cycle_stem=1", "model.cycle_core=1", "model.cycle_repeats=2", "model.cycle_tail=1")
    summary = run_training(cfg, console=False)
    run_dir = tmp_path / "runs" / summary["run_id"]
    assert summary["status"] == "done" and summary["roundtrip_stride"] == 64
    assert json.loads((run_dir / "receipts" / "roundtrip.json").read_text())["kind"] == "standard"
    assert "unique_depth: 3  effective_depth: 4" in (run_dir / "train.log").read_text()
