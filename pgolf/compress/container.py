"""The pgolf artifact: a safe, checksummed container for a quantized model, and
exact size accounting against the 16,000,000-byte cap.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"PGOLFART"
    8       2     format version (u16), currently 2 (1 is still read)
    10      1     n = length of the compressor name (u8)
    11      n     compressor name, ASCII ("zlib", "zstd", "lzma", "brotli"); never "auto"
    11+n    8     L = length of the compressed payload (u64)
    19+n    32    sha256 of the compressed payload
    51+n    L     compressed payload; nothing may follow it

The payload, once decompressed, is::

    8 bytes       H = length of the JSON header (u64)
    H bytes       JSON header, UTF-8
    ...           the data groups (see below), concatenated
    4 bytes       crc32 of everything before it (version 2 only)

The JSON header is ``{"format": "pgolf-artifact", "storage", "layout", "groups": [...],
"tensors": [...], "meta": {...}}``. Each tensor entry holds ``name, kind, bits,
orig_dtype, data`` and ``scale`` (null or a spec); a spec is ``{dtype, shape, g, offset,
nbytes}`` plus ``packed: N`` when the int8 codes are bit-packed N bits per value
(``pgolf.compress.packing``: offset-binary, little-endian bit order). ``g`` names a data group
and ``offset`` is relative to the group's bytes. A group is ``{key, itemsize, planes,
nbytes}``; with ``planes`` its stored bytes are the byte planes of its items (all most
significant bytes, then the next, ..., the least significant last), undone on load.
bfloat16 is stored as its 16-bit pattern. ``meta`` is free-form JSON (config, run id,
...). Version 1 files (no groups, no crc: every spec's offset is into the bytes after
the header) are still read.

Loading never unpickles or executes anything. The sha256 is verified before
decompression and the crc32 after it, so a corrupt or truncated file, or a payload that
decompresses to something else, is reported as ``ArtifactError`` under every compressor.

Choices, each recorded in the file so loading is exact (``describe_artifact`` reports them):

* compressor: ``"zlib"`` (level 9), ``"zstd"`` (level 22, zstandard), ``"lzma"`` (preset 9
  extreme), ``"lzma6"`` (preset 6, PR #549's), ``"brotli"`` (quality 11, window 2^24; optional
  ``pip install brotli``), or ``"auto"``: every available one but lzma6, the smallest file kept.
* storage of per-row intN codes with N < 8: ``"bytes"`` (one code per byte, the
  compressor squeezes the unused bits), ``"packed"`` (N bits each), or ``"auto"``
  (both, the smaller file kept).
* layout: ``"plain"`` (each tensor's codes then its scale, in state-dict order),
  ``"grouped"`` (same-kind data together: int codes by width, then scales, then float
  passthrough, then raw tensors; multi-byte groups split into byte planes), or
  ``"auto"`` (both, the smaller file kept); or ``"per_group"``, never tried by "auto": PR #1855's
  per-group compression (``pgolf.compress.grouping``: the codes of each role across layers
  transposed, optionally row-reordered, and compressed alone with a group backend; the rest with
  the compressor). Its file's compressor is ``"groups"``, a frame of separately compressed streams.

Under "auto" every combination is compressed (in threads: the compressors release the
GIL) and the smallest wins; ties go to the earlier compressor of ``COMPRESSOR_ORDER``,
then storage "bytes", then layout "plain", so the bytes are deterministic.

Measured 2026-11 with ``benchmarks/compression_matrix.py --random 512x1024`` (one random
normal 512x1024 matrix, 524,288 params, per-row clip-searched codes + fp16 scales; whole
artifact bytes, plain layout; bit-packed raw sizes would be 394,240 / 328,704 / 263,168)::

    codes  compressor   one per byte   bit-packed
    int6   zlib              366,413      382,457
    int6   zstd              353,723      380,930
    int6   lzma              358,395      381,615
    int6   brotli            352,086      375,295
    int5   zlib              326,616      326,098
    int5   zstd              293,679      328,460
    int5   lzma              300,011      324,735
    int5   brotli            292,255      320,805
    int4   zlib              268,639      234,951
    int4   zstd              234,601      233,716
    int4   lzma              242,491      236,427
    int4   brotli            233,086      232,874

So one code per byte wins at 6 bits (4-7 %) and at 5 bits with zstd/lzma/brotli (8-11 %;
zlib ties): the entropy coders model whole bytes and get close to the codes' entropy, while
N-bit fields straddling bytes hide the distribution from them. Packing wins at 4 bits, by
0.1-0.4 % with zstd/brotli and ~13 % with zlib (nibble pairs are whole bytes again). Hence
``storage="auto"``. The grouped layout changes these single-matrix numbers by under 0.1 %,
but on a trained model whose small tensors are fp16 passthrough (runs/bench-fineweb-small,
592K params, official int8) it saves 3.3 % (brotli), 4.2 % (lzma), 6.0-6.2 % (zlib, zstd)
through the fp16 byte planes. Clip search makes codes use more levels, hence more bytes
(int4: +13 % here) for less error (int4: relative squared error 2.0e-2 -> 1.3e-2);
trading that off is the bit allocator's job.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pgolf.compress.packing import pack_bits, unpack_bits
from pgolf.compress.quantizers.registry import QuantizedTensor, component_label, dtype_name, format_label, get_quantizer
from pgolf.compress.quantizers.rows import qmax_for
from pgolf.runtime.files import atomic_write
from pgolf.runtime.threads import thread_map

__all__ = [
    "MAGIC", "FORMAT_VERSION", "READ_VERSIONS", "COMPRESSORS", "COMPRESSOR_ORDER",
    "COMPRESSOR_CHOICES", "STORAGES", "LAYOUTS", "ArtifactError", "available_compressors",
    "check_compressor", "pack_artifact", "unpack_artifact", "describe_artifact", "write_artifact",
    "read_artifact",
]

MAGIC = b"PGOLFART"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
_SHA_LEN = 32


# What to do about a corrupt artifact (the command is pgolf.lab.export_cli's).
REEXPORT_HINT = ("re-export it from the run's last checkpoint with `pgolf export RUN` (a new file under "
                 "RUN/exports/; --out PATH to choose it)")


class ArtifactError(ValueError):
    """A file is not a valid pgolf artifact, or an artifact does not fit the cap."""


# ---------------------------------------------------------------- compressors

def zstd_module():
    try:
        import zstandard
    except ImportError:
        raise ArtifactError("compressor 'zstd' needs the zstandard package: "
                            "install zstandard (`pip install zstandard`) or use compressor=zlib") from None
    return zstandard


def brotli_module():
    try:
        import brotli
    except ImportError:
        raise ArtifactError("compressor 'brotli' needs the brotli package: "
                            "install it (`pip install brotli`) or use compressor=zlib, zstd or lzma") from None
    return brotli


LZMA_PRESET = 9 | lzma.PRESET_EXTREME
_BROTLI_QUALITY, _BROTLI_LGWIN = 11, 24

# name -> (compress, decompress)
COMPRESSORS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "zlib": (lambda b: zlib.compress(b, level=9), zlib.decompress),
    "zstd": (lambda b: zstd_module().ZstdCompressor(level=22).compress(b),
             lambda b: zstd_module().ZstdDecompressor().decompress(b)),
    "lzma": (lambda b: lzma.compress(b, preset=LZMA_PRESET), lzma.decompress),
    "lzma6": (lambda b: lzma.compress(b, preset=6), lzma.decompress),
    "brotli": (lambda b: brotli_module().compress(b, quality=_BROTLI_QUALITY, lgwin=_BROTLI_LGWIN),
               lambda b: brotli_module().decompress(b)),
    # layout "per_group" only: a frame of streams, each compressed alone (pgolf.compress.grouping)
    "groups": (lambda b: _groups_compress(b), lambda b: _groups_decompress(b)),
}
# "auto" tries these (those installed) and breaks size ties by this order
COMPRESSOR_ORDER = ("zlib", "zstd", "lzma", "brotli")
COMPRESSOR_CHOICES = (*COMPRESSOR_ORDER, "lzma6", "auto")  # what a config may name
STORAGES = ("bytes", "packed")
LAYOUTS = ("plain", "grouped")
PER_GROUP, GROUPS = "per_group", "groups"  # the layout "auto" never tries, and its file's compressor
_MODULE_CHECKS = {"zstd": zstd_module, "brotli": brotli_module}


def _compressor(name: str):
    if name not in COMPRESSORS:
        raise ArtifactError(f"unknown compressor {name!r}; known: {', '.join(sorted(COMPRESSORS))}")
    return COMPRESSORS[name]


def check_compressor(name: str) -> None:
    """Raise ArtifactError unless ``name`` is "auto" or a known compressor whose package is
    installed (the message says what to install)."""
    if name == "auto":
        return
    _compressor(name)
    if name in _MODULE_CHECKS:
        _MODULE_CHECKS[name]()


def available_compressors() -> tuple[str, ...]:
    """The compressors of ``COMPRESSOR_ORDER`` usable here (zstd/brotli need their packages)."""
    out = []
    for name in COMPRESSOR_ORDER:
        try:
            check_compressor(name)
        except ArtifactError:
            continue
        out.append(name)
    return tuple(out)


def _choices(value: str, options: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value == "auto":
        return options
    if value not in options:
        raise ArtifactError(f"unknown {what} {value!r}; choose one of {', '.join(options)} or auto")
    return (value,)


# ---------------------------------------------------------------- tensor bytes

# torch dtype name -> little-endian numpy dtype of its stored bytes
_NP_DTYPES = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<i2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}


def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    name = dtype_name(t.dtype)
    if name not in _NP_DTYPES:
        raise ArtifactError(f"cannot store dtype {name}; supported: {', '.join(_NP_DTYPES)}")
    t = t.detach().to("cpu").contiguous()
    if name == "bfloat16":
        t = t.view(torch.int16)
    return name, t.numpy().astype(_NP_DTYPES[name], copy=False).tobytes()


def _tensor_from(raw: memoryview, spec: dict) -> torch.Tensor:
    name, shape, off, nbytes = spec["dtype"], spec["shape"], spec["offset"], spec["nbytes"]
    if name not in _NP_DTYPES:
        raise ArtifactError(f"artifact holds unsupported dtype {name!r}")
    np_dtype = np.dtype(_NP_DTYPES[name])
    count = int(np.prod(shape, dtype=np.int64))
    packed = spec.get("packed")
    expect = (count * packed + 7) // 8 if packed else count * np_dtype.itemsize
    if (packed and name != "int8") or expect != nbytes or off < 0 or off + nbytes > len(raw):
        raise ArtifactError(f"artifact tensor {spec.get('name', '?')!r} has an inconsistent byte range")
    if packed:
        arr = unpack_bits(raw[off:off + nbytes], packed, count)
    else:
        arr = np.frombuffer(raw, dtype=np_dtype, count=count, offset=off).astype(np_dtype.newbyteorder("="))
    t = torch.from_numpy(arr.reshape(shape))
    return t.view(torch.bfloat16) if name == "bfloat16" else t


# ---------------------------------------------------------------- payload layout

@dataclass
class _Segment:
    """One stored byte string (a tensor's codes/values or its scale) and where it goes."""
    key: str         # data group it belongs to under the grouped layout
    rank: int        # group category: 0 int codes, 1 scales, 2 float passthrough, 3 raw
    itemsize: int
    data: bytes
    spec: dict       # dtype, shape, nbytes (+ packed); g and offset are added per layout


def _segments(qdict: dict[str, QuantizedTensor]) -> list[tuple[str, QuantizedTensor, dict]]:
    """Per tensor: its byte strings in both storages (computed once, shared by candidates)."""
    out = []
    for name, qt in qdict.items():
        if not isinstance(qt, QuantizedTensor):
            raise ArtifactError(f"{name!r} is not a QuantizedTensor")
        dtype, data = _tensor_bytes(qt.data)
        parts = {"bytes": data, "packed": None, "dtype": dtype,
                 "scale": _tensor_bytes(qt.scale) if qt.scale is not None else None}
        if get_quantizer(qt.kind).packable:
            qmax = qmax_for(qt.bits)
            if qt.data.numel() and not -qmax <= int(qt.data.min()) <= int(qt.data.max()) <= qmax:
                raise ArtifactError(f"{name!r}: int{qt.bits} codes outside [-{qmax}, {qmax}]")
            if qt.bits < 8:
                parts["packed"] = pack_bits(qt.data.numpy(), qt.bits)
        out.append((name, qt, parts))
    return out


def _build_raw(prepared, meta: dict, storage: str, layout: str, codes: dict | None = None,
               codecs: tuple[str, str] | None = None) -> bytes:
    """The uncompressed payload for one (storage, layout) choice. Layout per_group also takes the
    role groups' codes (grouping.group_codes) and (rest compressor, group backend)."""
    segs: list[_Segment] = []
    entries = []
    any_packed = False
    for name, qt, parts in prepared:
        shape = list(qt.data.shape)
        rank = get_quantizer(qt.kind).rank
        if parts["packed"] is not None and storage == "packed":
            any_packed = True
            data = parts["packed"]
            spec = {"dtype": "int8", "shape": shape, "nbytes": len(data), "packed": qt.bits}
            key, itemsize = f"int{qt.bits}p", 1
        else:
            data = parts["bytes"]
            spec = {"dtype": parts["dtype"], "shape": shape, "nbytes": len(data)}
            itemsize = qt.data.element_size()
            # integer codes group by their format label ("int6"), other data by kind and dtype
            key = format_label(qt.kind, qt.bits, parts["dtype"]) if rank == 0 else f"{qt.kind}:{parts['dtype']}"
        slot = codes.get(name) if codes else None
        if slot is not None:  # per_group: after the rest, each large role group in a stream of its own
            data, key, rank = slot.data, f"codes:{slot.group}", 5 if slot.own else 4
            if slot.transposed:
                spec["transposed"] = True
        segs.append(_Segment(key, rank, itemsize, data, spec))
        entry = {"name": name, "kind": qt.kind, "bits": qt.bits, "orig_dtype": qt.orig_dtype,
                 "data": spec, "scale": None}
        if parts["scale"] is not None:
            sdtype, sdata = parts["scale"]
            sspec = {"dtype": sdtype, "shape": list(qt.scale.shape), "nbytes": len(sdata)}
            segs.append(_Segment(f"scale:{sdtype}", 1, qt.scale.element_size(), sdata, sspec))
            entry["scale"] = sspec
        if slot is not None and slot.perm is not None:
            pdtype, pdata = slot.perm
            pspec = {"dtype": pdtype, "shape": [shape[0]], "nbytes": len(pdata)}
            segs.append(_Segment(f"perm:{pdtype}", 4, len(pdata) // shape[0], pdata, pspec))
            entry["perm"] = pspec
        entries.append(entry)

    if layout == "plain":
        order = [("all", 1, False, segs)]
    else:
        by_key: dict[str, list[_Segment]] = {}
        for s in sorted(segs, key=lambda s: s.rank):  # stable: first appearance within a rank
            by_key.setdefault(s.key, []).append(s)
        order = [(k, ss[0].itemsize, ss[0].itemsize > 1, ss) for k, ss in by_key.items()]
    groups, blobs = [], []
    for gi, (key, itemsize, planes, ss) in enumerate(order):
        offset = 0
        for s in ss:
            s.spec["g"], s.spec["offset"] = gi, offset
            offset += len(s.data)
        buf = b"".join(s.data for s in ss)
        if planes:
            buf = _planes(buf, itemsize)
        groups.append({"key": key, "itemsize": itemsize, "planes": planes, "nbytes": len(buf)})
        if codecs and ss[0].rank == 5:
            groups[-1]["codec"] = codecs[1]
        blobs.append(buf)
    head = {"format": "pgolf-artifact", "storage": "packed" if any_packed else "bytes",
            "layout": layout, "groups": groups, "tensors": entries, "meta": meta or {}}
    if codecs:
        head["codec"] = codecs[0]  # the rest stream's
    try:
        header = json.dumps(head, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"artifact meta must be plain JSON data: {e}") from None
    body = b"".join([_U64.pack(len(header)), header, *blobs])
    return body + _U32.pack(zlib.crc32(body))


def _planes(buf: bytes, itemsize: int) -> bytes:
    """Byte planes of ``itemsize``-byte little-endian items: most significant bytes first."""
    if itemsize <= 1:
        return buf
    return np.frombuffer(buf, dtype=np.uint8).reshape(-1, itemsize)[:, ::-1].T.tobytes()


def _unplanes(buf, itemsize: int) -> memoryview:
    if itemsize <= 1:
        return memoryview(buf)
    return memoryview(np.frombuffer(buf, dtype=np.uint8).reshape(itemsize, -1)[::-1].T.tobytes())


def _wrap(compressor: str, payload: bytes) -> bytes:
    name = compressor.encode("ascii")
    return b"".join([MAGIC, _U16.pack(FORMAT_VERSION), bytes([len(name)]), name,
                     _U64.pack(len(payload)), hashlib.sha256(payload).digest(), payload])


# ---------------------------------------------------------------- layout per_group

def _groups_compress(raw: bytes, jobs: int | None = None) -> bytes:
    from pgolf.compress.grouping import GroupError, compress_streams

    try:
        return compress_streams(raw, COMPRESSORS, available_compressors, jobs)
    except GroupError as e:
        raise ArtifactError(f"per-group compression: {e}") from None


def _groups_decompress(blob: bytes) -> bytes:
    from pgolf.compress.grouping import GroupError, decompress_streams

    try:
        return decompress_streams(blob, COMPRESSORS)
    except GroupError as e:
        raise ArtifactError(f"per-group streams: {e}") from None


def _pack_per_group(qdict, meta, compressor: str, storage: str, row_order, group_backend: str,
                    jobs: int | None, trials: list | None) -> bytes:
    from pgolf.compress.grouping import GroupError, check_options, group_codes

    if compressor not in COMPRESSOR_CHOICES:
        raise ArtifactError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSOR_CHOICES)}")
    check_compressor(compressor)
    try:
        check_options(storage, row_order, group_backend, check_compressor)
        codes = group_codes(qdict, list(row_order))
    except GroupError as e:
        raise ArtifactError(str(e)) from None
    raw = _build_raw(_segments(qdict), meta, "bytes", PER_GROUP, codes, (compressor, group_backend))
    blob = _wrap(GROUPS, _groups_compress(raw, jobs))
    if trials is not None:
        trials.append({"compressor": GROUPS, "storage": "bytes", "layout": PER_GROUP, "bytes": len(blob),
                       "chosen": True})
    return blob


# ---------------------------------------------------------------- pack / unpack

def pack_artifact(qdict: dict[str, QuantizedTensor], meta: dict | None = None, compressor: str = "zlib",
                  storage: str = "auto", layout: str = "auto", *, jobs: int | None = None,
                  trials: list | None = None, row_order: Sequence[str] = (), group_backend: str = "brotli") -> bytes:
    """Serialise a quantized state dict plus JSON ``meta`` into artifact bytes.

    ``compressor``, ``storage`` and ``layout`` each name one choice or ``"auto"`` (see
    the module docstring); under "auto" every combination is compressed, ``jobs`` at a
    time in threads (default: up to 8, the CPU count), and the smallest file is returned
    (deterministic tie-break). Pass a list as ``trials`` to receive one dict per
    combination tried: ``{compressor, storage, layout, bytes, chosen}``.

    ``layout="per_group"`` (never tried by "auto") compresses each role group of codes alone with
    ``group_backend`` and the rest with ``compressor`` ("auto": per stream the smallest), after
    putting the rows of the groups named in ``row_order`` in greedy nearest-L1 order."""
    if layout == PER_GROUP:
        return _pack_per_group(qdict, meta, compressor, storage, row_order, group_backend, jobs, trials)
    if row_order or group_backend != "brotli":
        raise ArtifactError("row_order and group_backend apply to layout 'per_group' only")
    comps = available_compressors() if compressor == "auto" else \
        _choices(compressor, tuple(c for c in COMPRESSORS if c != GROUPS), "compressor")
    if compressor != "auto":
        check_compressor(compressor)
    storages = _choices(storage, STORAGES, "storage")
    layouts = _choices(layout, LAYOUTS, "layout")
    prepared = _segments(qdict)
    if not any(parts["packed"] is not None for _, _, parts in prepared):
        storages = storages[:1] if storage != "auto" else ("bytes",)  # nothing to pack
    raws = [(s, l, _build_raw(prepared, meta, s, l)) for s in storages for l in layouts]
    cands = [(c, s, l, raw) for c in comps for s, l, raw in raws]

    def run(cand):
        return COMPRESSORS[cand[0]][0](cand[3])

    payloads = thread_map(run, cands, jobs)
    best = min(range(len(cands)), key=lambda i: (len(payloads[i]), i))
    if trials is not None:
        for i, (c, s, l, _) in enumerate(cands):
            trials.append({"compressor": c, "storage": s, "layout": l,
                           "bytes": len(_wrap(c, b"")) + len(payloads[i]), "chosen": i == best})
    return _wrap(cands[best][0], payloads[best])


def _parse_outer(blob: bytes, source: str) -> tuple[int, str, memoryview]:
    """Check magic, version, lengths and sha256 -> (version, compressor, compressed payload)."""
    view = memoryview(blob)
    if bytes(view[:len(MAGIC)]) != MAGIC:
        raise ArtifactError(f"{source} is not a pgolf artifact (bad magic bytes)")
    pos = len(MAGIC)
    if len(view) < pos + _U16.size + 1:
        raise ArtifactError(f"artifact {source} is truncated (header incomplete)")
    (version,) = _U16.unpack_from(view, pos)
    if version not in READ_VERSIONS:
        raise ArtifactError(f"artifact {source} has unsupported format version {version} "
                            f"(this pgolf reads versions {', '.join(map(str, READ_VERSIONS))})")
    name_len = view[pos + _U16.size]
    pos += _U16.size + 1
    if len(view) < pos + name_len + _U64.size + _SHA_LEN:
        raise ArtifactError(f"artifact {source} is truncated (header incomplete)")
    try:
        comp_name = bytes(view[pos:pos + name_len]).decode("ascii")
    except UnicodeDecodeError:
        comp_name = repr(bytes(view[pos:pos + name_len]))
    pos += name_len
    (payload_len,) = _U64.unpack_from(view, pos)
    pos += _U64.size
    digest = bytes(view[pos:pos + _SHA_LEN])
    pos += _SHA_LEN
    if len(view) - pos != payload_len:
        raise ArtifactError(f"artifact {source} is truncated or has trailing bytes: header says "
                            f"{payload_len} payload bytes, file has {len(view) - pos}")
    payload = view[pos:]
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"artifact {source} is corrupt: sha256 mismatch; "
                            + REEXPORT_HINT)
    _compressor(comp_name)
    return version, comp_name, payload


