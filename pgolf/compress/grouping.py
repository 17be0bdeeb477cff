"""Per-group compression: the container's layout "per_group" (PR #1855's export, RECORDS B15).

The integer codes of the tensors that play one role in every layer (blocks.0.mlp.fc.weight,
blocks.1.mlp.fc.weight, ...) are stored next to each other, one *group* per role
(``role_group``), and each group is compressed on its own with export.group_backend: brotli
(quality 11, window 2^24), lzma, zstd, zlib, or ``lrzip -z -L 9`` (ZPAQ), which needs the
``lrzip`` binary on PATH and is never required otherwise. 2-D codes are stored transposed, as the
record stores them. The rest of the payload (JSON header, scales, float passthrough, row
permutations, groups too small to pay for a stream of their own) is one stream compressed with
export.compressor ("auto": the smallest of the installed compressors).

Rows of the groups named in export.row_order are first put in greedy nearest-L1-neighbour order
(``greedy_l1_order``) so that similar rows sit next to each other for the compressor; the
permutation is stored (uint16 when the rows allow, else int32) and undone on load.

The compressed payload of such an artifact (container compressor name ``CODEC``) is a frame::

    4 bytes   b"PGG1"
    2         n = number of streams (u16)
    n times   codec name length (u8), codec name (ASCII), raw length (u64), stored length (u64)
    ...       the stored streams, concatenated; nothing may follow

Decompressing every stream and concatenating them gives back the container's raw payload,
whose own header says where the streams start and end (``split_streams``); the container's
crc32 covers it as for every other layout. This module imports nothing of the container (the
container imports it lazily): the codecs come in as an argument.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from pgolf.compress.config import GROUP_BACKENDS
from pgolf.compress.quantizers.registry import get_quantizer
from pgolf.runtime.threads import thread_map

__all__ = ["CODEC", "FRAME_MAGIC", "GroupError", "Codes", "role_group", "greedy_l1_order", "perm_bytes",
           "read_perm", "check_options", "group_codes", "split_streams", "header_streams", "compress_streams",
           "decompress_streams", "frame_streams", "describe_streams", "lrzip_binary", "MIN_OWN_STREAM_BYTES"]

CODEC = "groups"
FRAME_MAGIC = b"PGG1"
_U16, _U64 = struct.Struct("<H"), struct.Struct("<Q")
# A role group smaller than this joins the rest stream instead of paying for a stream of its own
# (a frame entry and the compressor's start-up) for little data: LQER factors, small side
# matrices. 4 KiB is a round guess, not a measured optimum.
MIN_OWN_STREAM_BYTES = 4096
# The full distance matrix of greedy_l1_order up to this many rows (256 MiB of float32 at 8192,
# #1855's vocabulary); beyond it each step computes one row of distances.
_FULL_MATRIX_MAX_ROWS = 8192
_PERM_DTYPES = {"uint16": "<u2", "int32": "<i4"}

Codecs = Mapping[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]


class GroupError(ValueError):
    """A per-group stream cannot be written or read (the container reports it as ArtifactError)."""


# ---------------------------------------------------------------- groups and row order

def role_group(name: str) -> str:
    """The group of a parameter: its name with every layer index replaced by ``*`` and a trailing
    ``.weight`` dropped, so one role across layers is one group: ``blocks.3.attn.c_q.weight`` ->
    ``blocks.*.attn.c_q``, ``tok_emb.weight`` -> ``tok_emb``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    return ".".join("*" if p.isdigit() else p for p in parts)


def greedy_l1_order(codes: torch.Tensor, full_matrix_max_rows: int = _FULL_MATRIX_MAX_ROWS,
                    device: str | torch.device | None = None) -> np.ndarray:
    """Rows of ``codes`` (2-D integer) in greedy nearest-neighbour order by L1 distance: row 0
    first, then repeatedly the nearest row not yet taken (the lowest index among equals), as
    #1855's export orders them. Returns the order as int64 indices.

    The distances come from torch.cdist (p=1) on ``device`` (None: CUDA when available, else the
    CPU with every thread torch uses), all at once up to ``full_matrix_max_rows`` rows (by blocks,
    one triangle mirrored), else one row per step; the walk itself is n argmins on the CPU. Float
    sums of integer codes are exact here (below 2^24 in float32, else float64) in any order, so
    the order is the same on every device and ties break exactly as integer arithmetic would."""
    if codes.ndim != 2:
        raise GroupError(f"row order needs a 2-D tensor, got shape {tuple(codes.shape)}")
    n, cols = codes.shape
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    span = int(codes.max()) - int(codes.min()) if codes.numel() else 0
    dtype = torch.float32 if span * cols < 2 ** 24 else torch.float64
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    x = codes.to(device=device, dtype=dtype)
    if n <= full_matrix_max_rows:
        dist = _l1_matrix(x).cpu().numpy()

        def distances(i: int) -> np.ndarray:
            return dist[i]
    else:
        def distances(i: int) -> np.ndarray:
            return torch.cdist(x[i:i + 1], x, p=1)[0].cpu().numpy()
    taken = np.zeros(n, dtype=np.float32 if dtype == torch.float32 else np.float64)  # inf: already taken
    order = np.empty(n, dtype=np.int64)
    cur = order[0] = 0
    taken[0] = np.inf
    for k in range(1, n):
        cur = int(np.argmin(distances(cur) + taken))  # np.argmin: the first of equal minima
        order[k] = cur
        taken[cur] = np.inf
    return order


