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
