"""Tokenizers and the byte-count lookup tables behind the challenge metric.

The score is bits per byte of the *text*, whatever the tokenizer. Each predicted
token is charged the number of UTF-8 bytes it stands for, read from three tables
indexed by token id:

* ``base_bytes``: bytes of the piece without a leading space marker (``▁``);
  byte-fallback pieces are 1 byte; control, unknown and unused pieces are 0.
* ``has_leading_space``: the piece starts with ``▁``, which decodes to one space.
* ``is_boundary``: control/unknown/unused ids, and ids past the tokenizer's own
  vocabulary (padding up to the model's vocabulary).

A target token ``t`` that follows ``p`` counts
``base_bytes[t] + (has_leading_space[t] and not is_boundary[p])`` bytes: the space of
the first word after a document's BOS is the dummy prefix SentencePiece adds, and is
not part of the text. These are the definitions of the official ``train_gpt.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "TokenizerError",
    "ByteLUTs",
    "token_bytes",
    "SentencePieceTokenizer",
    "ByteTokenizer",
    "load_tokenizer",
    "check_vocab",
    "check_bos",
    "bits_per_byte",
]

_SPACE_MARK = "\u2581"  # "▁", SentencePiece's word-start marker


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or does not match the model."""


@dataclass
class ByteLUTs:
    """Per-token-id byte tables (numpy) used to count the bytes of predicted tokens."""

    base_bytes: np.ndarray  # int16
    has_leading_space: np.ndarray  # bool
    is_boundary: np.ndarray  # bool

    def __post_init__(self) -> None:
        self.base_bytes = np.asarray(self.base_bytes, dtype=np.int16)
        self.has_leading_space = np.asarray(self.has_leading_space, dtype=np.bool_)
        self.is_boundary = np.asarray(self.is_boundary, dtype=np.bool_)
        n = len(self.base_bytes)
        if len(self.has_leading_space) != n or len(self.is_boundary) != n:
            raise TokenizerError(
                "byte lookup tables have different lengths "
                f"({n}, {len(self.has_leading_space)}, {len(self.is_boundary)}); "
                "build them with a tokenizer's byte_luts()"
            )

    def __len__(self) -> int:
        return len(self.base_bytes)

    def to_torch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three tables as torch tensors (int16, bool, bool) on ``device``."""
        return (
            torch.as_tensor(self.base_bytes, dtype=torch.int16).to(device),
            torch.as_tensor(self.has_leading_space, dtype=torch.bool).to(device),
            torch.as_tensor(self.is_boundary, dtype=torch.bool).to(device),
        )

    def count_bytes(self, prev_ids: Any, target_ids: Any) -> int:
        """Exact number of text bytes of ``target_ids``, each preceded by ``prev_ids``."""
        prev = _as_index_array(prev_ids)
        tgt = _as_index_array(target_ids)
        if prev.shape != tgt.shape:
            raise ValueError(f"prev_ids shape {prev.shape} != target_ids shape {tgt.shape}")
        if tgt.size == 0:
            return 0
        top = max(int(prev.max()), int(tgt.max()))
        if top >= len(self) or min(int(prev.min()), int(tgt.min())) < 0:
            raise TokenizerError(
                f"token id {top} is outside the byte tables (size {len(self)}); "
                "build the tables with byte_luts(vocab_size=model.vocab_size)"
            )
        space = self.has_leading_space[tgt] & ~self.is_boundary[prev]
        return int(self.base_bytes[tgt].astype(np.int64).sum()) + int(np.count_nonzero(space))


def _as_index_array(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).astype(np.int64, copy=False).reshape(-1)


def token_bytes(
    prev_ids: torch.Tensor,
    target_ids: torch.Tensor,
    luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Per-token byte counts (int32, shape of ``target_ids``) on the tables' device.

    ``luts`` is ``ByteLUTs.to_torch(device)``. No host synchronisation happens here, so
    it can sit inside an eval loop; sum the result in float64 or int64.
    """
    base, lead, boundary = luts
    prev = prev_ids.long()
    tgt = target_ids.long()
    extra = lead[tgt] & ~boundary[prev]
    return base[tgt].to(torch.int32) + extra.to(torch.int32)