def _l1_matrix(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """All pairwise L1 distances of x's rows, by blocks of rows against the rows from the block on:
    the matrix is symmetric, so the lower triangle is the upper one mirrored (half of cdist's work)."""
    n = x.shape[0]
    dist = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        d = torch.cdist(x[i:i + block], x[i:], p=1)
        dist[i:i + block, i:] = d
        dist[i:, i:i + block] = d.T
    return dist


def perm_bytes(order: np.ndarray) -> tuple[str, bytes]:
    """A row order as stored: (dtype name, little-endian bytes); uint16 while the rows fit it."""
    dtype = "uint16" if len(order) <= 1 << 16 else "int32"
    return dtype, np.asarray(order).astype(_PERM_DTYPES[dtype]).tobytes()


def read_perm(buf, spec: dict, rows: int) -> np.ndarray:
    """The stored order of ``rows`` rows (spec: dtype, shape, offset, nbytes within ``buf``), checked
    to be a permutation of 0 .. rows - 1."""
    dtype = _PERM_DTYPES.get(spec.get("dtype"))
    off, nbytes = spec.get("offset", -1), spec.get("nbytes", -1)
    if dtype is None or spec.get("shape") != [rows] or nbytes != rows * np.dtype(dtype).itemsize \
            or off < 0 or off + nbytes > len(buf):
        raise GroupError(f"row permutation {spec!r} does not fit a tensor of {rows} rows")
    order = np.frombuffer(buf, dtype=dtype, count=rows, offset=off).astype(np.int64)
    if rows and (order.min() < 0 or order.max() >= rows or np.bincount(order, minlength=rows).max() != 1):
        raise GroupError("row permutation is not a permutation of the tensor's rows")
    return order


@dataclass
class Codes:
    """A tensor's codes as layout per_group stores them."""
    group: str  # role_group of its name
    data: bytes  # rows reordered by perm, then transposed when 2-D
    transposed: bool
    perm: tuple[str, bytes] | None  # the stored row order (perm_bytes), or None
    own: bool  # its group is large enough for a stream of its own


def check_options(storage: str, row_order, backend: str, check_compressor: Callable[[str], None]) -> None:
    """Raise GroupError unless layout per_group can pack with these options here (a compressor
    backend's package is checked with the container's ``check_compressor``)."""
    if storage not in ("auto", "bytes"):
        raise GroupError(f"layout 'per_group' stores one code per byte (packing would hide the codes from the "
                         f"group compressor): use storage 'bytes' or 'auto', not {storage!r}")
    if backend not in GROUP_BACKENDS:
        raise GroupError(f"unknown group backend {backend!r} (export.group_backend); choose one of "
                         f"{', '.join(GROUP_BACKENDS)}")
    if backend == "lrzip":
        lrzip_binary()
    else:
        check_compressor(backend)
    if isinstance(row_order, str) or not all(isinstance(g, str) and g for g in row_order):
        raise GroupError(f"row_order must be a list of group names, e.g. [\"tok_emb\", \"blocks.*.mlp.fc\"], "
                         f"got {row_order!r}")
    if len(set(row_order)) != len(row_order):
        raise GroupError(f"row_order names a group twice: {list(row_order)!r}")


def group_codes(qdict: Mapping, row_order: list[str]) -> dict[str, Codes]:
    """The int8 codes of every integer kind (quantizer rank 0) by role group; the rows of the groups
    in row_order reordered (2-D tensors of two rows or more)."""
    members: dict[str, list[str]] = {}
    for name, qt in qdict.items():
        if get_quantizer(qt.kind).rank == 0 and qt.data.dtype == torch.int8:
            members.setdefault(role_group(name), []).append(name)
    unknown = [g for g in row_order if g not in members]
    if unknown:
        raise GroupError(f"row_order names {', '.join(map(repr, unknown))}, not a code group of this state dict; "
                         f"its groups: {', '.join(sorted(members)) or 'none'}")
    out = {}
    for group, names in members.items():
        own = sum(qdict[n].data.numel() for n in names) >= MIN_OWN_STREAM_BYTES
        for name in names:
            t, perm = qdict[name].data.detach().to("cpu"), None
            if group in row_order and t.ndim == 2 and t.shape[0] > 1:
                order = greedy_l1_order(t)
                perm = perm_bytes(order)
                t = t[torch.from_numpy(order)]
            stored = (t.T if t.ndim == 2 else t).contiguous().numpy().tobytes()  # int8: no byte order
            out[name] = Codes(group, stored, t.ndim == 2, perm, own)
    return out


# ---------------------------------------------------------------- lrzip

def lrzip_binary() -> str:
    path = shutil.which("lrzip")
    if path is None:
        raise GroupError("group backend 'lrzip' needs the lrzip binary on PATH (e.g. `apt-get install lrzip`); "
                         "it was not found: install it or use export.group_backend=brotli")
    return path


def _lrzip(data: bytes, decompress: bool) -> bytes:
    binary = lrzip_binary()
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        src = Path(tmp) / ("group.lrz" if decompress else "group.bin")
        dst = Path(tmp) / ("group.bin" if decompress else "group.bin.lrz")
        src.write_bytes(data)
        # #1855's flags: -z ZPAQ, -L 9 its strongest level
        args = ["-d", "-f"] if decompress else ["-z", "-L", "9"]
        done = subprocess.run([binary, *args, "-o", str(dst), str(src)], capture_output=True)
        if done.returncode != 0 or not dst.is_file():
            tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-300:]
            raise GroupError(f"lrzip {'-d' if decompress else '-z -L 9'} failed (exit {done.returncode}): {tail}")
        return dst.read_bytes()


