"""`pgolf data fineweb`: fetch the challenge's pre-tokenized FineWeb export.

Follows the official ``data/cached_challenge_fineweb.py``: the Hugging Face dataset
repo holds everything under a remote prefix (``datasets/``), with a ``manifest.json``
that lists each exported dataset (``fineweb10B_<variant>``, with its shard counts) and
the tokenizer artifacts it was made with. We fetch the manifest, every validation
shard, the first N training shards and the tokenizer files, laid out locally as::

    <root>/manifest.json
    <root>/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
    <root>/tokenizers/<tokenizer files>

Files already present are skipped, so re-running with a larger N only fetches the
new shards. Every file lands via a temporary name + ``os.replace``, so an interrupted
download never leaves a partial file under its final name. The manifest is fetched again when
it came from another repository (``manifest.json.source`` says which), so switching repos never
reads the previous repo's manifest.

The exports live in different dataset repos: sp1024 (and the other official variants) in
willdepueoai/parameter-golf, sp8192 in kevclark/parameter-golf, the CaseOps sp8192 export
(``sp8192_caseops``, with a byte sidecar beside each validation shard) in
romeerp/parameter-golf-caseops-v1; ``repo_id`` names another.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pgolf.data.shards import ShardError, read_shard_header
from pgolf.runtime.files import atomic_write

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_PREFIX = "datasets"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
VARIANT_ALIASES = {"sp8192_caseops": CASEOPS_VARIANT}
VARIANT_REPOS = {"sp8192": "kevclark/parameter-golf", CASEOPS_VARIANT: "romeerp/parameter-golf-caseops-v1"}


def dataset_name_for_variant(variant: str) -> str:
    """``sp1024`` -> ``fineweb10B_sp1024``; ``byte260`` -> ``fineweb10B_byte260``; ``sp<N>_<name>``
    -> ``fineweb10B_sp<N>_<name>``; ``sp8192_caseops`` -> the CaseOps export's dataset."""
    variant = VARIANT_ALIASES.get(variant, variant)
    vocab, _, name = variant.partition("_")
    if variant == "byte260" or (vocab.startswith("sp") and vocab[2:].isdigit() and (name or not _)):
        return f"fineweb10B_{variant}"
    raise ValueError(
        f"unknown FineWeb variant {variant!r}; expected 'byte260', 'sp<VOCAB_SIZE>' (for example sp1024, "
        f"sp8192), 'sp<VOCAB_SIZE>_<name>' or one of {', '.join(VARIANT_ALIASES)}"
    )


def default_repo(variant: str) -> str:
    """The Hugging Face dataset repo that publishes a variant's export."""
    return VARIANT_REPOS.get(VARIANT_ALIASES.get(variant, variant), DEFAULT_REPO_ID)


def _local_path(remote: str, root: Path, remote_prefix: str) -> Path:
    # Drop the remote prefix, then map datasets/ and tokenizers/ under root; anything
    # else (manifest.json, docs) sits directly in root, as in the official layout.
    parts = PurePosixPath(remote).parts
    if remote_prefix and parts[:1] == (remote_prefix,):
        parts = parts[1:]
    return root.joinpath(*parts)


def _is_complete(path: Path) -> bool:
    """Existing files count as done; shards are also checked so a damaged one is refetched."""
    if not path.is_file():
        return False
    if path.suffix != ".bin":
        return True
    try:
        read_shard_header(path)
        return True
    except ShardError:
        return False


def _place(source: Path, destination: Path) -> None:
    """Hard-link (or copy) ``source`` to ``destination`` through a temporary name."""
    def link_or_copy(tmp: Path) -> None:
        try:
            os.link(source, tmp)  # free when the HF cache is on the same filesystem
        except OSError:
            shutil.copy2(source, tmp)

    atomic_write(destination, link_or_copy)


def _hub_fetcher(repo_id: str) -> Callable[[str], Path]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("downloading FineWeb needs huggingface_hub: pip install huggingface_hub") from e

    def fetch(remote: str) -> Path:
        p = PurePosixPath(remote)
        subfolder = None if str(p.parent) == "." else str(p.parent)
        try:
            cached = hf_hub_download(repo_id=repo_id, filename=p.name, subfolder=subfolder, repo_type="dataset")
        except Exception as e:
            raise RuntimeError(
                f"could not download {remote} from the Hugging Face dataset {repo_id} ({e}); "
                f"check your connection, or pass --from-dir DIR (source_dir=...) to copy from a local mirror"
            ) from e
        # The HF cache hands out snapshot symlinks; link the real blob, never the symlink.
        return Path(cached).resolve(strict=True)

    return fetch


