"""The synthetic Markov source: its exact entropy rate is the project's bpb oracle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pgolf.data.synthetic import DEFAULT_ALPHABET, MarkovSource, write_synthetic_corpus
from pgolf.data.tokenizer import ByteTokenizer, bits_per_byte


def _h2(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@pytest.fixture(scope="module")
def source() -> MarkovSource:
    return MarkovSource(seed=0)


@pytest.fixture(scope="module")
def stream(source) -> np.ndarray:
    """2M bytes of one run of the chain, as symbol indices."""
    data = source.sample(2_000_000, seed=7)
    return source._indices(data)


def _triple_counts(idx: np.ndarray, k: int) -> np.ndarray:
    code = (idx[:-2] * k + idx[1:-1]) * k + idx[2:]
    return np.bincount(code, minlength=k**3).reshape(k, k, k).astype(np.float64)


def test_two_symbol_chain_closed_form():
    # Next symbol depends only on the previous one: P(1|0) = p, P(0|1) = q.
    p, q = 0.1, 0.3
    probs = np.zeros((2, 2, 2))
    probs[:, 0] = [1 - p, p]
    probs[:, 1] = [q, 1 - q]
    src = MarkovSource.from_transitions(probs, alphabet="ab")
    pi0 = q / (p + q)
    want = pi0 * _h2(p) + (1 - pi0) * _h2(q)
    assert src.entropy_rate_bits() == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(src.marginal(), [pi0, 1 - pi0], atol=1e-12)
    # A genuinely order-2 chain: the next symbol is "a" iff the last two differ
    # (with noise e): pair states ab, ba go to (b, a) w.p. 1-e; aa, bb flip w.p. e.
    e = 0.2
    probs = np.zeros((2, 2, 2))
    for a in range(2):
        for b in range(2):
            same = a == b
            probs[a, b] = [e, 1 - e] if same else [1 - e, e]
    src = MarkovSource.from_transitions(probs, alphabet="ab")
    assert src.entropy_rate_bits() == pytest.approx(_h2(e), abs=1e-12)  # every state has entropy h(e)


def test_default_source_parameters(source):
    h = source.entropy_rate_bits()
    assert 1.5 < h < 2.5
    assert source.k == 32 and source.alphabet == DEFAULT_ALPHABET
    assert all(32 <= ord(c) < 127 for c in DEFAULT_ALPHABET)
    pi = source.pair_stationary
    assert abs(pi.sum() - 1) < 1e-12 and (pi > 0).all()
    # Stationarity of the pair chain: pi'(b, c) = sum_a pi(a, b) P(c | a, b).
    np.testing.assert_allclose(np.einsum("ab,abc->bc", pi, source.probs), pi, atol=1e-13, rtol=0)
    assert source.optimal_bpb(1) > source.optimal_bpb(100) > source.optimal_bpb(10_000) > h
    assert MarkovSource(seed=1).entropy_rate_bits() != h


def test_deterministic_given_seed(source):
    a = source.sample(5000, seed=3)
    assert a == MarkovSource(seed=0).sample(5000, seed=3)
    assert a != source.sample(5000, seed=4)
    assert set(a) <= set(DEFAULT_ALPHABET.encode())
    d = source.sample_docs(4, 300, seed=5)
    assert d.shape == (4, 300) and d.dtype == np.uint8
    np.testing.assert_array_equal(d, source.sample_docs(4, 300, seed=5))
    np.testing.assert_array_equal(MarkovSource(seed=2).probs, MarkovSource(seed=2).probs)


def test_empirical_conditional_entropy_matches_rate(source, stream):
    counts = _triple_counts(stream, source.k)
    ctx = counts.sum(axis=2, keepdims=True)
    nz = counts > 0
    h_emp = -(counts[nz] * np.log2((counts / np.where(ctx > 0, ctx, 1))[nz])).sum() / counts.sum()
    assert h_emp == pytest.approx(source.entropy_rate_bits(), abs=0.02)
    # Single-symbol frequencies match the stationary marginal.
    freq = np.bincount(stream, minlength=source.k) / stream.size
    np.testing.assert_allclose(freq, source.marginal(), atol=0.005)


def test_parallel_docs_have_the_same_statistics(source):
    docs = source._indices(source.sample_docs(500, 2000, seed=11).tobytes()).reshape(500, 2000)
    counts = sum(_triple_counts(row, source.k) for row in docs)
    ideal = -(counts * np.log2(source.probs)).sum() / counts.sum()  # true-model cross-entropy
    assert ideal == pytest.approx(source.entropy_rate_bits(), abs=0.02)


def test_count_predictor_cannot_beat_the_rate(source, stream):
    k = source.k
    train = stream
    test = source._indices(source.sample(300_000, seed=99))
    counts = _triple_counts(train, k) + 0.01  # add-small smoothing
    model = counts / counts.sum(axis=2, keepdims=True)
    bits = -np.log2(model[test[:-2], test[1:-1], test[2:]])
    ce = float(bits.mean())
    truth = float(-np.log2(source.probs[test[:-2], test[1:-1], test[2:]]).mean())
    h = source.entropy_rate_bits()
    noise = 0.02
    assert truth == pytest.approx(h, abs=noise)
    assert ce >= h - noise  # nothing learned from data beats the source
    assert ce >= truth - 1e-3  # ... and the fitted model is no better than the truth here
    assert ce <= h + 0.05  # but a 2M-byte count model gets close
    # Through the project's bpb path: ByteTokenizer LUTs + bits_per_byte.
    tok = ByteTokenizer()
    ids = np.array([tok.bos_id, *(source.symbols[test] + 4)])
    nbytes = tok.byte_luts().count_bytes(ids[2:-1], ids[3:])
    assert nbytes == test.size - 2
    assert bits_per_byte(bits.sum() * math.log(2), bits.size, nbytes) == pytest.approx(ce, rel=1e-12)


def test_ideal_bits_matches_expectation(source):
    docs = source.sample_docs(200, 256, seed=21)
    mean_bits = np.mean([source.ideal_bits(row.tobytes()) for row in docs]) / 256
    assert mean_bits == pytest.approx(source.optimal_bpb(256), abs=0.03)


def test_write_synthetic_corpus(tmp_path):
    meta = write_synthetic_corpus(tmp_path, train_tokens=50_000, val_tokens=20_000, seed=0, doc_bytes=1000)
    tok = ByteTokenizer()
    src = MarkovSource(seed=0)
    on_disk = json.loads((tmp_path / "synthetic.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert meta["entropy_rate_bits"] == pytest.approx(src.entropy_rate_bits(), abs=0)
    assert meta["optimal_bpb"] > meta["entropy_rate_bits"]
    assert meta["vocab_size"] == 260 and meta["tokenizer"] == "byte260"
    splits = {}
    for split, n in (("train", 50_000), ("val", 20_000)):
        path = tmp_path / f"synthetic_{split}_000000.bin"
        header = np.fromfile(path, dtype="<i4", count=256)
        assert list(header[:3]) == [20240520, 1, n] and not header[3:].any()
        tokens = np.fromfile(path, dtype="<u2", offset=1024)
        assert tokens.size == n
        starts = np.flatnonzero(tokens == tok.bos_id)
        np.testing.assert_array_equal(starts, np.arange(0, n, 1001))
        assert tokens.min() >= 1 and tokens.max() < 260
        text = tok.decode(tokens)
        assert set(text) <= set(DEFAULT_ALPHABET)
        nbytes = tok.byte_luts().count_bytes(tokens[:-1], tokens[1:])
        assert nbytes == n - starts.size == meta["splits"][split]["bytes"]
        splits[split] = tokens
    assert not np.array_equal(splits["train"][:20_000], splits["val"])
    # The true model scores the val docs near the exact optimum; never far below the rate.
    val = splits["val"]
    docs = np.split(val, np.flatnonzero(val == tok.bos_id)[1:])
    bits = sum(src.ideal_bits(tok.decode_bytes(d)) for d in docs)
    nbytes = sum(d.size - 1 for d in docs)
    assert bits / nbytes == pytest.approx(meta["optimal_bpb"], abs=0.05)
    # Deterministic; refuses to overwrite unless asked.
    with pytest.raises(FileExistsError):
        write_synthetic_corpus(tmp_path, 50_000, 20_000, seed=0, doc_bytes=1000)
    again = write_synthetic_corpus(tmp_path, 50_000, 20_000, seed=0, doc_bytes=1000, overwrite=True)
    assert again == meta
    np.testing.assert_array_equal(np.fromfile(tmp_path / "synthetic_val_000000.bin", dtype="<u2", offset=1024), val)
