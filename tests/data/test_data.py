import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.data.build import iter_documents, tokenize_to_shards
from pgolf.data.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    DistributedTokenLoader,
    ShardError,
    TokenStream,
    load_validation_tokens,
    read_shard,
    resolve_shards,
    write_shard,
)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"


# --- shard format -----------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_round_trip(tmp_path, n):
    toks = np.random.default_rng(n).integers(0, 65536, size=n)
    p = write_shard(tmp_path / "a.bin", toks)
    assert p.stat().st_size == HEADER_BYTES + 2 * n
    for mmap in (False, True):
        got = read_shard(p, mmap=mmap)
        assert got.dtype == np.uint16 and np.array_equal(got, toks)


def test_header_layout(tmp_path):
    p = write_shard(tmp_path / "a.bin", [1, 2, 3])
    head = np.fromfile(p, dtype="<i4", count=256)
    assert head[:3].tolist() == [SHARD_MAGIC, 1, 3] and not head[3:].any()
    assert p.read_bytes()[HEADER_BYTES:] == b"\x01\x00\x02\x00\x03\x00"


def _corrupt(path, *, magic=None, version=None, cut=0, extra=b""):
    data = bytearray(path.read_bytes())
    if magic is not None:
        data[0:4] = np.int32(magic).tobytes()
    if version is not None:
        data[4:8] = np.int32(version).tobytes()
    data = data[: len(data) - cut] + extra
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(magic=123), "bad magic"),
        (dict(version=2), "version 2"),
        (dict(cut=1), "truncated"),
        (dict(extra=b"\0\0"), "trailing bytes"),
        (dict(cut=1020), "shorter than"),
    ],
)
def test_corrupt_shards_rejected(tmp_path, change, needle):
    p = write_shard(tmp_path / "bad.bin", np.arange(10))
    _corrupt(p, **change)
    with pytest.raises(ShardError, match=needle) as e:
        read_shard(p)
    assert "bad.bin" in str(e.value) and "pgolf data" in str(e.value)


def test_write_validation(tmp_path):
    p = write_shard(tmp_path / "a.bin", [1])
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shard(p, [2])
    write_shard(p, [2, 3], overwrite=True)
    assert read_shard(p).tolist() == [2, 3]
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "b.bin", [65536])
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "b.bin", [-1])
    with pytest.raises(ValueError, match="1-D"):
        write_shard(tmp_path / "b.bin", np.zeros((2, 2), dtype=np.int64))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.bin"]  # no temp files left


def test_resolve_shards(tmp_path):
    for name in ("x_002.bin", "x_000.bin", "x_001.bin"):
        write_shard(tmp_path / name, [0])
    assert [p.name for p in resolve_shards(tmp_path / "x_*.bin")] == ["x_000.bin", "x_001.bin", "x_002.bin"]
    with pytest.raises(FileNotFoundError, match="pgolf data fineweb"):
        resolve_shards(tmp_path / "nope_*.bin")


# --- streaming --------------------------------------------------------------

def _shards(tmp_path, sizes, start=0):
    """Shards whose tokens are consecutive integers, so the stream is 0,1,2,..."""
    tokens = np.arange(start, start + sum(sizes))
    bounds = np.cumsum([0, *sizes])
    for i in range(len(sizes)):
        write_shard(tmp_path / f"s_{i:06d}.bin", tokens[bounds[i] : bounds[i + 1]])
    return str(tmp_path / "s_*.bin"), tokens


def test_stream_wraps_around(tmp_path):
    pattern, tokens = _shards(tmp_path, [5, 3, 4])
    s = TokenStream(pattern)
    got = np.concatenate([s.take(n) for n in (2, 7, 0, 6, 13)])
    assert np.array_equal(got, np.resize(tokens, got.size))
    assert s.take(0).size == 0