def _parse_payload(blob: bytes, source: str) -> tuple[dict, list[memoryview], dict, bytes]:
    """-> (outer info, group buffers, JSON header, its bytes); every failure is an ArtifactError."""
    version, comp_name, payload = _parse_outer(blob, source)
    _, decompress = _compressor(comp_name)
    if comp_name in _MODULE_CHECKS:
        _MODULE_CHECKS[comp_name]()  # missing package: say what to install
    try:
        raw = memoryview(decompress(bytes(payload)))
    except ArtifactError:  # per_group: a stream's missing package or binary, or a bad frame
        raise
    except Exception as e:
        raise ArtifactError(f"artifact {source} is corrupt: its payload does not decompress with "
                            f"{comp_name} ({type(e).__name__}: {e})") from None
    if version >= 2:
        if len(raw) < _U64.size + _U32.size or _U32.unpack_from(raw, len(raw) - _U32.size)[0] != \
                zlib.crc32(raw[:len(raw) - _U32.size]):
            raise ArtifactError(f"artifact {source} is corrupt: crc32 mismatch after decompression "
                                f"({comp_name}); {REEXPORT_HINT}")
        raw = raw[:len(raw) - _U32.size]
    try:
        (hlen,) = _U64.unpack_from(raw, 0)
        header_raw = bytes(raw[_U64.size:_U64.size + hlen])
        header = json.loads(header_raw.decode())
        data = raw[_U64.size + hlen:]
        if version == 1:
            groups = [data]
            header.update(storage="bytes", layout="plain", groups=[{"key": "all", "itemsize": 1,
                                                                  "planes": False, "nbytes": len(data)}])
            for e in header["tensors"]:
                e["data"] = {k: e[k] for k in ("dtype", "shape", "offset", "nbytes")}
                e["data"]["g"] = 0
                e["bits"] = 8
                if e["scale"] is not None:
                    e["scale"]["g"] = 0
        else:
            groups, pos = [], 0
            for g in header["groups"]:
                n, k = int(g["nbytes"]), int(g["itemsize"])
                if n < 0 or pos + n > len(data) or (g["planes"] and (k < 1 or n % k)):
                    raise ArtifactError(f"artifact {source} is malformed: data group {g['key']!r} overruns")
                buf = data[pos:pos + n]
                if g["planes"]:
                    buf = _unplanes(buf, k)
                groups.append(buf)
                pos += n
            if pos != len(data):
                raise ArtifactError(f"artifact {source} is malformed: {len(data) - pos} unaccounted data bytes")
    except ArtifactError:
        raise
    except Exception as e:  # checksums passed, so this is a writer bug or foreign file
        raise ArtifactError(f"artifact {source} is malformed: {type(e).__name__}: {e}") from None
    info = {"version": version, "compressor": comp_name, "compressed_payload_bytes": len(payload),
            "raw_payload_bytes": len(raw) + (_U32.size if version >= 2 else 0), "header_bytes": hlen + _U64.size}
    return info, groups, header, header_raw


