"""Writing files so that a killed process never leaves a half-written one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None], replace: bool = True) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes a given path) to a
    temporary file beside ``path``, flushed to disk, then move it to ``path``: readers see the old
    file or the complete new one, never a part. ``replace=False`` never replaces a file: if
    ``path`` exists, or appears meanwhile, FileExistsError. The temporary file never stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one writer per process and name
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: nothing is replaced
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: create the file exclusively
                with open(path, "xb") as out:
                    out.write(tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path
