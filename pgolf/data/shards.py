"""Token shards: the on-disk format and streaming loaders (documents -> shards: pgolf.data.build).

Shard format (shared with the official parameter-golf exporter, so files are
interchangeable): a header of 256 little-endian int32 values
``[SHARD_MAGIC, SHARD_VERSION, num_tokens, 0, ...]`` followed by ``num_tokens``
little-endian uint16 token ids. Each document is stored as ``[bos_id] + encode(text)``
with no EOS, and shards are cut purely by token count, so a document may span two files.

Byte sidecar: beside a validation shard ``X_val_NNNNNN.bin``, ``X_val_bytes_NNNNNN.bin`` holds
per token the UTF-8 bytes of the original text it stands for (0 for BOS and CaseOps operators),
framed like a token shard (the CaseOps exports ship this format). pgolf's own sidecars also record
in header ints 3..6 SIDECAR_TAG, the crc32 of the shard's token bytes and the counts' sum (low,
high 32 bits), so a sidecar that belongs to other tokens is refused. val_bpb counts its bytes
from the sidecar when there is one (DataConfig.byte_sidecar), else from the tokenizer's tables.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.runtime.files import atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = 65535  # uint16 storage
SIDECAR_TAG = 0x42595445  # header int 3 of a pgolf byte sidecar ("ETYB")
_SIDECAR_NAME = re.compile(r"_val_bytes_\d+\.bin$")
CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")  # pgolf.data.caseops (not shipped)

_FIX = "re-download it with `pgolf data fineweb` or regenerate it with `pgolf data tokenize`"


class ShardError(ValueError):
    """A shard file is malformed; the message names the file, the problem and the fix."""


# ---------------------------------------------------------------------------
# Reading and writing single shards
# ---------------------------------------------------------------------------

def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size without reading its tokens; return num_tokens."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header "
            f"(truncated or not a shard); {_FIX}"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(
            f"{path}: bad magic number {int(header[0])}, expected {SHARD_MAGIC} "
            f"(not a parameter-golf token shard); {_FIX}"
        )
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(
            f"{path}: unsupported shard version {int(header[1])}, expected {SHARD_VERSION}; {_FIX}"
        )
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        kind = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(
            f"{path}: file {kind}: header says {num_tokens} tokens ({expected} bytes) "
            f"but the file is {size} bytes; {_FIX}"
        )
    return num_tokens


def read_shard(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """Return a shard's tokens as a 1-D uint16 array (read-only memory map if ``mmap``)."""
    path = Path(path)
    n = read_shard_header(path)
    if mmap and n > 0:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if tokens.size != n:  # file shrank between the stat and the read
        raise ShardError(f"{path}: short read ({tokens.size} of {n} tokens); {_FIX}")
    return tokens.astype(np.uint16, copy=False)


