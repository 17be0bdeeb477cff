"""Documents -> token shards (`pgolf data tokenize`): reading document sources and cutting
their tokens into shards of the format in pgolf.data.shards. Building data is no part of a
run, so a shipped train_gpt.py does not carry it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pgolf.data.shards import MAX_TOKEN_ID, write_shard


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


def tokenize_to_shards(
    documents: Iterable[str] | str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    num_val_docs: int,
    shard_tokens: int = 100_000_000,
    prefix: str = "fineweb",
    *,
    overwrite: bool = False,
) -> dict:
    """Tokenize documents into val then train shards, like the official exporter.

    The first ``num_val_docs`` documents form ``{prefix}_val_*.bin`` and the rest
    ``{prefix}_train_*.bin``. Within a split, tokens fill fixed ``shard_tokens`` buffers
    (documents may straddle files); a split change always starts a new file. If anything
    fails, the shards written by this call are removed.
    """
    if isinstance(documents, (str, os.PathLike)):
        documents = iter_documents(documents)
    vocab_size, bos = int(tokenizer.vocab_size), int(tokenizer.bos_id)
    if vocab_size > MAX_TOKEN_ID + 1:
        raise ValueError(f"vocab_size={vocab_size} does not fit uint16 shards (max {MAX_TOKEN_ID + 1})")
    if not 0 <= bos < vocab_size:
        raise ValueError(f"tokenizer bos_id={bos} is outside vocab_size={vocab_size}")
    if shard_tokens <= 0 or num_val_docs < 0:
        raise ValueError(f"need shard_tokens > 0 and num_val_docs >= 0, got {shard_tokens}, {num_val_docs}")
    out = Path(out_dir)
    existing = sorted(out.glob(f"{prefix}_train_*.bin")) + sorted(out.glob(f"{prefix}_val_*.bin"))
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {len(existing)} {prefix}_*.bin shards; choose an empty folder "
            f"or pass overwrite=True (--overwrite) to replace them"
        )
    for stale in existing:  # an old, longer export must not leave extra shards behind
        stale.unlink()
    out.mkdir(parents=True, exist_ok=True)

    stats = {f"{k}_{s}": 0 for k in ("docs", "tokens", "files") for s in ("total", "val", "train")}
    written: list[Path] = []
    buf = np.empty(shard_tokens, dtype=np.uint16)
    fill, split = 0, "val"

    def flush() -> None:
        nonlocal fill
        if fill:
            name = f"{prefix}_{split}_{stats[f'files_{split}']:06d}.bin"
            written.append(write_shard(out / name, buf[:fill]))
            stats["files_total"] += 1
            stats[f"files_{split}"] += 1
            fill = 0

    try:
        for doc_index, text in enumerate(documents):
            doc_split = "val" if doc_index < num_val_docs else "train"
            if doc_split != split:
                flush()
                split = doc_split
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64).reshape(-1)
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
