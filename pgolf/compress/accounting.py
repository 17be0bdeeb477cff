"""Size accounting: artifact bytes + counted code bytes against the 16,000,000-byte cap.

Every number is computed: the artifact's length on disk, and the exact length of the code in
the form a submission ships it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pgolf.compress.container import ArtifactError

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


def code_bytes_of_package(cfg=None) -> tuple[int, str]:
    """Counted code bytes: the exact length of the single-file ``train_gpt.py`` that
    `pgolf submit` ships for ``cfg`` (a Config or its dict; None: the default config), or,
    inside a running bundle, of that file. Returns (bytes, how they were counted)."""
    import pgolf
    from pgolf.train.entry import describe_code

    running = getattr(pgolf, "__bundle_file__", None)
    if running:  # the bundler is not shipped: a bundle counts itself
        data = Path(running).read_bytes()
        return len(data), describe_code(data, f"the length of this file, {Path(running).name}")
    from pgolf.train.bundle import code_bytes_for  # the bundler owns the file's form

    return code_bytes_for(cfg)


def size_report(model_bytes: int, code_bytes: int | None = None, code_description: str | None = None,
                cap: int = SIZE_CAP_BYTES, breakdown: dict[str, int] | None = None) -> SizeReport:
    """Account artifact + code bytes against ``cap``; code defaults to the default config's bundle.
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