def test_stream_skips_empty_and_rejects_all_empty(tmp_path):
    write_shard(tmp_path / "s_0.bin", [1, 2])
    write_shard(tmp_path / "s_1.bin", [])
    write_shard(tmp_path / "s_2.bin", [3])
    assert TokenStream(tmp_path / "s_*.bin").take(7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    write_shard(tmp_path / "e.bin", [])
    with pytest.raises(ValueError, match="empty"):
        TokenStream([tmp_path / "e.bin"]).take(1)


def test_stream_state_round_trip(tmp_path):
    pattern, _ = _shards(tmp_path, [5, 3, 4])
    a = TokenStream(pattern)
    a.take(5)  # ends exactly at a shard boundary
    for _ in range(3):
        state = a.state_dict()
        expected = a.take(9)
        b = TokenStream(pattern)
        b.load_state_dict(json.loads(json.dumps(state)))  # must survive JSON
        assert np.array_equal(b.take(9), expected)
    with pytest.raises(ValueError, match="same training shards"):
        TokenStream([tmp_path / "s_000000.bin"]).load_state_dict({"file_index": 2, "position": 0})


def test_loader_world_sizes_agree(tmp_path):
    pattern, _ = _shards(tmp_path, [300, 211, 157])
    global_tokens, seq_len, steps = 64, 8, 7
    one = DistributedTokenLoader(pattern, 0, 1)
    two = [DistributedTokenLoader(pattern, r, 2) for r in range(2)]
    for _ in range(steps):
        # world 1 with 2 accumulation steps reads the same tokens as world 2 with 1.
        xs1, ys1 = zip(*(one.next_batch(global_tokens, seq_len, 2) for _ in range(2)))
        xs2, ys2 = zip(*(ld.next_batch(global_tokens, seq_len, 1) for ld in two))
        for x, y in zip(xs1 + xs2, ys1 + ys2):
            assert x.dtype == torch.int64 and x.shape == (4, seq_len)
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
        a, b = (torch.cat([x.flatten() for x in xs]) for xs in (xs1, xs2))
        assert torch.equal(a, b)
        assert not set(xs2[0].flatten().tolist()) & set(xs2[1].flatten().tolist())  # ranks disjoint


def test_loader_spans_match_official_rule(tmp_path):
    pattern, tokens = _shards(tmp_path, [100])
    ld = DistributedTokenLoader(pattern, rank=1, world_size=2)
    x, y = ld.next_batch(16, 4, 2)  # local 4 tokens -> span 5; rank 1 gets tokens 5..9
    assert x.tolist() == [[5, 6, 7, 8]] and y.tolist() == [[6, 7, 8, 9]]
    x, _ = ld.next_batch(16, 4, 2)
    assert x.tolist() == [[15, 16, 17, 18]]


def test_loader_state_and_errors(tmp_path):
    pattern, _ = _shards(tmp_path, [50, 30])
    a = DistributedTokenLoader(pattern, 0, 1)
    for _ in range(5):
        a.next_batch(16, 8, 1)
    state = a.state_dict()
    b = DistributedTokenLoader(pattern, 0, 1)
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(a.next_batch(16, 8, 1), b.next_batch(16, 8, 1)))
    with pytest.raises(ValueError, match="train_batch_tokens=20.*world_size=1.*train_seq_len=8"):
        a.next_batch(20, 8, 1)
    with pytest.raises(ValueError, match="positive multiple"):
        a.next_batch(4, 8, 1)
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(pattern, 2, 2)


def test_validation_tokens(tmp_path):
    write_shard(tmp_path / "v_0.bin", np.arange(10))
    write_shard(tmp_path / "v_1.bin", np.arange(10, 23))
    v = load_validation_tokens(tmp_path / "v_*.bin", 5)  # 23 tokens -> 4*5 + 1 = 21
    assert v.dtype == torch.int64 and v.tolist() == list(range(21))
    assert load_validation_tokens(tmp_path / "v_*.bin", 11).numel() == 23
    assert load_validation_tokens(tmp_path / "v_*.bin", 11, dtype=torch.uint16).dtype == torch.uint16
    with pytest.raises(ValueError, match=r"has 23 tokens, fewer than train_seq_len\+1=24"):
        load_validation_tokens(tmp_path / "v_*.bin", 23)
    assert load_validation_tokens(tmp_path / "v_*.bin", 22).numel() == 23  # exactly enough
    with pytest.raises(FileNotFoundError):
        load_validation_tokens(tmp_path / "w_*.bin", 4)
    write_shard(tmp_path / "e_0.bin", [])
    with pytest.raises(ValueError, match="no tokens"):
        load_validation_tokens(tmp_path / "e_*.bin", 4)


# --- documents -> shards ------------------------------------------------------

class CharTokenizer:
    """Toy tokenizer: one token per character, offset past a BOS of 1."""

    bos_id, vocab_size = 1, 300

    def encode(self, text):
        return [ord(c) + 2 for c in text]


