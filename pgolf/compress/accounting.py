"""Size accounting: artifact bytes + counted code bytes against the 16,000,000-byte cap.

Every number is computed: the artifact's length on disk, and the exact length of the code in
the form a submission ships it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgolf.compress.container import ArtifactError
from pgolf.rules import SIZE_CAP_BYTES


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
    # sha256 (hex) of the artifact file as written: `pgolf submit` compares the file against it
    artifact_sha256: str | None = None

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


def size_report(model_bytes: int, code_bytes: int, code_description: str | None = None,
                cap: int = SIZE_CAP_BYTES, breakdown: dict[str, int] | None = None,
                artifact_sha256: str | None = None) -> SizeReport:
    """Account artifact + code bytes (pgolf.train.export.counted_code_bytes) against ``cap``.
    ``breakdown`` (component -> bytes) is printed under the model bytes by ``lines()``;
    ``artifact_sha256`` records the artifact file's digest for later verification."""
    total = int(model_bytes) + int(code_bytes)
    return SizeReport(int(model_bytes), int(code_bytes), code_description or "given", total, cap, total <= cap,
                      dict(breakdown) if breakdown is not None else None, artifact_sha256)


def check_size(report: SizeReport) -> SizeReport:
    """Return ``report`` if it fits the cap, else raise ArtifactError naming the overage."""
    if not report.fits:
        raise ArtifactError(
            f"submission is OVER the {report.cap:,}-byte cap by {report.overage:,} bytes "
            f"(model {report.model_bytes:,} + code {report.code_bytes:,} = {report.total_bytes:,}); "
            "try fewer layers or a smaller width, lower-bit quantization, "
            "or a stronger compressor (compressor=auto, zstd, lzma or brotli)")
    return report
