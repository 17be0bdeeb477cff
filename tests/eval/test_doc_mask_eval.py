"""Evaluation with model.doc_mask: through the normal score path (pgolf.eval.windows), a window's
tokens before a BOS give no context to the tokens after it, so each document scores the same
whatever precedes it, and each target equals a float64 run on its own segment of the window."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import ModelConfig
from pgolf.data.tokenizer import ByteTokenizer
from pgolf.eval.windows import evaluate_bpb, score_windows, window_plan
from pgolf.model.gpt import GPT
from tests.model.test_model import randomise

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
V, L, STRIDE, BOS = 64, 16, 4, 1
TINY = dict(vocab_size=V, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2)
DOCS = (20, 45, 52)  # BOS positions: documents 0..19, 20..44, 45..51, 52..
LUTS = ByteTokenizer().byte_luts(V).to_torch("cpu")


def tiny(**keys) -> GPT:
    torch.manual_seed(0)
    return randomise(GPT(ModelConfig(**TINY, **keys)), seed=3)


def stream(seed: int, length: int = 6 * L + 1) -> torch.Tensor:
    tokens = torch.randint(2, V, (length,), generator=torch.Generator().manual_seed(seed))
    tokens[list(DOCS)] = BOS
    return tokens.to(torch.uint16)


def later_documents_loss(model: GPT, tokens: torch.Tensor) -> float:
    """Nats of the targets after the BOS at DOCS[0], sliding windows reaching back before it."""
    windows = window_plan(tokens.numel() - 1, L, STRIDE, lo=DOCS[0])
    assert windows[0].start < DOCS[0]
    return score_windows(model, tokens, windows, LUTS, CPU, batch_windows=3).loss_sum


@pytest.mark.parametrize("max_span", [0, 6])
def test_a_document_scores_the_same_whatever_precedes_it(max_span):
    a, b = stream(0), stream(0)
    b[:DOCS[0]] = stream(1)[:DOCS[0]]  # another first document, same length
    masked = tiny(doc_mask=True, max_span=max_span)
    assert later_documents_loss(masked, a) == later_documents_loss(masked, b)
    plain = tiny()
    assert later_documents_loss(plain, a) != later_documents_loss(plain, b)


@pytest.mark.parametrize("max_span", [0, 5])
def test_each_target_is_scored_from_its_own_segment_of_the_window(max_span):
    tokens = stream(2)
    masked, plain = tiny(doc_mask=True, max_span=max_span), tiny().double()
    res = evaluate_bpb(masked, tokens, LUTS, L, 3 * L, CPU, stride=STRIDE)
    ids = tokens.long()
    expected = 0.0
    with torch.no_grad():
        for w in window_plan(ids.numel() - 1, L, STRIDE):
            for t in range(w.first_scored, w.end + 1):  # target t, read at input position t - 1
                doc = max([w.start] + [d for d in DOCS if d <= t - 1])
                start = doc + (t - 1 - doc) // max_span * max_span if max_span else doc
                logp = torch.log_softmax(plain.logits(ids[None, start:t])[0, -1], -1)
                expected -= logp[ids[t]].item()
    assert res.tokens == ids.numel() - 1
    assert res.loss_sum == pytest.approx(expected, rel=2e-6)