def _load_data(groups: list, e: dict) -> torch.Tensor:
    """A tensor entry's data; layout per_group's 2-D codes are stored transposed, maybe row-reordered."""
    spec = {**e["data"], "name": e["name"]}
    if not spec.get("transposed"):
        t = _tensor_from(groups[spec["g"]], spec)
    elif len(spec["shape"]) != 2:
        raise ArtifactError(f"{e['name']!r} is marked transposed but is not 2-D")
    else:
        t = _tensor_from(groups[spec["g"]], {**spec, "shape": spec["shape"][::-1]}).T.contiguous()
    if e.get("perm") is not None:
        from pgolf.compress.grouping import read_perm

        order = torch.from_numpy(read_perm(groups[e["perm"]["g"]], e["perm"], t.shape[0] if t.ndim else -1))
        restored = torch.empty_like(t)
        restored[order] = t  # stored row i is original row order[i]
        t = restored
    return t


def unpack_artifact(blob: bytes, source: str = "<bytes>") -> tuple[dict[str, QuantizedTensor], dict]:
    """Parse artifact bytes (``source`` names them in errors) -> ``(qdict, meta)``."""
    _, groups, header, _ = _parse_payload(blob, source)
    try:
        qdict = {}
        for e in header["tensors"]:
            def load(spec):
                return _tensor_from(groups[spec["g"]], {**spec, "name": e["name"]})
            scale = load(e["scale"]) if e["scale"] is not None else None
            qt = QuantizedTensor(e["kind"], _load_data(groups, e), scale, e["orig_dtype"], int(e["bits"]))
            if get_quantizer(qt.kind).packable and qt.data.numel():
                qmax = qmax_for(qt.bits)
                if int(qt.data.min()) < -qmax or int(qt.data.max()) > qmax:
                    raise ArtifactError(f"artifact {source} is malformed: {e['name']!r} codes exceed int{qt.bits}")
            qdict[e["name"]] = qt
        meta = header["meta"]
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"artifact {source} is malformed: {type(e).__name__}: {e}") from None
    return qdict, meta


