"""val_loss / val_bpb: exact accounting against an independent window-by-window computation,
invariance to the batch size, and rank sharding that sums back to the single-rank totals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pgolf.config import ModelConfig
from pgolf.eval.windows import evaluate_bpb
from pgolf.model.gpt import GPT
from pgolf.data.tokenizer import ByteTokenizer

CPU = torch.device("cpu")
V = 64
L = 16
N_WINDOWS = 7
TINY = dict(vocab_size=V, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def val_tokens(seed: int = 0, windows: int = N_WINDOWS, tail: int = 5) -> torch.Tensor:
    """windows * L + 1 scored tokens plus `tail` extra tokens that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (windows * L + 1 + tail,), generator=g, dtype=torch.int64).to(torch.uint16)


def hand_luts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 5, (V,), generator=g).to(torch.int16)
    lead = torch.rand(V, generator=g) < 0.5
    boundary = torch.rand(V, generator=g) < 0.25
    return base, lead, boundary


class PrefixScorer(nn.Module):
    """A float64 'language model' whose logits depend on the token, its position in the
    window and the whole prefix (through a running sum), so mis-windowing would show."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.token = nn.Parameter(2 * torch.randn(V, V, generator=g, dtype=torch.float64))
        self.position = nn.Parameter(torch.randn(L, V, generator=g, dtype=torch.float64))
        self.context = nn.Parameter(torch.randn(V, V, generator=g, dtype=torch.float64))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        prefix = torch.cumsum(x, dim=-1) % V
        return self.token[x] + self.position[: x.size(-1)] + self.context[prefix]

    def forward(self, x, y, reduction="mean"):
        return F.cross_entropy(self.logits(x).reshape(-1, V), y.reshape(-1), reduction=reduction)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**TINY))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # leave init: give the zero projections and the head real values
        for name, p in model.named_parameters():
            if p.ndim == 2 and "resid_mix" not in name and "skip" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / (1 if name == "tok_emb.weight" else math.sqrt(p.shape[1])))
    return model


def reference(model, tokens: torch.Tensor, luts, first: int = 0, last: int | None = None):
    """(loss_sum nats, tokens, bytes) window by window, float64 log-softmax, bytes by a loop."""
    base, lead, boundary = (t.tolist() for t in luts)
    ids = tokens.long().tolist()
    last = (len(ids) - 1) // L if last is None else last
    loss_sum, count, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for w in range(first, last):
            x = torch.tensor(ids[w * L : (w + 1) * L])
            y = torch.tensor(ids[w * L + 1 : (w + 1) * L + 1])
            logp = torch.log_softmax(model.logits(x[None])[0].double(), dim=-1)
            loss_sum -= logp[torch.arange(L), y].sum().item()
            count += L
            for prev, tgt in zip(x.tolist(), y.tolist()):
                nbytes += base[tgt] + (1 if lead[tgt] and not boundary[prev] else 0)
    return loss_sum, count, nbytes


def run(model, tokens, luts, batch_tokens=3 * L, rank=0, world_size=1):
    return evaluate_bpb(model, tokens, luts, L, batch_tokens, CPU, rank=rank, world_size=world_size)


# ----------------------------------------------------------------------------------------

def test_exact_against_reference_float64_scorer():
    model, tokens, luts = PrefixScorer(), val_tokens(1), hand_luts(1)
    res = run(model, tokens, luts)
    loss_sum, count, nbytes = reference(model, tokens, luts)
    assert res.tokens == count == N_WINDOWS * L
    assert res.bytes == nbytes
    assert res.loss_sum == pytest.approx(loss_sum, rel=1e-12)
    assert res.val_loss == pytest.approx(loss_sum / count, rel=1e-12)
    assert res.val_bpb == pytest.approx(loss_sum / math.log(2) / nbytes, rel=1e-12)
    # The hand-made tables exercise every branch of the byte rule.
    base, lead, boundary = luts
    ids = tokens.long()[: N_WINDOWS * L + 1]
    assert res.bytes != int(base.long()[ids[1:]].sum())  # the leading-space byte matters
    assert bool((lead[ids[1:]] & boundary[ids[:-1]]).any())  # ...and is dropped after boundaries


def test_gpt_matches_reference_with_byte_tokenizer_luts():
    model = tiny_gpt()
    tokens = val_tokens(2)
    luts = ByteTokenizer().byte_luts(V).to_torch("cpu")
    res = run(model, tokens, luts)
    loss_sum, count, nbytes = reference(model, tokens, luts)
    # Byte tokenizer: ids 0-3 are specials (0 bytes), every other id is one byte.
    targets = tokens.long()[1 : N_WINDOWS * L + 1]
    assert nbytes == int((targets >= 4).sum())
    assert res.tokens == count and res.bytes == nbytes
    # The model's own cross-entropy is fp32; the reference sums float64 log-probabilities.
    assert res.loss_sum == pytest.approx(loss_sum, rel=2e-6)
    assert res.val_bpb == pytest.approx(loss_sum / math.log(2) / nbytes, rel=2e-6)
    assert res.val_bpb == pytest.approx(res.val_loss / math.log(2) * res.tokens / res.bytes, rel=1e-14)
    assert 2.0 < res.val_loss < 20.0  # a random, non-uniform model


def test_gpt_hand_luts_bytes_exact():
    model, tokens, luts = tiny_gpt(3), val_tokens(3), hand_luts(3)
    res = run(model, tokens, luts, batch_tokens=10**6)
    loss_sum, count, nbytes = reference(model, tokens, luts)
    assert (res.tokens, res.bytes) == (count, nbytes)
    assert res.loss_sum == pytest.approx(loss_sum, rel=2e-6)


@pytest.mark.parametrize("model_kind", ["scorer", "gpt"])
def test_batch_size_does_not_change_the_result(model_kind):
    model = PrefixScorer(4) if model_kind == "scorer" else tiny_gpt(4)
    tokens, luts = val_tokens(4), hand_luts(4)
    results = [run(model, tokens, luts, batch_tokens=b) for b in (L, 3 * L, int(2.5 * L), N_WINDOWS * L, 10**6)]
    tol = 1e-12 if model_kind == "scorer" else 1e-6
    for r in results[1:]:
        assert (r.tokens, r.bytes) == (results[0].tokens, results[0].bytes)
        assert r.loss_sum == pytest.approx(results[0].loss_sum, rel=tol)
        assert r.val_bpb == pytest.approx(results[0].val_bpb, rel=tol)


@pytest.mark.parametrize("world_size, windows_per_rank", [(2, [3, 4]), (3, [2, 2, 3])])
@pytest.mark.parametrize("model_kind", ["scorer", "gpt"])
def test_rank_shards_sum_to_single_rank_totals(world_size, windows_per_rank, model_kind):
    # Without a process group no all-reduce happens, so each call returns one rank's sums.
    model = PrefixScorer(5) if model_kind == "scorer" else tiny_gpt(5)
    tokens, luts = val_tokens(5), hand_luts(5)
    single = run(model, tokens, luts)
    shards = [run(model, tokens, luts, rank=r, world_size=world_size) for r in range(world_size)]
    # Contiguous shards: rank r scores windows [7r//W, 7(r+1)//W).
    assert [s.tokens for s in shards] == [n * L for n in windows_per_rank]
    first = 0
    for shard, n in zip(shards, windows_per_rank):
        ref = reference(model, tokens, luts, first, first + n)
        assert shard.bytes == ref[2]
        assert shard.loss_sum == pytest.approx(ref[0], rel=1e-12 if model_kind == "scorer" else 2e-6)
        first += n
    assert sum(s.tokens for s in shards) == single.tokens
    assert sum(s.bytes for s in shards) == single.bytes
    tol = 1e-9 if model_kind == "scorer" else 1e-6
    assert sum(s.loss_sum for s in shards) == pytest.approx(single.loss_sum, rel=tol)


def test_short_validation_split_raises():
    model, luts = PrefixScorer(), hand_luts()
    with pytest.raises(ValueError, match="seq_len"):
        run(model, torch.zeros(L, dtype=torch.int64), luts)
    res = run(model, torch.arange(L + 1, dtype=torch.int64) % V, luts)  # exactly one window
    assert res.tokens == L


def test_restores_training_mode_and_leaves_weights_alone():
    model = tiny_gpt(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, luts = val_tokens(6), hand_luts(6)
    model.train()
    run(model, tokens, luts)
    assert model.training
    model.eval()
    run(model, tokens, luts)
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_training_after_evaluation():
    # Tables cached during evaluation (rotary cos/sin) must not be inference-mode tensors.
    model = tiny_gpt(7)
    run(model, val_tokens(7), hand_luts(7))
    x = torch.randint(0, V, (2, L))
    model(x, x.roll(-1, 1)).backward()
