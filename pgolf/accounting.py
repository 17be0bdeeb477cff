"""Size accounting: artifact bytes + counted code bytes against the 16,000,000-byte cap.

Every number is computed: the artifact's length on disk, and the exact length of the code in
the form a submission ships it.
"""

from __future__ import annotations

import base64
import lzma
from dataclasses import dataclass, field
from pathlib import Path

from pgolf.artifact import LZMA_PRESET, ArtifactError

SIZE_CAP_BYTES = 16_000_000  # decimal, as the challenge counts

@dataclass
class SizeReport:
    model_bytes: int
    code_bytes: int
    code_description: str
    total_bytes: int
    cap: int = SIZE_CAP_BYTES
    fits: bool = True
    # optional split of model_bytes by component (e.g. describe_artifact(blob, estimate=True)
    # ["breakdown"]: outer header, header+meta, int6 codes, scales, fp16 passthrough, ...)
    breakdown: dict[str, int] | None = field(default=None)

    @property
    def overage(self) -> int:
        return max(0, self.total_bytes - self.cap)

    def lines(self) -> list[str]:
        verdict = "fits" if self.fits else f"OVER by {self.overage:,}"
        parts = [f"  {name}: {n:,}" for name, n in (self.breakdown or {}).items()]
        return [
            f"artifact model bytes: {self.model_bytes:,}",
            *parts,
            f"code bytes: {self.code_bytes:,} ({self.code_description})",
            f"total: {self.total_bytes:,} / {self.cap:,} ({verdict})",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def bundled_package_code() -> tuple[bytes, int, int]:
    """The pgolf package's sources packed the way a submission ships code: one Python line that
    decompresses and runs an lzma + base85 blob of every ``.py`` file (path-tagged, sorted).
    Returns (that line, number of files, raw source bytes)."""
    root = Path(__file__).resolve().parent
    files = sorted(root.rglob("*.py"))
    sources = b"".join(f"# {f.relative_to(root)}\n".encode() + f.read_bytes() for f in files)
    packed = base64.b85encode(lzma.compress(sources, preset=LZMA_PRESET))
    return b'import lzma,base64;exec(lzma.decompress(base64.b85decode(b"' + packed + b'")))\n', len(files), len(sources)


def code_bytes_of_package() -> tuple[int, str]:
    """Counted code bytes: the exact length of ``bundled_package_code()``.

    Until the submission bundler exists, the whole package counts, packed as it will ship."""
    line, n_files, raw = bundled_package_code()
    return len(line), (f"lzma + base85 of all {n_files} .py files of the pgolf package ({raw:,} bytes raw), "
                       "as a submission ships code; counted this way until the bundler exists")


def size_report(model_bytes: int, code_bytes: int | None = None, code_description: str | None = None,
                cap: int = SIZE_CAP_BYTES, breakdown: dict[str, int] | None = None) -> SizeReport:
    """Account artifact + code bytes against ``cap``; code defaults to the package's .py bytes.
    ``breakdown`` (component -> bytes) is printed under the model bytes by ``lines()``."""
    if code_bytes is None:
        code_bytes, desc = code_bytes_of_package()
        code_description = code_description or desc
    total = int(model_bytes) + int(code_bytes)
    return SizeReport(int(model_bytes), int(code_bytes), code_description or "given", total, cap, total <= cap,
                      dict(breakdown) if breakdown is not None else None)


def check_size(report: SizeReport) -> SizeReport:
    """Return ``report`` if it fits the cap, else raise ArtifactError naming the overage."""
    if not report.fits:
        raise ArtifactError(
            f"submission is OVER the {report.cap:,}-byte cap by {report.overage:,} bytes "
            f"(model {report.model_bytes:,} + code {report.code_bytes:,} = {report.total_bytes:,}); "
            "try fewer layers or a smaller width, lower-bit quantization, "
            "or a stronger compressor (compressor=auto, zstd, lzma or brotli)")
    return report
