"""The pgolf artifact: a safe, checksummed container for a quantized model, and
exact size accounting against the 16,000,000-byte cap.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"PGOLFART"
    8       2     format version (u16), currently 1
    10      1     n = length of the compressor name (u8)
    11      n     compressor name, ASCII ("zlib", "zstd", "lzma")
    11+n    8     L = length of the compressed payload (u64)
    19+n    32    sha256 of the compressed payload
    51+n    L     compressed payload; nothing may follow it

The payload, once decompressed, is::

    8 bytes       H = length of the JSON header (u64)
    H bytes       JSON header, UTF-8
    rest          raw tensor bytes, little-endian, concatenated

The JSON header is ``{"format": "pgolf-artifact", "tensors": [...], "meta": {...}}``;
each tensor entry holds ``name, kind, dtype, shape, offset, nbytes, orig_dtype`` and
``scale`` (null, or ``{dtype, shape, offset, nbytes}``); offsets are relative to the
start of the raw bytes. bfloat16 is stored as its 16-bit pattern. ``meta`` is free-form
JSON (config, run id, ...). Loading never unpickles or executes anything; the checksum
is verified before decompression, so a corrupt or truncated file is reported clearly.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .quant import QuantizedTensor, dtype_name

__all__ = [
    "MAGIC", "FORMAT_VERSION", "SIZE_CAP_BYTES", "COMPRESSORS", "ArtifactError",
    "pack_artifact", "unpack_artifact", "write_artifact", "read_artifact",
    "SizeReport", "code_bytes_of_package", "size_report", "check_size",
]

MAGIC = b"PGOLFART"
FORMAT_VERSION = 1
SIZE_CAP_BYTES = 16_000_000
_U16, _U64 = struct.Struct("<H"), struct.Struct("<Q")
_SHA_LEN = 32


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


_LZMA_PRESET = 9 | lzma.PRESET_EXTREME

# name -> (compress, decompress)
COMPRESSORS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "zlib": (lambda b: zlib.compress(b, level=9), zlib.decompress),
    "zstd": (lambda b: zstd_module().ZstdCompressor(level=22).compress(b),
             lambda b: zstd_module().ZstdDecompressor().decompress(b)),
    "lzma": (lambda b: lzma.compress(b, preset=_LZMA_PRESET), lzma.decompress),
}


def _compressor(name: str):
    if name not in COMPRESSORS:
        raise ArtifactError(f"unknown compressor {name!r}; known: {', '.join(sorted(COMPRESSORS))}")
    return COMPRESSORS[name]


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
    if count * np_dtype.itemsize != nbytes or off < 0 or off + nbytes > len(raw):
        raise ArtifactError(f"artifact tensor {spec.get('name', '?')!r} has an inconsistent byte range")
    arr = np.frombuffer(raw, dtype=np_dtype, count=count, offset=off).astype(np_dtype.newbyteorder("="))
    t = torch.from_numpy(arr.reshape(shape))
    return t.view(torch.bfloat16) if name == "bfloat16" else t


# ---------------------------------------------------------------- pack / unpack

def pack_artifact(qdict: dict[str, QuantizedTensor], meta: dict | None = None, compressor: str = "zlib") -> bytes:
    """Serialise a quantized state dict plus JSON ``meta`` into artifact bytes."""
    compress, _ = _compressor(compressor)
    entries, chunks, offset = [], [], 0

    def add(t: torch.Tensor) -> dict:
        nonlocal offset
        dtype, data = _tensor_bytes(t)
        spec = {"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
        return spec

    for name, qt in qdict.items():
        entry = {"name": name, "kind": qt.kind, "orig_dtype": qt.orig_dtype, **add(qt.data)}
        entry["scale"] = add(qt.scale) if qt.scale is not None else None
        entries.append(entry)
    try:
        header = json.dumps({"format": "pgolf-artifact", "tensors": entries, "meta": meta or {}},
                            sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"artifact meta must be plain JSON data: {e}") from None
    payload = compress(_U64.pack(len(header)) + header + b"".join(chunks))
    name = compressor.encode("ascii")
    return b"".join([MAGIC, _U16.pack(FORMAT_VERSION), bytes([len(name)]), name,
                     _U64.pack(len(payload)), hashlib.sha256(payload).digest(), payload])


def unpack_artifact(blob: bytes, source: str = "<bytes>") -> tuple[dict[str, QuantizedTensor], dict]:
    """Parse artifact bytes (``source`` names them in errors) -> ``(qdict, meta)``."""
    view = memoryview(blob)
    if bytes(view[:len(MAGIC)]) != MAGIC:
        raise ArtifactError(f"{source} is not a pgolf artifact (bad magic bytes)")
    pos = len(MAGIC)
    if len(view) < pos + _U16.size + 1:
        raise ArtifactError(f"artifact {source} is truncated (header incomplete)")
    (version,) = _U16.unpack_from(view, pos)
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact {source} has unsupported format version {version} "
                            f"(this pgolf reads version {FORMAT_VERSION})")
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
                            "re-export it from the run's checkpoint")
    _, decompress = _compressor(comp_name)
    try:
        raw = memoryview(decompress(bytes(payload)))
        (hlen,) = _U64.unpack_from(raw, 0)
        header = json.loads(bytes(raw[_U64.size:_U64.size + hlen]).decode())
        data = raw[_U64.size + hlen:]
        qdict = {}
        for e in header["tensors"]:
            scale = _tensor_from(data, e["scale"]) if e["scale"] is not None else None
            qdict[e["name"]] = QuantizedTensor(e["kind"], _tensor_from(data, e), scale, e["orig_dtype"])
        meta = header["meta"]
    except ArtifactError:
        raise
    except Exception as e:  # checksum passed, so this is a writer bug or foreign file
        raise ArtifactError(f"artifact {source} is malformed: {type(e).__name__}: {e}") from None
    return qdict, meta


def write_artifact(path: str | os.PathLike, blob: bytes, overwrite: bool = False) -> int:
    """Atomically write ``blob`` to ``path`` (temp file + os.replace); returns bytes written.
    Refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(blob)


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, QuantizedTensor], dict]:
    return unpack_artifact(Path(path).read_bytes(), source=str(path))