def test_iter_documents(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b\\n\\nc"}\n')
    assert list(iter_documents(tmp_path / "d.jsonl")) == ["a", "b\n\nc"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "2.txt").write_text("two\n\nparas")
    (d / "1.txt").write_text("one")
    assert list(iter_documents(d)) == ["one", "two\n\nparas"]


def test_tokenize_to_shards_splits_like_official(tmp_path):
    docs = ["ab", "cde", "f", "ghij", "", "k"]
    tok = CharTokenizer()
    stats = tokenize_to_shards(docs, tok, tmp_path, num_val_docs=2, shard_tokens=4)
    enc = [[1] + tok.encode(d) for d in docs]
    val, train = sum(enc[:2], []), sum(enc[2:], [])
    names = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
                     "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [read_shard(tmp_path / n).size for n in names[3:]] == [4, 3]  # split starts a new file
    got_val = np.concatenate([read_shard(p) for p in resolve_shards(tmp_path / "fineweb_val_*.bin")])
    got_train = np.concatenate([read_shard(p) for p in resolve_shards(tmp_path / "fineweb_train_*.bin")])
    assert got_val.tolist() == val and got_train.tolist() == train
    assert stats["docs_val"] == 2 and stats["docs_train"] == 4 and stats["tokens_train"] == len(train)
    assert stats["files_total"] == 5 and len(stats["paths"]) == 5

    with pytest.raises(FileExistsError, match="overwrite"):
        tokenize_to_shards(docs, tok, tmp_path, num_val_docs=2)
    tokenize_to_shards(docs, tok, tmp_path, num_val_docs=1, overwrite=True)  # stale shards removed
    assert len(list(tmp_path.glob("*.bin"))) == 2


def test_tokenize_to_shards_rejects(tmp_path):
    big = CharTokenizer()
    big.vocab_size = 70000
    with pytest.raises(ValueError, match="uint16"):
        tokenize_to_shards(["a"], big, tmp_path / "a", 0)
    small = CharTokenizer()
    small.vocab_size = 50
    with pytest.raises(ValueError, match="document 1: token id"):
        tokenize_to_shards(["\x00", "zz"], small, tmp_path / "b", 1, shard_tokens=1)
    assert not list((tmp_path / "b").glob("*.bin"))  # partial export cleaned up
    with pytest.raises(ValueError, match="num_val_docs"):
        tokenize_to_shards(["a"], CharTokenizer(), tmp_path / "c", 5)


# --- real FineWeb sample ------------------------------------------------------

needs_sample = pytest.mark.skipif(
    not SAMPLE.is_dir(), reason=f"FineWeb sample not found at {SAMPLE} (shared data dir missing)"
)


@needs_sample
def test_sample_shard_token_counts():
    assert read_shard(SAMPLE / "fineweb_train_000000.bin", mmap=True).size == 8_145_150
    assert read_shard(SAMPLE / "fineweb_val_000000.bin").size == 392_385


@needs_sample
def test_sample_val_shard_reproduced_byte_for_byte(tmp_path):
    spm = pytest.importorskip("sentencepiece")

    class SP:
        def __init__(self, path):
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
            self.bos_id, self.vocab_size = self.sp.bos_id(), self.sp.vocab_size()

        def encode(self, text):
            return self.sp.encode(text, out_type=int)

    stats = tokenize_to_shards(SAMPLE / "docs_val.jsonl", SP(SAMPLE / "fineweb_1024_bpe.model"), tmp_path, 300)
    assert stats["docs_val"] == 300 and stats["docs_train"] == 0 and stats["tokens_val"] == 392_385
    ours = (tmp_path / "fineweb_val_000000.bin").read_bytes()
    assert ours == (SAMPLE / "fineweb_val_000000.bin").read_bytes()


@needs_sample
@pytest.mark.slow
def test_sample_train_shard_reproduced_byte_for_byte(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE / "fineweb_1024_bpe.model"))
    tok = type("SP", (), {"bos_id": sp.bos_id(), "vocab_size": sp.vocab_size(),
                          "encode": staticmethod(lambda t: sp.encode(t, out_type=int))})()
    stats = tokenize_to_shards(SAMPLE / "docs_train.jsonl", tok, tmp_path, 0)
    assert stats["docs_train"] == 2800 and stats["tokens_train"] == 8_145_150
    ours = (tmp_path / "fineweb_train_000000.bin").read_bytes()
    assert ours == (SAMPLE / "fineweb_train_000000.bin").read_bytes()
