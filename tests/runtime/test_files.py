"""atomic_write: whole files or none, and a never-replace mode."""

import pytest

from pgolf.runtime.files import atomic_write


def test_replace_and_never_replace(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    atomic_write(path, b"one")
    atomic_write(path, "two")
    assert path.read_text() == "two"
    with pytest.raises(FileExistsError):
        atomic_write(path, b"three", replace=False)
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["a.bin"]
    atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"x"), replace=False)
    assert (tmp_path / "b.bin").read_bytes() == b"x"


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "c.bin", broken)
    assert list(tmp_path.iterdir()) == []