# ---------------------------------------------------------------- size accounting

@dataclass
class SizeReport:
    model_bytes: int
    code_bytes: int
    code_description: str
    total_bytes: int
    cap: int = SIZE_CAP_BYTES
    fits: bool = True

    @property
    def overage(self) -> int:
        return max(0, self.total_bytes - self.cap)

    def lines(self) -> list[str]:
        verdict = "fits" if self.fits else f"OVER by {self.overage:,}"
        return [
            f"artifact model bytes: {self.model_bytes:,}",
            f"code bytes: {self.code_bytes:,} ({self.code_description})",
            f"total: {self.total_bytes:,} / {self.cap:,} ({verdict})",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def code_bytes_of_package() -> tuple[int, str]:
    """Exact byte count of every ``.py`` file of the installed pgolf package.

    Until a submission bundler exists, this is what pgolf counts as code bytes."""
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    total = sum(len(f.read_bytes()) for f in files)
    return total, (f"all {len(files)} .py files of the pgolf package at {root}; "
                   "counted until a submission bundler exists")


def size_report(model_bytes: int, code_bytes: int | None = None, code_description: str | None = None,
                cap: int = SIZE_CAP_BYTES) -> SizeReport:
    """Account artifact + code bytes against ``cap``; code defaults to the package's .py bytes."""
    if code_bytes is None:
        code_bytes, desc = code_bytes_of_package()
        code_description = code_description or desc
    total = int(model_bytes) + int(code_bytes)
    return SizeReport(int(model_bytes), int(code_bytes), code_description or "given", total, cap, total <= cap)


def check_size(report: SizeReport) -> SizeReport:
    """Return ``report`` if it fits the cap, else raise ArtifactError naming the overage."""
    if not report.fits:
        raise ArtifactError(
            f"submission is OVER the {report.cap:,}-byte cap by {report.overage:,} bytes "
            f"(model {report.model_bytes:,} + code {report.code_bytes:,} = {report.total_bytes:,}); "
            "try fewer layers or a smaller width, lower-bit quantization, "
            "or a stronger compressor (compressor=zstd or lzma)")
    return report
