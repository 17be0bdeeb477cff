"""Documents -> token shards (`pgolf data tokenize`): reading document sources and cutting
their tokens into shards of the format in pgolf.data.shards, optionally in CaseOps form
(pgolf.data.caseops) with a byte sidecar beside each validation shard; and training a
SentencePiece tokenizer (`pgolf data train-tokenizer`). Building data is no part of a run, so a
shipped train_gpt.py does not carry it.

Validation split safety: the official split is the first 50,000 documents of the official
document list. Cutting it elsewhere moves official validation documents into the training shards
(fewer) or scores training documents (more); the CaseOps record's data script defaulted to 10,000.
A count that differs from what the documents' manifest (or an official name) promises is refused
unless forced.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pgolf.data import caseops as caseops_text
from pgolf.data.shards import (HEADER_INTS, MAX_TOKEN_ID, SHARD_MAGIC, SHARD_VERSION, SIDECAR_TAG, sidecar_path,
                               write_shard)
from pgolf.runtime.files import atomic_write

OFFICIAL_VAL_DOCS = 50_000  # the challenge's validation split: the first 50,000 documents
OFFICIAL_DOCS_NAME = "docs_selected.jsonl"  # the official document list (`pgolf data fineweb --with-docs`)


class Tokenizer(Protocol):
    bos_id: int
    vocab_size: int

    def encode(self, text: str) -> Sequence[int]: ...


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield document texts from a source.

    * ``.jsonl``: one JSON object per line with a string ``"text"`` (blank lines skipped).
    * ``.txt``: the whole file is one document (blank lines are paragraph breaks, not
      document boundaries, so prose is never split by accident).
    * a directory: every ``.txt`` / ``.jsonl`` file in it, in sorted name order.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not found:
            raise FileNotFoundError(f"{path}: directory has no .txt or .jsonl documents")
        for p in found:
            yield from iter_documents(p)
    elif path.suffix == ".jsonl":
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{lineno}: expected a JSON object with a \"text\" key ({e!r}); "
                        f"fix or remove that line"
                    ) from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: \"text\" must be a string, got {type(text).__name__}")
                yield text
    elif path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    else:
        raise ValueError(f"{path}: unsupported document source; use .jsonl, .txt or a directory of them")


def expected_val_docs(source: str | os.PathLike | None, out_dir: str | os.PathLike) -> tuple[int, str] | None:
    """(the validation documents the data promises, why) or None when nothing says.

    From the documents' own manifest (``<name>.source_manifest.json``: ``docs_val``; or the export's
    ``manifest.json`` beside them: ``num_val_docs``), else 50,000 for the official document list
    (docs_selected.jsonl) or an output folder named like an official dataset (fineweb10B_*)."""
    if source is not None and Path(source).is_file():
        source = Path(source)
        for path, key in ((source.with_name(f"{source.stem}.source_manifest.json"), "docs_val"),
                          (source.with_name("manifest.json"), "num_val_docs")):
            try:
                return int(json.loads(path.read_text(encoding="utf-8"))[key]), f"as {path} states ({key})"
            except (OSError, ValueError, KeyError, TypeError):
                pass
        if source.name == OFFICIAL_DOCS_NAME:
            return OFFICIAL_VAL_DOCS, f"{source} is the official document list, whose first 50,000 are validation"
    if Path(out_dir).name.startswith("fineweb10B_"):
        return OFFICIAL_VAL_DOCS, f"{Path(out_dir).name} is named like an official dataset (validation: 50,000 docs)"
    return None


def check_val_docs(num_val_docs: int | None, source, out_dir, force: bool = False) -> int:
    """The validation document count to build with: num_val_docs, or the expected one when None.
    A count that differs from the expected one is refused unless force."""
    expected = expected_val_docs(source, out_dir)
    if num_val_docs is None:
        if expected is None:
            raise ValueError("no validation document count: pass --val-docs N (the first N documents are validation)")
        return expected[0]
    if expected is not None and num_val_docs != expected[0] and not force:
        n, why = expected
        raise ValueError(
            f"--val-docs {num_val_docs} differs from the {n:,} validation documents expected ({why}). With fewer, "
            f"official validation documents would land in the training shards and leak into training; with more, "
            f"training documents would be scored. Pass --val-docs {n}, or --force-val-docs to build another split "
            f"on purpose")
    return num_val_docs


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif kind in (1, 5):
            size = 8 if kind == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {kind}")
        yield key >> 3, value


def piece_surfaces(sp, text: str) -> tuple[list[int], list[bytes]]:
    """Token ids of text and the bytes of text each one covers: SentencePiece's piece surfaces, read
    from its serialized SentencePieceText (no protobuf package needed). The surfaces are spans of the
    input before normalization; a character split into byte-fallback pieces is on the last of them."""
    ids, surfaces = [], []
    for field, piece in _fields(sp.encode(text, out_type="serialized_proto")):
        if field == 2:  # SentencePieceText.pieces: piece=1, id=2, surface=3, begin=4, end=5
            parts = dict(_fields(piece))
            ids.append(int(parts.get(2, 0)))
            surfaces.append(bytes(parts.get(3, b"")))
    return ids, surfaces


def write_byte_sidecar(path: str | os.PathLike, counts: np.ndarray, tokens: np.ndarray) -> Path:
    """A byte sidecar (format: pgolf.data.shards) for the token shard holding tokens."""
    header = np.zeros(HEADER_INTS, dtype="<u4")
    total = int(np.asarray(counts).sum(dtype=np.int64))
    header[:7] = (SHARD_MAGIC, SHARD_VERSION, len(counts), SIDECAR_TAG,
                  zlib.crc32(np.ascontiguousarray(tokens, dtype="<u2")), total & 0xFFFFFFFF, total >> 32)
    return atomic_write(Path(path), header.tobytes() + np.asarray(counts, dtype="<u2").tobytes())


def tokenize_to_shards(
    documents: Iterable[str] | str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    num_val_docs: int | None,
    shard_tokens: int = 100_000_000,
    prefix: str = "fineweb",
    *,
    overwrite: bool = False,
    caseops: bool = False,
    byte_sidecar: bool = False,
    force_val_docs: bool = False,
) -> dict:
    """Tokenize documents into val then train shards, like the official exporter.

    The first ``num_val_docs`` documents form ``{prefix}_val_*.bin`` and the rest
    ``{prefix}_train_*.bin``. Within a split, tokens fill fixed ``shard_tokens`` buffers
    (documents may straddle files); a split change always starts a new file. If anything
    fails, the shards written by this call are removed.

    caseops: each document is tokenized in CaseOps form (pgolf.data.caseops), and a byte sidecar is
    written beside each val shard (byte_sidecar: the sidecar without CaseOps), whose counts sum
    to the UTF-8 bytes of each original document exactly (else it refuses). num_val_docs is checked
    against expected_val_docs (None: the expected count).
    """
    source = documents if isinstance(documents, (str, os.PathLike)) else None
    num_val_docs = check_val_docs(num_val_docs, source, out_dir, force_val_docs)
    if source is not None:
        documents = iter_documents(source)
    vocab_size, bos = int(tokenizer.vocab_size), int(tokenizer.bos_id)
    if vocab_size > MAX_TOKEN_ID + 1:
        raise ValueError(f"vocab_size={vocab_size} does not fit uint16 shards (max {MAX_TOKEN_ID + 1})")
    if not 0 <= bos < vocab_size:
        raise ValueError(f"tokenizer bos_id={bos} is outside vocab_size={vocab_size}")
    if shard_tokens <= 0 or num_val_docs < 0:
        raise ValueError(f"need shard_tokens > 0 and num_val_docs >= 0, got {shard_tokens}, {num_val_docs}")
    sidecar = caseops or byte_sidecar
    sp = getattr(tokenizer, "sp", None)
    if sidecar and sp is None:
        raise ValueError("byte sidecars (and CaseOps) need a SentencePiece tokenizer (.model)")
    if caseops and any(sp.piece_to_id(op) == sp.unk_id() for op in caseops_text.OPERATORS):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'path', '')} has no pieces for the CaseOps operators "
                         f"U+E001..U+E004; train one with `pgolf data train-tokenizer --caseops`")
    out = Path(out_dir)
    existing = sorted(out.glob(f"{prefix}_train_*.bin")) + sorted(out.glob(f"{prefix}_val_*.bin"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} {prefix}_*.bin shards; choose an empty folder "
            f"or pass overwrite=True (--overwrite) to replace them"
        )
    for stale in existing:  # an old, longer export must not leave extra shards (or sidecars) behind
        stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

    stats = {f"{k}_{s}": 0 for k in ("docs", "tokens", "files") for s in ("total", "val", "train")}
    written: list[Path] = []
    buf = np.empty(shard_tokens, dtype=np.uint16)
    counts_buf = np.empty(shard_tokens if sidecar else 0, dtype=np.uint16)
    fill, split = 0, "val"

    def flush() -> None:
        nonlocal fill
        if fill:
            name = f"{prefix}_{split}_{stats[f'files_{split}']:06d}.bin"
            written.append(write_shard(out / name, buf[:fill]))
            if sidecar and split == "val":
                written.append(write_byte_sidecar(sidecar_path(out / name), counts_buf[:fill], buf[:fill]))
            stats["files_total"] += 1
            stats[f"files_{split}"] += 1
            fill = 0

    try:
        for doc_index, text in enumerate(documents):
            doc_split = "val" if doc_index < num_val_docs else "train"
            if doc_split != split:
                flush()
                split = doc_split
            coded = caseops_text.encode(text) if caseops else text
            counts = None
            if sidecar and split == "val":
                ids, surfaces = piece_surfaces(sp, coded)
                counts = np.asarray([0] + (caseops_text.original_byte_counts(surfaces) if caseops
                                           else [len(x) for x in surfaces]), dtype=np.int64)
                n_bytes = len(text.encode("utf-8"))
                if counts.max() > MAX_TOKEN_ID:
                    raise ValueError(f"document {doc_index}: a token covers {counts.max()} bytes, more than a "
                                     f"uint16 sidecar count holds")
                if int(counts.sum()) != n_bytes:
                    raise ValueError(
                        f"document {doc_index}: its tokens cover {int(counts.sum())} bytes of its {n_bytes}-byte text, "
                        f"so a byte sidecar would not be exact (the tokenizer drops text, e.g. leading or repeated "
                        f"whitespace); use a tokenizer from `pgolf data train-tokenizer`, which keeps every byte")
                stats["bytes_val"] = stats.get("bytes_val", 0) + n_bytes
            else:
                ids = tokenizer.encode(coded)
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
                raise ValueError(f"document {doc_index}: token id {bad} is outside vocab_size={vocab_size}")
            toks = np.empty(ids.size + 1, dtype=np.uint16)
            toks[0] = bos
            toks[1:] = ids
            for key in ("docs", "tokens"):
                amount = 1 if key == "docs" else toks.size
                stats[f"{key}_total"] += amount
                stats[f"{key}_{split}"] += amount
            pos = 0
            while pos < toks.size:
                k = min(shard_tokens - fill, toks.size - pos)
                buf[fill : fill + k] = toks[pos : pos + k]
                if counts is not None:
                    counts_buf[fill : fill + k] = counts[pos : pos + k]
                fill += k
                pos += k
                if fill == shard_tokens:
                    flush()
        flush()
        if stats["docs_total"] == 0:
            raise ValueError("no documents to tokenize")
        if stats["docs_total"] < num_val_docs:
            raise ValueError(
                f"only {stats['docs_total']} documents, fewer than num_val_docs={num_val_docs}; "
                f"lower num_val_docs so some documents remain for training"
            )
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    stats["paths"] = [str(p) for p in written]
    return stats


def train_tokenizer(
    documents: Iterable[str] | str | os.PathLike,
    out: str | os.PathLike,
    vocab_size: int,
    *,
    caseops: bool = False,
    skip_docs: int = 0,
    max_docs: int | None = None,
    normalization: str = "identity",
    threads: int | None = None,
) -> Path:
    """Train a SentencePiece BPE tokenizer on documents; returns the .model path (a .vocab beside it).

    Settings of the official exporter (byte fallback, split digits, no dummy prefix, ids pad 0, bos 1,
    eos 2, unk 3) except the normalization: identity by default, and whitespace kept as it is, so
    decode(encode(text)) == text and every piece covers exactly the bytes it decodes to (the
    official nmt_nfkc rewrites some text). caseops: documents in CaseOps form, the four operators
    as user-defined pieces. skip_docs leaves out the first documents (e.g. the 50,000 of validation).
    """
    import sentencepiece as spm

    if isinstance(documents, (str, os.PathLike)):
        documents = iter_documents(documents)
    out = Path(out)
    prefix = out.with_suffix("") if out.suffix == ".model" else out
    prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences() -> Iterator[str]:
        for i, text in enumerate(documents):
            if max_docs is not None and i >= skip_docs + max_docs:
                return
            if i >= skip_docs and text:
                yield caseops_text.encode(text) if caseops else text

    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.999, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        normalization_rule_name=normalization, remove_extra_whitespaces=False, hard_vocab_limit=False,
        max_sentence_length=1 << 24, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
        user_defined_symbols=list(caseops_text.OPERATORS) if caseops else [],
        num_threads=threads or os.cpu_count() or 1)
    return prefix.parent / f"{prefix.name}.model"
