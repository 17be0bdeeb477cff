"""A synthetic corpus whose entropy rate is known exactly: the project's test oracle.

``MarkovSource`` is a random order-2 Markov chain over a small alphabet of ASCII
characters. Its entropy rate (bits per byte, since every symbol is one byte) is
computed exactly from the stationary distribution of the pair chain, so any
evaluation that reports a val_bpb clearly below it has an accounting bug.

``write_synthetic_corpus`` turns samples into shards in the official layout,
tokenized with the byte260 tokenizer: every document is ``[BOS] + (bytes + 4)`` and
each document is an independent run of the chain started from its stationary
distribution. BOS is a boundary token worth 0 bytes, so the bytes scored are exactly
the sampled bytes. The first byte of a document is drawn from the stationary
marginal and the second given only the first; both have more entropy than the rate,
a window that starts mid-document hides the state, and predicting BOS itself costs
loss but no bytes. All of these only push the best achievable val_bpb *up*, so the
entropy rate stays a valid lower bound (``optimal_bpb`` gives the tighter exact bound
for documents of a given length with full context).
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pgolf.data.shards import write_shard
from pgolf.data.tokenizer import ByteTokenizer
from pgolf.runtime.files import atomic_write

__all__ = ["DEFAULT_ALPHABET", "MarkovSource", "write_synthetic_corpus"]

# 32 printable ASCII characters: lowercase letters, space and five punctuation marks.
DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;!?"


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    logs = np.log2(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=axis)


class MarkovSource:
    """Order-2 Markov chain over ``alphabet``: ``P[a, b, c] = P(next=c | prev2=a, prev1=b)``."""

    def __init__(
        self,
        seed: int = 0,
        alphabet: str = DEFAULT_ALPHABET,
        concentration: float = 0.05,
        floor: float = 1e-3,
    ):
        k = len(alphabet)
        if k < 2 or len(set(alphabet)) != k:
            raise ValueError(f"alphabet needs at least 2 distinct characters, got {alphabet!r}")
        if concentration <= 0:
            raise ValueError(f"concentration must be positive, got {concentration}")
        if not 0 < floor < 1:
            raise ValueError(f"floor must be in (0, 1) so every transition is possible, got {floor}")
        rng = np.random.default_rng(seed)
        probs = rng.dirichlet(np.full(k, float(concentration)), size=(k, k))
        probs = np.nan_to_num(probs, nan=0.0)
        # Mix in a uniform floor: every transition possible -> irreducible and aperiodic.
        probs = (1.0 - floor) * probs + floor / k
        self._init(probs, alphabet)
        self.params: dict[str, Any] = {
            "seed": int(seed),
            "alphabet": alphabet,
            "concentration": float(concentration),
            "floor": float(floor),
        }

    @classmethod
    def from_transitions(cls, probs: np.ndarray, alphabet: str | None = None) -> "MarkovSource":
        """A source with explicit transitions ``probs`` of shape (K, K, K); no floor is added."""
        probs = np.asarray(probs, dtype=np.float64)
        k = probs.shape[0]
        if probs.shape != (k, k, k):
            raise ValueError(f"transitions must have shape (K, K, K), got {probs.shape}")
        if np.any(probs < 0) or not np.allclose(probs.sum(-1), 1.0, atol=1e-12):
            raise ValueError("each transitions[a, b, :] must be a probability distribution")
        alphabet = alphabet if alphabet is not None else DEFAULT_ALPHABET[:k]
        if len(alphabet) != k:
            raise ValueError(f"alphabet has {len(alphabet)} characters but transitions have K={k}")
        self = cls.__new__(cls)
        self._init(probs / probs.sum(-1, keepdims=True), alphabet)
        self.params = {"alphabet": alphabet, "explicit_transitions": True}
        return self

    def _init(self, probs: np.ndarray, alphabet: str) -> None:
        if any(ord(ch) > 127 for ch in alphabet):
            raise ValueError("alphabet must be ASCII so that each symbol is exactly one byte")
        self.alphabet = alphabet
        self.k = len(alphabet)
        self.probs = probs
        self.symbols = np.frombuffer(alphabet.encode("ascii"), dtype=np.uint8)
        self.pair_stationary = self._stationary()  # (K, K): pi[a, b]
        cdf = np.cumsum(probs.reshape(self.k * self.k, self.k), axis=1)
        cdf[:, -1] = 1.0
        self._cdf = cdf

    def _stationary(self) -> np.ndarray:
        """Stationary distribution of the pair chain (a, b) -> (b, c), float64, to 1e-12."""
        k = self.k
        s = k * k
        trans = np.zeros((s, s))
        rows = np.arange(s)
        b = rows % k
        for c in range(k):
            trans[rows, b * k + c] = self.probs.reshape(s, k)[:, c]
        # Solve pi (T - I) = 0 with sum(pi) = 1 (replace one equation by the normalisation).
        a = trans.T - np.eye(s)
        a[-1, :] = 1.0
        rhs = np.zeros(s)
        rhs[-1] = 1.0
        try:
            pi = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError as exc:
            raise ValueError("the pair chain has no unique stationary distribution (reducible?)") from exc
        pi = np.clip(pi, 0.0, None)
        pi /= pi.sum()
        for _ in range(1000):  # polish by power iteration
            new = pi @ trans
            new /= new.sum()
            done = np.abs(new - pi).max() < 1e-15
            pi = new
            if done:
                break
        residual = np.abs(pi @ trans - pi).max()
        if residual > 1e-12:
            raise ValueError(f"stationary distribution did not converge (residual {residual:.2e})")
        return pi.reshape(k, k)

    # ----------------------------------------------------------------- exact numbers

    def entropy_rate_bits(self) -> float:
        """H = sum_(a,b) pi(a,b) H(P(. | a, b)) in bits per symbol (= bits per byte)."""
        return float((self.pair_stationary * _entropy_bits(self.probs)).sum())

    def marginal(self) -> np.ndarray:
        """Stationary distribution of single symbols."""
        return self.pair_stationary.sum(axis=1)

    def optimal_bpb(self, doc_bytes: int) -> float:
        """Expected bits/byte of the ideal predictor on one document of ``doc_bytes`` bytes.

        The document starts from the stationary distribution: H(x1, x2) + (n - 2) * rate.
        It is >= the entropy rate and tends to it for long documents.
        """
        n = int(doc_bytes)
        if n < 1:
            raise ValueError("doc_bytes must be >= 1")
        if n == 1:
            return float(_entropy_bits(self.marginal()))
        pair = float(_entropy_bits(self.pair_stationary.reshape(-1)))
        return (pair + (n - 2) * self.entropy_rate_bits()) / n

    def ideal_bits(self, data: bytes) -> float:
        """Code length (bits) of ``data`` under the true model, as one document."""
        idx = self._indices(data)
        if idx.size == 0:
            return 0.0
        total = -math.log2(self.marginal()[idx[0]])
        if idx.size >= 2:
            total -= math.log2(self.pair_stationary[idx[0], idx[1]] / self.marginal()[idx[0]])
        if idx.size >= 3:
            total -= float(np.log2(self.probs[idx[:-2], idx[1:-1], idx[2:]]).sum())
        return total

    def _indices(self, data: bytes) -> np.ndarray:
        lut = np.full(256, -1, dtype=np.int64)
        lut[self.symbols] = np.arange(self.k)
        idx = lut[np.frombuffer(bytes(data), dtype=np.uint8)]
        if idx.size and idx.min() < 0:
            raise ValueError("data contains bytes outside the source's alphabet")
        return idx

    # ----------------------------------------------------------------- sampling

    def _start_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(self.k * self.k, size=n, p=self.pair_stationary.reshape(-1))

    def sample(self, n_bytes: int, seed: int = 0) -> bytes:
        """One run of the chain, ``n_bytes`` long, started from the stationary distribution."""
        n = int(n_bytes)
        if n <= 0:
            return b""
        rng = np.random.default_rng(seed)
        k = self.k
        state = int(self._start_states(rng, 1)[0])
        out = bytearray(n)
        out[0] = state // k
        if n > 1:
            out[1] = state % k
        cdf = self._cdf.tolist()
        u = rng.random(max(n - 2, 0)).tolist()
        find = bisect.bisect_right
        last = k - 1
        for i in range(2, n):
            c = find(cdf[state], u[i - 2])
            if c > last:
                c = last
            out[i] = c
            state = (state % k) * k + c
        return self.symbols[np.frombuffer(bytes(out), dtype=np.uint8)].tobytes()

    def sample_docs(self, num_docs: int, doc_bytes: int, seed: int = 0) -> np.ndarray:
        """``num_docs`` independent runs of ``doc_bytes`` each (uint8 array, rows = docs).

        Vectorised across documents; each starts from the stationary distribution.
        """
        d, n, k = int(num_docs), int(doc_bytes), self.k
        if d <= 0 or n <= 0:
            return np.zeros((max(d, 0), max(n, 0)), dtype=np.uint8)
        rng = np.random.default_rng(seed)
        idx = np.empty((d, n), dtype=np.int64)
        state = self._start_states(rng, d)
        idx[:, 0] = state // k
        if n > 1:
            idx[:, 1] = state % k
        for i in range(2, n):
            u = rng.random(d)
            c = np.minimum((self._cdf[state] <= u[:, None]).sum(axis=1), k - 1)
            idx[:, i] = c
            state = (state % k) * k + c
        return self.symbols[idx]

    def describe(self) -> dict[str, Any]:
        return {
            **self.params,
            "alphabet_size": self.k,
            "entropy_rate_bits": self.entropy_rate_bits(),
            "marginal_entropy_bits": float(_entropy_bits(self.marginal())),
        }


def write_synthetic_corpus(
    out_dir: str | Path,
    train_tokens: int,
    val_tokens: int,
    seed: int = 0,
    *,
    doc_bytes: int = 4096,
    alphabet: str = DEFAULT_ALPHABET,
    concentration: float = 0.05,
    floor: float = 1e-3,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write byte260 shards of a ``MarkovSource(seed)`` sample plus ``synthetic.json``.

    Files: ``synthetic_train_000000.bin``, ``synthetic_val_000000.bin`` (official shard
    format), ``synthetic.json`` (source parameters, entropy rate, bounds). Each split has
    exactly the requested number of tokens: documents of ``[BOS] + doc_bytes`` tokens, the
    last one cut short. Train and val use different sampling seeds of the same source.
    Existing shards are an error unless ``overwrite``. Returns the metadata written to
    ``synthetic.json``.
    """
    if train_tokens < 2 or val_tokens < 2:
        raise ValueError("train_tokens and val_tokens must be at least 2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = MarkovSource(seed=seed, alphabet=alphabet, concentration=concentration, floor=floor)
    tok = ByteTokenizer()
    splits: dict[str, Any] = {}
    for split_no, (split, n_tokens) in enumerate((("train", train_tokens), ("val", val_tokens))):
        per_doc = doc_bytes + 1
        num_docs = -(-int(n_tokens) // per_doc)
        sample_seed = int(np.random.SeedSequence([int(seed), split_no + 1]).generate_state(1)[0])
        docs = source.sample_docs(num_docs, doc_bytes, seed=sample_seed)
        tokens = np.empty((num_docs, per_doc), dtype=np.uint16)
        tokens[:, 0] = tok.bos_id
        tokens[:, 1:] = docs.astype(np.uint16) + tok.byte_offset
        tokens = tokens.reshape(-1)[: int(n_tokens)]
        path = out / f"synthetic_{split}_000000.bin"
        write_shard(path, tokens, overwrite=overwrite)
        splits[split] = {
            "file": path.name,
            "tokens": int(tokens.size),
            "docs": int(num_docs),
            "bytes": int(np.count_nonzero(tokens != tok.bos_id)),
            "sample_seed": sample_seed,
        }
    meta = {
        "kind": "order2_markov",
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "doc_bytes": int(doc_bytes),
        "source": source.describe(),
        "entropy_rate_bits": source.entropy_rate_bits(),
        "optimal_bpb": source.optimal_bpb(doc_bytes),
        "splits": splits,
        "note": (
            "val_bpb of any model is >= entropy_rate_bits up to sampling noise; BOS counts 0 bytes; "
            "optimal_bpb is the exact expectation for the ideal predictor with full document context"
        ),
    }
    # Written last and atomically: its presence marks a complete corpus.
    atomic_write(out / "synthetic.json", json.dumps(meta, indent=2) + "\n")
    return meta


def ensure_synthetic_corpus(data_cfg, log=print) -> dict[str, Any]:
    """Generate the corpus a config asks for into data_cfg.data_path, or reuse it if present.

    A directory holding a corpus made with other parameters is never overwritten."""
    out = Path(data_cfg.data_path)
    wanted = {"seed": int(data_cfg.synthetic_seed), "train": int(data_cfg.synthetic_train_tokens),
              "val": int(data_cfg.synthetic_val_tokens)}
    meta_path = out / "synthetic.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        found = {"seed": meta["source"].get("seed"), "train": meta["splits"]["train"]["tokens"],
                 "val": meta["splits"]["val"]["tokens"]}
        if found != wanted:
            raise ValueError(
                f"{out} holds a synthetic corpus made with {found}, but the config asks for {wanted}; "
                f"delete {out} or point data.data_path at another directory")
    else:
        # Shards without synthetic.json are an interrupted generation of ours: replace them.
        partial = sorted(p.name for p in out.glob("synthetic_*.bin")) if out.is_dir() else []
        log(f"data: generating the synthetic order-2 Markov corpus into {out} ..."
            + (f" (replacing the incomplete {', '.join(partial)})" if partial else ""))
        meta = write_synthetic_corpus(out, wanted["train"], wanted["val"], seed=wanted["seed"], overwrite=bool(partial))
    log(f"data: synthetic source entropy rate {meta['entropy_rate_bits']:.4f} bits/byte "
        f"(no model can score a val_bpb below it, up to sampling noise)")
    return meta
