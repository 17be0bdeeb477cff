"""The legality probes (pgolf.eval.probes) on deliberately broken models: each is caught, and
pgolf's own models, the #549 switches included, pass. C1: a model that peeks one token ahead, a
smear that mixes in the next position, TTT that adapts before it scores. C2: unnormalized scores,
a distribution over buckets, a target-keyed score."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from pgolf.data.tokenizer import ByteTokenizer
from pgolf.eval.probes import causal_probe, normalization_probe, sample_windows, ttt_state_probe
from pgolf.eval.ttt import TTTConfig, run_ttt
from pgolf.eval.windows import window_plan
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
VOCAB, BOS, SEQ = 64, 1, 32
TINY = dict(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
PR549 = dict(embed=["bigram"], post_norm=["smear"], stream=["value_embed"], xsa_layers=[-1], bigram_buckets=64,
             bigram_dim=16, ve_dim=16, ve_layers=[-1], rope_dims=8, ln_scale=True)


def model(seed: int = 0, cls=GPT, **switches) -> GPT:
    """A tiny GPT with every weight random (the zero-initialised tables and projections too, so
    every add-on moves the scores)."""
    torch.manual_seed(seed)
    m = cls(ModelConfig(**TINY, **switches))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and "resid_mix" not in name:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return m.eval()


def stream(n: int = 400, doc: int = 37, seed: int = 0) -> torch.Tensor:
    """Documents of `doc` tokens ([BOS] + text), back to back."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (n,), generator=g)
    tokens[::doc] = BOS
    return tokens


def windows(tokens, stride=SEQ, count=3):
    return sample_windows(tokens, SEQ, stride, BOS, count)


# --- broken models ------------------------------------------------------------------------------------

class PeeksAhead(GPT):
    """Raises the logit of the token that comes next: a one-token look-ahead."""

    def logits(self, input_ids):
        out = super().logits(input_ids)
        ahead = torch.cat((input_ids[:, 1:], input_ids[:, -1:]), dim=1)
        return out + 3.0 * F.one_hot(ahead, out.size(-1))


def smear_next(gate, x, input_ids):
    """A SmearGate mixing in the *next* position instead of the previous one."""
    s = torch.sigmoid(gate.gate.to(x.dtype))
    following = torch.cat((x[:, 1:], torch.zeros_like(x[:, :1])), dim=1)
    return (1 - s) * x + s * following


class Unnormalized(GPT):
    """Scores exp(logit) as the probability, never divided by the sum: the n-gram caches that
    summed to ~277 instead of 1."""

    def log_probs(self, input_ids):
        return self.logits(input_ids)

    def forward(self, input_ids, target_ids, reduction="mean"):
        scores = -self.logits(input_ids).float().gather(-1, target_ids[..., None]).squeeze(-1)
        return scores.reshape(-1) if reduction == "none" else scores.sum()


class ScoresRawLogits(GPT):
    """The distribution is a proper softmax, but the score reads the raw logit of the target."""

    def forward(self, input_ids, target_ids, reduction="mean"):
        scores = -self.logits(input_ids).float().gather(-1, target_ids[..., None]).squeeze(-1)
        return scores.reshape(-1) if reduction == "none" else scores.sum()


