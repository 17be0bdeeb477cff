"""Document-masked attention (model.doc_mask, model.max_span; #1855's varlen attention): the
segments follow #1855's cu_seqlens, the masked model equals a float64 run of each segment on its
own, and no output reads an earlier document."""

from __future__ import annotations

import pytest
import torch

from pgolf.config import Config, ConfigError
from pgolf.config.checks import validate
from pgolf.model.attention import document_mask, document_segments, flex_attention
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, model_config_problems
from tests.model.test_model import randomise

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
BOS = 1


def tiny(**keys) -> GPT:
    torch.manual_seed(0)
    return randomise(GPT(ModelConfig(**{**TINY, **keys})), seed=2)


def reference_starts(row: list[int], max_span: int) -> list[int]:
    """#1855's _build_cu_seqlens, restated: 0 and every BOS start a document; a long document
    is cut every max_span positions from its start."""
    docs = sorted({0} | {i for i, t in enumerate(row) if t == BOS}) + [len(row)]
    starts = []
    for a, b in zip(docs, docs[1:]):
        starts += list(range(a, b, max_span)) if max_span else [a]
    return starts


def packed_row(seed: int, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(2, 64, (length,), generator=g)
    row[[3, 9, 10, 30]] = BOS  # a leading fragment, a one-token document, a long one, a tail
    return row


@pytest.mark.parametrize("max_span", [0, 1, 4, 7, 64])
def test_segments_follow_1855_cu_seqlens(max_span):
    rows = torch.stack([packed_row(0), packed_row(1)])
    rows[1, 0] = BOS
    seg = document_segments(rows, BOS, max_span)
    for r in range(2):
        starts = [i for i in range(rows.size(1)) if i == 0 or seg[r, i] != seg[r, i - 1]]
        assert starts == reference_starts(rows[r].tolist(), max_span)


@pytest.mark.parametrize("keys", [{}, dict(max_span=6), dict(xsa_layers=[-1], attn_gate_dims=8, max_span=5)])
def test_masked_model_equals_each_segment_alone_float64(keys):
    model = tiny(doc_mask=True, **keys).double()
    plain = tiny(**{k: v for k, v in keys.items() if k != "max_span"}).double()
    plain.load_state_dict(model.state_dict())
    rows = torch.stack([packed_row(2), packed_row(3)])
    got = model.logits(rows)
    seg = document_segments(rows, BOS, keys.get("max_span", 0))
    for r in range(rows.size(0)):
        for s in seg[r].unique():
            idx = (seg[r] == s).nonzero().flatten()
            alone = plain.logits(rows[r:r + 1, idx])[0]  # the causal model on this segment only
            torch.testing.assert_close(got[r, idx], alone, rtol=1e-10, atol=1e-10)


def test_earlier_documents_do_not_reach_later_ones():
    model = tiny(doc_mask=True, max_span=8)
    row = packed_row(4)[None]
    changed = row.clone()
    changed[0, 11:17] = (changed[0, 11:17] + 5) % 60 + 2  # inside the long document's first segment
    changed[0, 4:9] = 7  # the document before it
    a, b = model.logits(row), model.logits(changed)
    torch.testing.assert_close(a[0, 18:], b[0, 18:], rtol=0, atol=0)  # its next segment (18..25) on
    assert not torch.equal(a[0, 11:18], b[0, 11:18])


def test_off_is_the_plain_causal_model():
    row = packed_row(5)[None]
    assert torch.equal(tiny().logits(row), tiny(doc_mask=False, max_span=0).logits(row))
    # With no BOS and no cap, the mask is plain causal attention.
    no_bos = torch.where(row == BOS, 5, row)
    torch.testing.assert_close(tiny(doc_mask=True).logits(no_bos), tiny().logits(no_bos), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(flex_attention is None, reason="torch without flex_attention")
def test_flex_block_mask_equals_the_sdpa_mask():
    """The CUDA path's BlockMask, run here by flex_attention's eager CPU fallback."""
    import warnings

    rows = torch.stack([packed_row(6, 48), packed_row(7, 48)])
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 48, 8, generator=g), torch.randn(2, 2, 48, 8, generator=g), torch.randn(2, 2, 48, 8, generator=g)
    dense = document_mask(rows, BOS, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = document_mask(rows, BOS, 5, flex=True)
        y = flex_attention(q, k, v, block_mask=block, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_validation_names_the_keys():
    assert any("model.doc_mask=true" in p for p in model_config_problems(ModelConfig(**TINY, max_span=2048)))
    assert any("model.bos_id" in p for p in model_config_problems(ModelConfig(**TINY, doc_mask=True, bos_id=64)))
    assert model_config_problems(ModelConfig(**TINY, doc_mask=True, max_span=2048)) == []
    config = Config()
    config.model.doc_mask, config.model.max_span = True, -1
    with pytest.raises(ConfigError, match="model.max_span"):
        validate(config)