_LRZIP = (lambda b: _lrzip(b, False), lambda b: _lrzip(b, True))
_NONE = (bytes, bytes)


# ---------------------------------------------------------------- streams

@dataclass
class Stream:
    """A byte range of the raw payload compressed on its own."""
    codec: str  # a compressor name, "auto" (rest stream: the smallest), "lrzip" or "none"
    own: bool  # a role group's stream (else the rest stream, or the crc)
    start: int
    end: int
    labels: list[str] = field(default_factory=list)  # what it holds: "header+meta", group keys


def split_streams(raw: bytes) -> list[Stream]:
    """The streams of a per_group raw payload, read from its JSON header: the header and every
    group without a ``codec`` in one rest stream (header["codec"]), each group with one in its own,
    the trailing crc32 stored as is."""
    try:
        (hlen,) = _U64.unpack_from(raw, 0)
        header = json.loads(bytes(raw[_U64.size:_U64.size + hlen]).decode())
    except Exception as e:  # the container built it; this is a foreign or broken payload
        raise GroupError(f"not a per_group payload ({type(e).__name__}: {e})") from None
    return header_streams(header, _U64.size + hlen, len(raw))


def header_streams(header: dict, header_bytes: int, raw_bytes: int) -> list[Stream]:
    """split_streams from the parsed JSON header, the bytes up to its end and the payload's length."""
    try:
        rest, groups = header["codec"], header["groups"]
    except (KeyError, TypeError):
        raise GroupError("per_group payload header names no rest codec or groups") from None
    pos = header_bytes
    streams = [Stream(rest, False, 0, pos, ["header+meta"])]
    for g in groups:
        n, codec = int(g["nbytes"]), g.get("codec")
        if codec is None and not streams[-1].own:
            streams[-1].end += n
            streams[-1].labels.append(g["key"])
        else:
            streams.append(Stream(codec or rest, codec is not None, pos, pos + n, [g["key"]]))
        pos += n
    if raw_bytes - pos != 4:
        raise GroupError(f"per_group payload has {raw_bytes - pos} bytes after its groups, not a 4-byte crc32")
    streams.append(Stream("none", False, pos, raw_bytes, ["crc32"]))
    return streams


def _codec(codecs: Codecs, name: str):
    if name == "lrzip":
        return _LRZIP
    if name == "none":
        return _NONE
    if name == CODEC or name not in codecs:
        raise GroupError(f"unknown stream codec {name!r}")
    return codecs[name]