def write_shard(path: str | os.PathLike, tokens: Any, *, overwrite: bool = False) -> Path:
    """Write ``tokens`` (1-D ints in [0, 65535]) as a shard, atomically.

    The data goes to a temporary file in the destination folder and is renamed into
    place, so an interrupted write never leaves a half-written shard behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: shard tokens must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype != np.uint16:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: shard tokens must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            raise ValueError(
                f"{path}: token ids must be in [0, {MAX_TOKEN_ID}] for uint16 storage, "
                f"got range [{lo}, {hi}]"
            )
    if arr.size >= 2**31:
        raise ValueError(f"{path}: {arr.size} tokens do not fit the int32 header count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    return atomic_write(path, header.tobytes() + arr.astype("<u2", copy=False).tobytes())


def resolve_shards(pattern: str | os.PathLike) -> list[Path]:
    """Sorted list of files matching a glob; sorting fixes the stream order across runs."""
    # A byte sidecar (X_val_bytes_N.bin) matches X_val_*.bin too; it holds byte counts, not tokens.
    files = [Path(p) for p in sorted(glob.glob(str(pattern))) if not _SIDECAR_NAME.search(p)]
    if not files:
        raise FileNotFoundError(
            f"no shards match {str(pattern)!r}; download with `pgolf data fineweb` "
            f"or pass --data DIR pointing at a folder of fineweb_*.bin shards"
        )
    return files


def _as_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        return resolve_shards(source)
    files = [Path(p) for p in source]
    if not files:
        raise FileNotFoundError("empty list of shard files; download with `pgolf data fineweb`")
    return files


def check_token_range(tokens: np.ndarray | torch.Tensor, vocab_size: int, source: object) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer/model vocab mismatch)."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ShardError(
            f"{source}: holds token id {int(tokens.max())} but model.vocab_size={vocab_size}; these shards "
            f"were made with a larger tokenizer: set model.vocab_size (VOCAB_SIZE) and data.tokenizer_path "
            f"to match them, or point data.data_path at shards made with this tokenizer"
        )


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------

class TokenStream:
    """Reads shards in order and wraps around forever (no sampling, no workers).

    Deterministic by construction: the token sequence depends only on the file list,
    and ``state_dict`` captures (file, offset) so a resumed run continues at the
    exact next token.

    With ``bos_id`` (data.doc_packing, #1855's loader) each ``take`` lies inside one shard: a
    shard is read from its first ``bos_id`` token on, and a shard tail too short for the
    request is skipped (shards still wrap).
    """

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], *, mmap: bool = False,
                 vocab_size: int | None = None, bos_id: int | None = None):
        self.files = _as_files(files)
        self.mmap = mmap
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self._load(0)

    def _load(self, index: int) -> None:
        self.file_index = index
        self.tokens = read_shard(self.files[index], mmap=self.mmap)
        if self.vocab_size is not None:
            check_token_range(self.tokens, self.vocab_size, self.files[index])
        self.position = 0
        if self.bos_id is not None:  # doc packing: from the shard's first document start (none: skip it)
            first = np.flatnonzero(np.asarray(self.tokens) == self.bos_id)[:1]
            self.position = int(first[0]) if first.size else self.tokens.size

    def take(self, n: int) -> np.ndarray:
        """Next ``n`` tokens as a uint16 array, crossing (and wrapping) files as needed."""
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n})")
        if self.bos_id is not None:
            return self._take_packed(n)
        parts: list[np.ndarray] = []
        remaining = n
        empty_in_a_row = 0
        while remaining > 0:
            avail = self.tokens.size - self.position
            if avail <= 0:
                # Official behaviour: an exhausted shard is left only when more tokens are needed.
                empty_in_a_row = empty_in_a_row + 1 if self.tokens.size == 0 else 0
                if empty_in_a_row > len(self.files):
                    raise ValueError(f"all {len(self.files)} shards are empty; {_FIX}")
                self._load((self.file_index + 1) % len(self.files))
                continue
            k = min(remaining, avail)
            parts.append(self.tokens[self.position : self.position + k])
            self.position += k
            remaining -= k
        if not parts:
            return np.empty(0, dtype=np.uint16)
        return np.asarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def _take_packed(self, n: int) -> np.ndarray:
        for _ in range(len(self.files) + 1):
            if self.position + n <= self.tokens.size:
                self.position += n
                return np.asarray(self.tokens[self.position - n: self.position])
            self._load((self.file_index + 1) % len(self.files))
        raise ValueError(f"data.doc_packing: no training shard holds {n} tokens from its first BOS (id {self.bos_id}) "
                         "on; lower train.train_batch_tokens or set data.doc_packing=false")

    def state_dict(self) -> dict:
        return {
            "file_index": self.file_index,
            "position": self.position,
            "file_name": self.files[self.file_index].name,
        }

    def load_state_dict(self, state: dict) -> None:
        index, position = int(state["file_index"]), int(state["position"])
        if not 0 <= index < len(self.files):
            raise ValueError(
                f"stream state points at shard #{index} but only {len(self.files)} shards are "
                f"available; resume with the same training shards as the original run"
            )
        name = state.get("file_name")
        if name is not None and self.files[index].name != name:
            raise ValueError(
                f"stream state expects shard #{index} to be {name!r} but found "
                f"{self.files[index].name!r}; resume with the same training shards"
            )
        self._load(index)
        if not 0 <= position <= self.tokens.size:
            raise ValueError(
                f"stream state position {position} is outside {self.files[index]} "
                f"({self.tokens.size} tokens); the shard changed since the checkpoint"
            )
        self.position = position


class DistributedTokenLoader:
    """Per-rank (x, y) batches cut from one shared stream.

    Every rank reads the same stream; each step consumes one contiguous chunk of
    ``(local_tokens + 1) * world_size`` tokens and rank r keeps span r. The extra
    token per span lets targets be the inputs shifted by one. Consequently the tokens
    a step sees do not depend on how many ranks there are, only their split does.

    ``prefetch=True`` cuts the next batch on a background thread while the caller computes
    (into a small ring of reused pinned buffers on CUDA, copied with non_blocking). The
    batches, their order and ``state_dict`` are exactly those of the synchronous path.
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
        prefetch: bool = False,
        pin_memory: bool | None = None,
        bos_id: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.stream = TokenStream(files, vocab_size=vocab_size, bos_id=bos_id)  # bos_id: doc packing
        self.prefetch = prefetch
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        if self.pin_memory and self.device.type != "cuda":
            raise ValueError(f"pin_memory=True stages batches for a CUDA device, but the device is {self.device}")
        self._prefetcher: _Prefetcher | None = None
        self._consumed_state = self.stream.state_dict()  # prefetch: the stream after the last batch handed out

    def _span(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> int:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        if seq_len <= 0 or local_tokens <= 0 or local_tokens % seq_len:
            raise ValueError(
                f"train_batch_tokens={global_tokens} split over world_size={self.world_size} x "
                f"grad_accum_steps={grad_accum_steps} gives {local_tokens} tokens per micro-batch, "
                f"which must be a positive multiple of train_seq_len={seq_len}; adjust "
                f"train_batch_tokens or train_seq_len"
            )
        return local_tokens + 1

    def _cut(self, span: int) -> np.ndarray:
        """This rank's span of the next step chunk (uint16), advancing the stream."""
        chunk = self.stream.take(span * self.world_size)
        return chunk[self.rank * span : (self.rank + 1) * span]

    def next_batch(self, global_tokens: int, seq_len: int,
                   grad_accum_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        span = self._span(global_tokens, seq_len, grad_accum_steps)
        if self.prefetch:
            local = self._next_prefetched(span)
            return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)
        local = torch.from_numpy(self._cut(span).astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory()  # lets the non_blocking copy overlap with compute
        x = local[:-1].view(-1, seq_len)
        y = local[1:].view(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _next_prefetched(self, span: int) -> torch.Tensor:
        if self._prefetcher is not None and self._prefetcher.span != span:
            self._stop_prefetch()  # a new batch shape: rewind to the last batch handed out
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self, span)
        try:
            host, state, release = self._prefetcher.get()
        except BaseException:
            self._prefetcher = None  # its thread has ended; the next call starts from the last good batch
            self.stream.load_state_dict(self._consumed_state)
            raise
        self._consumed_state = state
        # One copy for inputs and targets (they overlap by all but one token).
        local = host.to(self.device, non_blocking=True) if self.device != host.device else host
        release()
        return local

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.stop()
            self._prefetcher = None
            self.stream.load_state_dict(self._consumed_state)

    def close(self) -> None:
        """Stop the prefetch thread (the stream stays at the last batch handed out)."""
        self._stop_prefetch()

    def state_dict(self) -> dict:
        return dict(self._consumed_state) if self.prefetch else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._stop_prefetch()
        self.stream.load_state_dict(state)
        self._consumed_state = self.stream.state_dict()


class _Prefetcher:
    """One background thread cutting batches of one span ahead of the consumer.

    Each item carries the stream state after it, so the loader reports (and rewinds to) exactly
    what it handed out. Pinned buffers form a ring of 3 (one queued, one being filled, one being
    copied to the GPU); a buffer is refilled only after the CUDA event recorded behind its copy."""

    RING = 3

    def __init__(self, loader: DistributedTokenLoader, span: int):
        self.loader, self.span = loader, span
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stopping = threading.Event()
        self.pinned = loader.pin_memory
        self.buffers = [torch.empty(span, dtype=torch.int64, pin_memory=True) for _ in range(self.RING)] \
            if self.pinned else []
        self.copy_done: list = [None] * self.RING  # CUDA events behind each buffer's last copy
        self.thread = threading.Thread(target=self._run, name="pgolf-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        index = 0
        try:
            while not self.stopping.is_set():
                tokens = self.loader._cut(self.span)
                state = self.loader.stream.state_dict()
                if self.pinned:
                    slot = index % self.RING
                    if self.copy_done[slot] is not None:
                        self.copy_done[slot].synchronize()
                    host = self.buffers[slot]
                    np.copyto(host.numpy(), tokens, casting="unsafe")  # uint16 -> int64, into pinned memory
                else:
                    slot, host = None, torch.from_numpy(tokens.astype(np.int64))
                self._put((host, state, slot))
                index += 1
        except BaseException as exc:  # handed to the consumer, raised at the batch that failed
            self._put(exc)

    def _put(self, item) -> None:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            self.stop()
            raise item
        host, state, slot = item

        def release() -> None:
            if slot is not None:  # pinned: the buffer is free again once this copy has run
                event = torch.cuda.Event()
                event.record()
                self.copy_done[slot] = event

        return host, state, release

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


def load_validation_tokens(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    seq_len: int,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """All validation shards concatenated, cut to ``k * seq_len + 1`` tokens (largest k).

    Returns a 1-D tensor of ``dtype`` (int64 by default so it can index embeddings
    directly; pass ``torch.uint16`` to keep a 4x smaller copy as the official script does).
    The +1 is the final target; every scored token is the target of exactly one window.
    """
    parts = [read_shard(f) for f in _as_files(files)]
    tokens = np.concatenate(parts) if parts else np.empty(0, np.uint16)
    if tokens.size == 0:
        raise ValueError(f"validation shards {files!s} contain no tokens; {_FIX}")
    usable = ((tokens.size - 1) // seq_len) * seq_len if seq_len > 0 else 0
    if usable <= 0:
        raise ValueError(
            f"validation split has {tokens.size} tokens, fewer than train_seq_len+1={seq_len + 1}; "
            f"use a shorter seq_len or a larger val split"
        )
    out = torch.from_numpy(tokens[: usable + 1].copy())
    return out if dtype == torch.uint16 else out.to(dtype)


# ---------------------------------------------------------------------------
# Validation bytes: byte sidecar or the tokenizer's tables
# ---------------------------------------------------------------------------

def sidecar_path(shard: str | os.PathLike) -> Path:
    """X_val_000000.bin -> X_val_bytes_000000.bin, beside it."""
    shard = Path(shard)
    return shard.with_name(shard.name.replace("_val_", "_val_bytes_", 1))


def _check_sidecar(path: Path, counts: np.ndarray, shard: Path, tokens: np.ndarray) -> None:
    fix = ("rebuild the shards and sidecars together (`pgolf data tokenize ... --caseops` or --byte-sidecar) "
           "or download the export again")
    if counts.size != tokens.size:
        raise ShardError(f"byte sidecar {path} has {counts.size} counts but its shard {shard} has {tokens.size} "
                         f"tokens; {fix}")
    header = np.fromfile(path, dtype="<u4", count=HEADER_INTS)
    if int(header[3]) != SIDECAR_TAG:  # the CaseOps exports' sidecars: length only
        return
    if int(header[4]) != zlib.crc32(np.ascontiguousarray(tokens, dtype="<u2")):
        raise ShardError(f"byte sidecar {path} was made for other tokens than its shard {shard} holds "
                         f"(crc32 differs); {fix}")
    total = int(header[5]) | int(header[6]) << 32
    if int(counts.sum(dtype=np.int64)) != total:
        raise ShardError(f"byte sidecar {path}: its counts sum to {int(counts.sum(dtype=np.int64))} but its header "
                         f"records {total} (damaged); {fix}")


def load_byte_sidecar(files: str | os.PathLike | Sequence[str | os.PathLike], num_tokens: int) -> torch.Tensor | None:
    """Per-token byte counts of the validation stream (int32, its first num_tokens), or None when no
    validation shard has a sidecar. Each sidecar is checked against its own shard."""
    files = _as_files(files)
    if not any(sidecar_path(f).is_file() for f in files):
        return None
    parts, have = [], 0
    for f in files:
        if have >= num_tokens:
            break
        path = sidecar_path(f)
        if not path.is_file():
            raise ShardError(f"{f} has no byte sidecar {path} while other validation shards have one; "
                             f"rebuild or re-download the split")
        counts = read_shard(path)
        _check_sidecar(path, counts, f, read_shard(f))
        parts.append(counts)
        have += counts.size
    counts = np.concatenate(parts)
    if counts.size < num_tokens:
        raise ShardError(f"byte sidecars beside {files[0]} hold {counts.size} counts for {num_tokens} tokens")
    return torch.from_numpy(counts[:num_tokens].astype(np.int32))


def validation_bytes(cfg, tokenizer, num_tokens: int, device: torch.device | str | None = None):
    """How val_bpb counts the bytes of the first num_tokens validation tokens: a byte sidecar
    (1-D int32 tensor, one count per token position, on the CPU) or the tokenizer's byte tables
    (ByteLUTs.to_torch). cfg.data.byte_sidecar: auto | on | off; cfg.data.caseops requires it."""
    mode, caseops = cfg.data.byte_sidecar, cfg.data.caseops
    sp = getattr(tokenizer, "sp", None)
    has_ops = sp is not None and all(sp.piece_to_id(op) != sp.unk_id() for op in CASEOPS_OPERATORS)
    if caseops and not has_ops:
        raise ShardError(f"data.caseops=true but tokenizer {cfg.data.tokenizer_path} has no CaseOps operator "
                         f"pieces (U+E001..U+E004); use the tokenizer the CaseOps shards were made with")
    counts = None if mode == "off" else load_byte_sidecar(cfg.val_files(), num_tokens)
    if counts is not None:
        return counts
    if mode == "on" or caseops or has_ops:
        why = ("data.byte_sidecar=on" if mode == "on" else "CaseOps text (its operators stand for no bytes of "
               "the original text, which the tokenizer's byte tables would count)")
        raise ShardError(f"{why} needs validation byte sidecars, e.g. {sidecar_path(_as_files(cfg.val_files())[0])}; "
                         f"none found{' (data.byte_sidecar=off)' if mode == 'off' else ''}: build them with `pgolf "
                         f"data tokenize ... --caseops` or download the CaseOps export (`pgolf data fineweb "
                         f"--variant sp8192_caseops`)")
    return tokenizer.byte_luts(cfg.model.vocab_size).to_torch(device)