def _largest_remainder(weights: dict[str, int], total: int) -> dict[str, int]:
    """Integers proportional to ``weights`` summing exactly to ``total`` (deterministic)."""
    wsum = sum(weights.values())
    if wsum <= 0:
        keys = list(weights)
        return {k: (total if i == 0 else 0) for i, k in enumerate(keys)}
    exact = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    rest = total - sum(out.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - out[k]), list(weights).index(k)))[:rest]:
        out[k] += 1
    return out


def describe_artifact(blob: bytes, estimate: bool = False, source: str = "<bytes>") -> dict:
    """What an artifact holds and what was chosen: ``{version, compressor, storage, layout,
    file_bytes, outer_header_bytes, compressed_payload_bytes, raw_payload_bytes,
    components, params, num_tensors}``; ``components`` maps "header+meta", "int6 codes",
    "scales", "fp16 passthrough", "raw tensors", ... to their uncompressed bytes, ``params``
    maps formats ("int6", "fp16", ...) to element counts, ``group_bytes`` each data group's
    uncompressed bytes. Layout per_group adds ``streams``: per stream its groups, codec, raw and
    stored bytes, and its ``breakdown`` is exact: the stored bytes of each stream ("outer header"
    holds the frame's index and the crc32 too).

    With ``estimate``, adds ``breakdown``: the file's bytes split over "outer header" and
    the components, in proportion to each component compressed alone with the artifact's
    compressor; it sums exactly to ``len(blob)`` (an estimate: one stream is compressed,
    not one per component). Costs one more compression of the payload."""
    info, groups, header, header_raw = _parse_payload(blob, source)
    comps: dict[str, list[tuple[bytes, int]]] = {"header+meta": []}
    params: dict[str, int] = {}
    for e in header["tensors"]:
        d = e["data"]
        count = int(np.prod(d["shape"], dtype=np.int64))
        try:
            label = component_label(e["kind"], e["bits"], d["dtype"])  # "int6 codes", "fp16 passthrough"
            fmt = format_label(e["kind"], e["bits"], d["dtype"])
        except ValueError as err:
            raise ArtifactError(f"artifact {source} is malformed: {err}") from None
        params[fmt] = params.get(fmt, 0) + count
        for spec, lab in ((d, label), (e["scale"], "scales"), (e.get("perm"), "row permutations")):
            if spec is not None:
                stored = {**_NP_DTYPES, "uint16": "<u2"}[spec["dtype"]]  # uint16: a row permutation
                itemsize = 1 if spec.get("packed") else np.dtype(stored).itemsize
                comps.setdefault(lab, []).append(
                    (bytes(groups[spec["g"]][spec["offset"]:spec["offset"] + spec["nbytes"]]), itemsize))
    components = {k: sum(len(b) for b, _ in v) for k, v in comps.items()}
    components["header+meta"] = info["raw_payload_bytes"] - sum(components.values())
    outer = len(blob) - info["compressed_payload_bytes"]
    out = {**info, "storage": header["storage"], "layout": header["layout"], "file_bytes": len(blob),
           "outer_header_bytes": outer, "components": components, "params": params,
           "num_tensors": len(header["tensors"]),
           "group_bytes": {g["key"]: int(g["nbytes"]) for g in header.get("groups", [])}}
    if header["layout"] == PER_GROUP:
        from pgolf.compress.grouping import GroupError, describe_streams

        try:
            out["streams"], breakdown = describe_streams(_parse_outer(blob, source)[2], header, info["header_bytes"],
                                                         info["raw_payload_bytes"], outer)
        except GroupError as e:
            raise ArtifactError(f"artifact {source} is malformed: {e}") from None
        if estimate:
            out["breakdown"] = breakdown
        return out
    if estimate:
        compress = COMPRESSORS[info["compressor"]][0]
        sizes = {"header+meta": len(compress(header_raw))}
        for k, parts in comps.items():
            if k != "header+meta":
                sizes[k] = len(compress(b"".join(_planes(b, n) if header["layout"] == "grouped" else b
                                                 for b, n in parts)))
        out["breakdown"] = {"outer header": outer,
                            **_largest_remainder(sizes, info["compressed_payload_bytes"])}
    return out


def write_artifact(path: str | os.PathLike, blob: bytes, overwrite: bool = False) -> int:
    """Atomically write ``blob`` to ``path`` (pgolf.runtime.files.atomic_write); returns bytes written.
    Refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    atomic_write(path, blob)
    return len(blob)


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, QuantizedTensor], dict]:
    return unpack_artifact(Path(path).read_bytes(), source=str(path))
