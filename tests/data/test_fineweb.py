"""The FineWeb downloader, exercised against a fake hub folder (never the network)."""

import json
from pathlib import Path

import numpy as np
import pytest

from pgolf.data.shards import read_shard, write_shard
from pgolf.data.fineweb import dataset_name_for_variant, download_fineweb

DS = "fineweb10B_sp1024"


@pytest.fixture
def hub(tmp_path):
    """A folder laid out like the willdepueoai/parameter-golf dataset repo."""
    root = tmp_path / "hub"
    shards = root / "datasets" / "datasets" / DS
    write_shard(shards / "fineweb_val_000000.bin", np.arange(50))
    for i in range(3):
        write_shard(shards / f"fineweb_train_{i:06d}.bin", np.full(20, i))
    toks = root / "datasets" / "tokenizers"
    toks.mkdir(parents=True)
    (toks / "fineweb_1024_bpe.model").write_bytes(b"model")
    (toks / "fineweb_1024_bpe.vocab").write_text("vocab")
    (root / "datasets" / "docs_selected.jsonl").write_text('{"text": "x"}\n')
    (root / "datasets" / "docs_selected.source_manifest.json").write_text("{}")
    manifest = {
        "datasets": [{"name": DS, "tokenizer_name": "sp_bpe_1024", "vocab_size": 1024,
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "vocab_size": 1024,
                        "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return root


def _check_layout(out):
    d = out / "datasets" / DS
    assert sorted(p.name for p in d.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert read_shard(d / "fineweb_train_000001.bin").tolist() == [1] * 20
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model"
    assert (out / "tokenizers" / "fineweb_1024_bpe.vocab").is_file()
    assert (out / "manifest.json").is_file()
    assert not list(out.rglob("*.part"))


def test_download_from_local_mirror(hub, tmp_path):
    out = tmp_path / "data"
    messages = []
    rep = download_fineweb("sp1024", 2, root=out, source_dir=hub, progress=messages.append)
    _check_layout(out)
    assert len(rep["fetched"]) == 6 and rep["skipped"] == [] and len(messages) == 6
    assert rep["dataset_dir"] == str(out / "datasets" / DS)
    assert len(rep["train_files"]) == 2 and len(rep["val_files"]) == 1
    assert rep["train_pattern"].endswith("fineweb_train_*.bin")
    assert not (out / "docs_selected.jsonl").exists()

    # Second call: everything present, nothing fetched; a damaged shard is refetched.
    rep2 = download_fineweb("sp1024", 2, root=out, source_dir=hub)
    assert rep2["fetched"] == [] and len(rep2["skipped"]) == 6
    shard = out / "datasets" / DS / "fineweb_train_000000.bin"
    damaged = shard.read_bytes()[:-2]
    shard.unlink()  # it may be a hard link to the mirror: replace it, never edit in place
    shard.write_bytes(damaged)
    rep3 = download_fineweb("sp1024", 3, root=out, source_dir=hub, with_docs=True)
    assert sorted(Path(p).name for p in rep3["fetched"]) == [
        "docs_selected.jsonl", "docs_selected.source_manifest.json",
        "fineweb_train_000000.bin", "fineweb_train_000002.bin"]
    assert read_shard(shard).size == 20


def test_download_errors(hub, tmp_path):
    with pytest.raises(ValueError, match="only 3 training shards.*requested 5"):
        download_fineweb("sp1024", 5, root=tmp_path / "d", source_dir=hub)
    assert not (tmp_path / "d" / "datasets").exists()
    with pytest.raises(ValueError, match="byte260.*sp<VOCAB_SIZE>"):
        download_fineweb("gpt2", 1, root=tmp_path / "d", source_dir=hub)
    with pytest.raises(ValueError, match="fineweb10B_sp4096 is not in the manifest.*fineweb10B_sp1024"):
        download_fineweb("sp4096", 1, root=tmp_path / "d", source_dir=hub)
    with pytest.raises(FileNotFoundError, match="mirror the hub"):
        download_fineweb("sp1024", 1, root=tmp_path / "e", source_dir=tmp_path / "nowhere")
    assert dataset_name_for_variant("byte260") == "fineweb10B_byte260"


def test_download_via_hub_api_without_network(hub, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, filename, subfolder=None, repo_type=None, **kw):
        calls.append((repo_id, subfolder, filename, repo_type))
        src = hub / subfolder / filename
        if not src.is_file():
            raise FileNotFoundError(src)
        # Mimic the HF cache: hand back a snapshot symlink pointing at a blob.
        link = tmp_path / "cache" / subfolder / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(src)
        return str(link)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = tmp_path / "data"
    rep = download_fineweb("sp1024", 2, root=out, repo_id="someone/pg")
    _check_layout(out)
    assert not any(p.is_symlink() for p in out.rglob("*"))  # real files, not cache links
    assert ("someone/pg", "datasets", "manifest.json", "dataset") in calls
    assert ("someone/pg", f"datasets/datasets/{DS}", "fineweb_val_000000.bin", "dataset") in calls
    assert len(calls) == 6 and len(rep["fetched"]) == 6

    with pytest.raises(RuntimeError, match="could not download .*source_dir"):
        download_fineweb("sp1024", 1, root=tmp_path / "x", repo_id="someone/pg", with_docs=True,
                         remote_prefix="missing")


# --- variants, their repos, and switching repos -------------------------------------------

def make_hub(root, dataset, vocab, tok_name, val_sidecars=False, text_transform=None):
    """A folder laid out like one of the dataset repos: datasets/manifest.json, shards, tokenizer."""
    shards = root / "datasets" / "datasets" / dataset
    write_shard(shards / "fineweb_val_000000.bin", np.arange(40) % vocab)
    if val_sidecars:
        write_shard(shards / "fineweb_val_bytes_000000.bin", np.ones(40, dtype=np.int64))
    write_shard(shards / "fineweb_train_000000.bin", np.arange(30) % vocab)
    (root / "datasets" / "tokenizers").mkdir(parents=True)
    (root / "datasets" / "tokenizers" / f"{tok_name}.model").write_bytes(b"model " + dataset.encode())
    tok = {"name": tok_name, "vocab_size": vocab, "model_path": f"tokenizers/{tok_name}.model"}
    if text_transform:
        tok["text_transform"] = text_transform
    manifest = {"datasets": [{"name": dataset, "tokenizer_name": tok_name, "vocab_size": vocab,
                              "stats": {"files_train": 1, "files_val": 1, "docs_val": 50_000}}],
                "tokenizers": [tok]}
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_variants_resolve_to_their_datasets_and_repos():
    from pgolf.data.fineweb import default_repo

    assert dataset_name_for_variant("sp8192") == "fineweb10B_sp8192"
    assert dataset_name_for_variant("sp8192_caseops") == "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert dataset_name_for_variant("sp16384_mine") == "fineweb10B_sp16384_mine"
    assert default_repo("sp1024") == default_repo("sp4096") == default_repo("byte260") == "willdepueoai/parameter-golf"
    assert default_repo("sp8192") == "kevclark/parameter-golf"
    assert default_repo("sp8192_caseops") == default_repo("sp8192_lossless_caps_caseops_v1_reserved") \
        == "romeerp/parameter-golf-caseops-v1"
    for bad in ("sp8192_", "spx", "sp_caseops", "gpt2"):
        with pytest.raises(ValueError, match="unknown FineWeb variant"):
            dataset_name_for_variant(bad)
    from pgolf.cli import build_parser

    for flag in ("--repo", "--repo-id"):
        assert build_parser().parse_args(["data", "fineweb", flag, "a/b"]).repo_id == "a/b"
    assert build_parser().parse_args(["data", "fineweb"]).repo_id is None  # the variant's own repo


def test_each_variant_downloads_from_its_repo_and_a_switch_refetches_the_manifest(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hubs = {"willdepueoai/parameter-golf": make_hub(tmp_path / "h1", DS, 1024, "fineweb_1024_bpe"),
            "kevclark/parameter-golf": make_hub(tmp_path / "h2", "fineweb10B_sp8192", 8192, "fineweb_8192_bpe"),
            "romeerp/parameter-golf-caseops-v1": make_hub(
                tmp_path / "h3", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", 8192,
                "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved", val_sidecars=True,
                text_transform="lossless_caps_caseops_v1")}
    calls = []

    def fake_download(repo_id, filename, subfolder=None, repo_type=None, **kw):
        calls.append((repo_id, f"{subfolder}/{filename}"))
        src = hubs[repo_id] / subfolder / filename
        if not src.is_file():
            raise FileNotFoundError(src)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    out = tmp_path / "data"
    rep = download_fineweb("sp1024", 1, root=out)
    assert {r for r, _ in calls} == {"willdepueoai/parameter-golf"} and "byte_sidecar_files" not in rep

    calls.clear()  # the local manifest is sp1024's: switching repos fetches sp8192's, not reuses it
    rep = download_fineweb("sp8192", 1, root=out)
    assert ("kevclark/parameter-golf", "datasets/manifest.json") in calls
    assert {r for r, _ in calls} == {"kevclark/parameter-golf"} and rep["vocab_size"] == 8192
    assert (out / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin").is_file()
    assert (out / "tokenizers" / "fineweb_8192_bpe.model").is_file()
    calls.clear()
    download_fineweb("sp8192", 1, root=out)
    assert calls == []  # same repo again: everything present, the manifest too

    rep = download_fineweb("sp8192_caseops", 1, root=out)
    ds = out / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert rep["caseops"] and rep["byte_sidecar_files"] == [str(ds / "fineweb_val_bytes_000000.bin")]
    assert read_shard(ds / "fineweb_val_bytes_000000.bin").tolist() == [1] * 40
    assert {r for r, _ in calls} == {"romeerp/parameter-golf-caseops-v1"}

    calls.clear()  # a repo named explicitly wins over the variant's
    with pytest.raises(ValueError, match="fineweb10B_sp1024 is not in the manifest of the Hugging Face dataset "
                                         "kevclark/parameter-golf"):
        download_fineweb("sp1024", 1, root=out, repo_id="kevclark/parameter-golf")