class SentencePieceTokenizer:
    """A SentencePiece model file (e.g. the official ``fineweb_1024_bpe.model``)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(
                f"tokenizer not found at {self.path}; download it with `pgolf data fineweb` "
                "or set data.tokenizer_path"
            )
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise TokenizerError(
                f"{self.path} is not a valid SentencePiece model ({exc}); "
                "point data.tokenizer_path at a .model file written by sentencepiece"
            ) from exc
        self.name = self.path.stem

    @property
    def vocab_size(self) -> int:
        return int(self.sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self.sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        return self.sp.decode([int(i) for i in _as_index_array(ids)])

    def byte_luts(self, vocab_size: int | None = None) -> ByteLUTs:
        sp = self.sp
        n = self.vocab_size
        size = max(n, vocab_size or 0)
        base = np.zeros(size, dtype=np.int16)
        lead = np.zeros(size, dtype=np.bool_)
        boundary = np.ones(size, dtype=np.bool_)  # padding ids stay boundary, 0 bytes
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            boundary[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(_SPACE_MARK):
                lead[i] = True
                piece = piece[len(_SPACE_MARK):]
            base[i] = len(piece.encode("utf-8"))
        return ByteLUTs(base, lead, boundary)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, unk=3, then byte b is id b+4 (260 ids)."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3
    byte_offset = 4
    name = "byte260"
    vocab_size = 260

    def encode(self, text: str | bytes) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str | bytes) -> np.ndarray:
        """Like ``encode`` but returns a uint16 numpy array (fast for large inputs)."""
        data = text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8", errors="replace")
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.uint16) + self.byte_offset

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
        arr = _as_index_array(ids)
        if arr.size and int(arr.max()) >= self.vocab_size:
            raise TokenizerError(f"token id {int(arr.max())} is not in the byte260 vocabulary (0..259)")
        arr = arr[arr >= self.byte_offset] - self.byte_offset  # specials carry no text
        return arr.astype(np.uint8).tobytes()

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def byte_luts(self, vocab_size: int | None = None) -> ByteLUTs:
        size = max(self.vocab_size, vocab_size or 0)
        base = np.zeros(size, dtype=np.int16)
        boundary = np.ones(size, dtype=np.bool_)
        base[self.byte_offset:self.vocab_size] = 1
        boundary[self.byte_offset:self.vocab_size] = False
        return ByteLUTs(base, np.zeros(size, dtype=np.bool_), boundary)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


Tokenizer = SentencePieceTokenizer | ByteTokenizer


def load_tokenizer(spec: str | Path | Tokenizer | None) -> Tokenizer:
    """``"byte260"``/``"byte"`` -> ByteTokenizer; ``path/to/x.model`` -> SentencePieceTokenizer."""
    if isinstance(spec, (SentencePieceTokenizer, ByteTokenizer)):
        return spec
    if spec is None or str(spec).strip() == "":
        raise TokenizerError(
            "no tokenizer given; set data.tokenizer_path to a SentencePiece .model file "
            "(e.g. fineweb_1024_bpe.model) or to 'byte260'"
        )
    text = str(spec).strip()
    if text.lower() in ("byte260", "byte"):
        return ByteTokenizer()
    if text.endswith(".model"):
        return SentencePieceTokenizer(text)
    raise TokenizerError(
        f"cannot tell what tokenizer {text!r} is; use a path ending in .model "
        "(SentencePiece) or 'byte260' for the byte-level tokenizer"
    )


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise unless the tokenizer's vocabulary equals the model's."""
    n = int(tokenizer.vocab_size)
    m = int(model_vocab_size)
    if n != m:
        raise TokenizerError(
            f"tokenizer {tokenizer.name} has vocabulary {n} but model.vocab_size={m}; "
            f"set model.vocab_size={n} (VOCAB_SIZE={n}) or use the matching tokenizer"
        )


def check_bos(tokenizer: Tokenizer, bos_id: int, used_by: str) -> None:
    """Raise unless the tokenizer starts each document with bos_id: the features in `used_by`
    find document starts by that id, and a wrong one silently masks or smears across documents."""
    actual = int(tokenizer.bos_id)
    if actual != int(bos_id):
        has = f"starts documents with id {actual}" if actual >= 0 else "has no BOS token"
        fix = f"set model.bos_id={actual}" if actual >= 0 else "use a tokenizer with a BOS token"
        raise TokenizerError(f"{used_by} find documents by model.bos_id={bos_id}, but tokenizer {tokenizer.name} "
                             f"{has}; {fix}")


def bits_per_byte(loss_sum_nats: float, token_count: int | float, byte_count: int | float) -> float:
    """val_bpb from summed token cross-entropy (nats), token count and byte count."""
    loss_sum_nats = float(loss_sum_nats)
    token_count = float(token_count)
    byte_count = float(byte_count)
    if token_count <= 0:
        raise ValueError(f"token_count must be positive, got {token_count}; nothing was evaluated")
    if byte_count <= 0:
        raise ValueError(
            f"byte_count must be positive, got {byte_count}; the targets hold no text bytes "
            "(only boundary tokens?) - check the byte lookup tables"
        )
    if not math.isfinite(loss_sum_nats):
        raise ValueError(f"loss sum is not finite ({loss_sum_nats}); the model diverged")
    # Same operation order as the official eval, so results agree to the last bit.
    mean_loss = loss_sum_nats / token_count
    return (mean_loss / math.log(2.0)) * (token_count / byte_count)