def compress_streams(raw: bytes, codecs: Codecs, auto: Callable[[], tuple[str, ...]],
                     jobs: int | None = None) -> bytes:
    """The frame of a per_group raw payload: each stream compressed with its codec (``auto()``: the
    compressors "auto" tries, the smallest output kept, ties to the first), in threads."""
    streams = split_streams(raw)
    view = memoryview(raw)

    def run(s: Stream) -> tuple[str, bytes]:
        data = bytes(view[s.start:s.end])
        if not data or s.codec == "none":
            return "none", data
        if s.codec == "auto":
            outs = [(name, _codec(codecs, name)[0](data)) for name in auto()]
            return min(outs, key=lambda o: len(o[1]))  # min keeps the first of equal sizes
        return s.codec, _codec(codecs, s.codec)[0](data)

    done = thread_map(run, streams, jobs)
    index = [FRAME_MAGIC, _U16.pack(len(done))]
    for (name, data), s in zip(done, streams):
        code = name.encode("ascii")
        index += [bytes([len(code)]), code, _U64.pack(s.end - s.start), _U64.pack(len(data))]
    return b"".join(index + [data for _, data in done])


def frame_streams(blob) -> tuple[list[dict], int]:
    """-> ([{codec, raw_bytes, stored_bytes, offset}] per stream, bytes of the frame's index)."""
    view = memoryview(blob)
    if bytes(view[:4]) != FRAME_MAGIC or len(view) < 6:
        raise GroupError("per_group payload does not start with its frame magic")
    (n,) = _U16.unpack_from(view, 4)
    pos, out = 6, []
    try:
        for _ in range(n):
            k = view[pos]
            name = bytes(view[pos + 1:pos + 1 + k]).decode("ascii")
            raw_n, stored_n = _U64.unpack_from(view, pos + 1 + k)[0], _U64.unpack_from(view, pos + 9 + k)[0]
            out.append({"codec": name, "raw_bytes": raw_n, "stored_bytes": stored_n})
            pos += 17 + k
    except (IndexError, struct.error, UnicodeDecodeError):
        raise GroupError("per_group frame index is truncated") from None
    index_bytes = pos
    for s in out:
        s["offset"] = pos
        pos += s["stored_bytes"]
    if pos != len(view):
        raise GroupError(f"per_group frame holds {len(view) - index_bytes} stream bytes, its index says "
                         f"{pos - index_bytes}")
    return out, index_bytes


def decompress_streams(blob, codecs: Codecs, jobs: int | None = None) -> bytes:
    """The raw payload back from its frame (streams decompressed in threads, lengths checked)."""
    streams, _ = frame_streams(blob)
    view = memoryview(blob)

    def run(s: dict) -> bytes:
        data = _codec(codecs, s["codec"])[1](bytes(view[s["offset"]:s["offset"] + s["stored_bytes"]]))
        if len(data) != s["raw_bytes"]:
            raise GroupError(f"a {s['codec']} stream decompressed to {len(data)} bytes, not {s['raw_bytes']}")
        return data

    parts = thread_map(run, streams, jobs)
    return b"".join(parts)


def describe_streams(payload, header: dict, header_bytes: int, raw_bytes: int, outer: int) -> tuple[list, dict]:
    """For describe_artifact: the streams of a per_group payload as stored ({groups, codec, raw_bytes,
    stored_bytes}), and the file's exact split over them: ``outer`` (the container's outer header)
    plus the frame's index and the crc32 as "outer header", then each stream."""
    stored, index_bytes = frame_streams(payload)
    streams = header_streams(header, header_bytes, raw_bytes)
    if len(stored) != len(streams):
        raise GroupError(f"{len(stored)} streams stored, its header makes {len(streams)}")
    out, breakdown = [], {"outer header": outer + index_bytes}
    for s, f in zip(streams, stored):
        out.append({"groups": s.labels, "codec": f["codec"], "raw_bytes": f["raw_bytes"],
                    "stored_bytes": f["stored_bytes"]})
        if s.labels == ["crc32"]:
            breakdown["outer header"] += f["stored_bytes"]
        elif s.own:
            breakdown[f"{s.labels[0]} ({f['codec']})"] = f["stored_bytes"]
        else:  # "rest (header+meta, scale, float, perm; brotli)"
            kinds = dict.fromkeys(label.split(":")[0] for label in s.labels)
            breakdown[f"rest ({', '.join(kinds)}; {f['codec']})"] = f["stored_bytes"]
    return out, breakdown