def _local_fetcher(source_dir: Path) -> Callable[[str], Path]:
    def fetch(remote: str) -> Path:
        path = source_dir.joinpath(*PurePosixPath(remote).parts)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; source_dir must mirror the hub repo layout "
                f"(e.g. <source_dir>/datasets/manifest.json)"
            )
        return path.resolve()

    return fetch


def download_fineweb(
    variant: str = "sp1024",
    train_shards: int = 80,
    root: str | os.PathLike = "data",
    repo_id: str | None = None,
    remote_prefix: str = DEFAULT_REMOTE_PREFIX,
    with_docs: bool = False,
    source_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Fetch the ``variant`` export: manifest, all val shards (and their byte sidecars for a
    CaseOps export), ``train_shards`` train shards, tokenizer artifacts (and the raw docs when
    ``with_docs``), from ``repo_id`` (default: the variant's repo, default_repo).

    With ``source_dir`` files are copied from a local folder laid out like the hub repo
    (offline mirror); otherwise they come from ``huggingface_hub.hf_hub_download``.
    Returns a report: ``fetched`` / ``skipped`` paths, ``dataset_dir``, ``train_files``,
    ``val_files``, ``tokenizer_files``, ``train_pattern``, ``val_pattern``, ``manifest``.
    """
    dataset_name = dataset_name_for_variant(variant)
    repo_id = repo_id or default_repo(variant)
    if train_shards < 0:
        raise ValueError(f"train_shards must be >= 0, got {train_shards}")
    root = Path(root)
    where = str(source_dir) if source_dir is not None else f"the Hugging Face dataset {repo_id}"
    fetch = _local_fetcher(Path(source_dir)) if source_dir is not None else _hub_fetcher(repo_id)
    report: dict = {"fetched": [], "skipped": []}
    say = progress or (lambda _msg: None)

    def get(remote: str, again: bool = False) -> Path:
        dest = _local_path(remote, root, remote_prefix)
        if _is_complete(dest) and not again:
            report["skipped"].append(str(dest))
            say(f"skip  {dest} (already present)")
        else:
            say(f"fetch {remote} -> {dest}")
            _place(fetch(remote), dest)
            report["fetched"].append(str(dest))
        return dest

    pre = f"{remote_prefix}/" if remote_prefix else ""
    origin = root / "manifest.json.source"  # which repo (or mirror) the local manifest came from
    stale = not (origin.is_file() and origin.read_text(encoding="utf-8") == where)
    manifest_path = get(f"{pre}manifest.json", again=stale)
    atomic_write(origin, where.encode("utf-8"))
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); delete it and run again") from None

    datasets = manifest.get("datasets", [])
    entry = next((d for d in datasets if d.get("name") == dataset_name), None)
    if entry is None:
        known = ", ".join(sorted(str(d.get("name")) for d in datasets)) or "none"
        raise ValueError(f"{dataset_name} is not in the manifest of {where}; available: {known}")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise ValueError(
            f"{variant} has only {n_train} training shards on {where}, requested {train_shards}; "
            f"ask for at most {n_train}"
        )
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if tok is None:
        raise ValueError(f"tokenizer {tok_name!r} (for {dataset_name}) is not in the manifest of {where}")
    artifacts = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not artifacts:
        raise ValueError(f"tokenizer {tok_name!r} in the manifest lists no files to download")

    if with_docs:
        report["docs_files"] = [str(get(f"{pre}{name}")) for name in DOCS_FILES]
    shard_prefix = f"{pre}datasets/{dataset_name}"
    report["val_files"] = [str(get(f"{shard_prefix}/fineweb_val_{i:06d}.bin")) for i in range(n_val)]
    transform = str(tok.get("text_transform") or "identity")
    if "caseops" in dataset_name or transform != "identity":  # scored from per-token original bytes
        report["byte_sidecar_files"] = [str(get(f"{shard_prefix}/fineweb_val_bytes_{i:06d}.bin"))
                                        for i in range(n_val)]
    report["train_files"] = [str(get(f"{shard_prefix}/fineweb_train_{i:06d}.bin")) for i in range(train_shards)]
    report["tokenizer_files"] = [str(get(f"{pre}{a}")) for a in artifacts]

    dataset_dir = _local_path(shard_prefix, root, remote_prefix)
    report.update(
        variant=variant,
        source=where,
        caseops="byte_sidecar_files" in report,
        manifest=str(manifest_path),
        dataset_dir=str(dataset_dir),
        train_pattern=str(dataset_dir / "fineweb_train_*.bin"),
        val_pattern=str(dataset_dir / "fineweb_val_*.bin"),
        vocab_size=tok.get("vocab_size", entry.get("vocab_size")),
    )
    return report