class Buckets(GPT):
    """A distribution over hash buckets, not over the vocabulary."""

    def log_probs(self, input_ids):
        return torch.log_softmax(self.logits(input_ids)[..., : VOCAB // 2].float(), dim=-1)


class TargetKeyed(GPT):
    """A cache keyed by the target: the realized token gets extra mass in the score."""

    def forward(self, input_ids, target_ids, reduction="mean"):
        logits = self.logits(input_ids).float() + 4.0 * F.one_hot(target_ids, VOCAB)
        return F.cross_entropy(logits.reshape(-1, VOCAB), target_ids.reshape(-1), reduction=reduction)


# --- windows ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [SEQ, 8])
def test_sampled_windows_are_the_evaluations_own(stride):
    tokens = stream()
    total = tokens.numel() - 1
    plan = window_plan(total, SEQ, stride)
    chosen = windows(tokens, stride)
    assert chosen[0] == plan[0] and len(chosen) == 3
    assert all(w in plan for w in chosen)
    # One holds a document boundary strictly inside it.
    assert any((tokens[w.start + 1: w.end] == BOS).any() for w in chosen[1:])


# --- C1 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [{}, PR549], ids=["baseline", "pr549-switches"])
@pytest.mark.parametrize("stride", [SEQ, 8], ids=["standard", "sliding"])
def test_pgolf_models_are_causal(switches, stride):
    tokens = stream()
    result = causal_probe(model(**switches), tokens, windows(tokens, stride), VOCAB, CPU, BOS)
    assert result.ok, result.detail
    assert "bit for bit" in result.detail and result.checks >= 9
    assert "at document boundaries" in result.detail and " 0 at document" not in result.detail


def test_a_model_peeking_one_token_ahead_is_caught():
    tokens = stream()
    result = causal_probe(model(cls=PeeksAhead), tokens, windows(tokens), VOCAB, CPU, BOS)
    assert not result.ok
    assert "changing the next token from token" in result.detail
    assert "sees tokens after the one it predicts" in result.detail


def test_a_smear_of_the_next_position_is_caught(monkeypatch):
    import pgolf.model.embed as embed

    m = model(**PR549)
    assert causal_probe(m, stream(), windows(stream()), VOCAB, CPU, BOS).ok
    monkeypatch.setattr(embed.SmearGate, "forward", lambda self, x, ids: smear_next(self, x, ids))
    result = causal_probe(m, stream(), windows(stream()), VOCAB, CPU, BOS)
    assert not result.ok and "changed an earlier score" in result.detail


# --- C2 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("switches", [{}, PR549], ids=["baseline", "pr549-switches"])
def test_pgolf_models_are_normalized(switches):
    tokens = stream()
    result = normalization_probe(model(**switches), tokens, windows(tokens), VOCAB, CPU)
    assert result.ok, result.detail
    assert f"covers all {VOCAB} tokens and sums to 1" in result.detail


@pytest.mark.parametrize("cls, message", [
    (Unnormalized, "the distribution sums to"),
    (ScoresRawLogits, "the scored probability is not read from that distribution"),
    (Buckets, f"the distribution has {VOCAB // 2} entries but the vocabulary has {VOCAB} tokens"),
    (TargetKeyed, "the scored probability is not read from that distribution"),
])
def test_unnormalized_scores_are_caught(cls, message):
    tokens = stream()
    result = normalization_probe(model(cls=cls), tokens, windows(tokens), VOCAB, CPU)
    assert not result.ok and message in result.detail, result.detail


def test_the_unnormalized_sum_is_named():
    tokens = stream()
    result = normalization_probe(model(cls=Unnormalized), tokens, windows(tokens), VOCAB, CPU)
    total = float(result.detail.split("sums to ")[1].split(",")[0])
    assert abs(total - 1) > 0.1


# --- C1 for TTT -----------------------------------------------------------------------------------------

def ttt_probe(runner=None, **switches):
    base = model(**switches)
    luts = ByteTokenizer().byte_luts(VOCAB).to_torch("cpu")
    tcfg = TTTConfig(chunk_tokens=64, lr=0.05, epochs=1, batch_seqs=2)
    return ttt_state_probe(lambda: copy.deepcopy(base), stream(3 * 64 + 1), luts, VOCAB, SEQ, 16, 8, tcfg, CPU,
                           runner=runner)


@pytest.mark.parametrize("switches", [{}, PR549], ids=["baseline", "pr549-switches"])
def test_score_first_ttt_passes(switches):
    result = ttt_probe(**switches)
    assert result.ok, result.detail
    assert result.checks == 2 and "bit-identical" in result.detail


def test_ttt_that_adapts_before_scoring_is_caught():
    result = ttt_probe(functools.partial(run_ttt, illegal_train_first=True))
    assert not result.ok and "chunk 0" in result.detail and "updated before its first score" in result.detail


def test_ttt_that_looks_at_the_next_chunk_is_caught():
    """Scores each chunk first, but adapts on the chunk after it too before moving on: chunk 1's
    scoring state then depends on chunk 1's own tokens."""

    def lookahead(model, tokens, luts, seq_len, stride, batch, cfg, device, **kwargs):
        import pgolf.eval.ttt as ttt

        real = ttt.adapt_on_chunk

        def adapt(runner, toks, lo, hi, *args):
            return real(runner, toks, lo, min(hi + cfg.chunk_tokens, toks.numel() - 1), *args)

        ttt.adapt_on_chunk = adapt
        try:
            return run_ttt(model, tokens, luts, seq_len, stride, batch, cfg, device, **kwargs)
        finally:
            ttt.adapt_on_chunk = real

    result = ttt_probe(lookahead)
    assert not result.ok and "it trained on tokens not yet scored" in result.detail
