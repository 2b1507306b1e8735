"""qtune.atomic: an output appears whole, or the previous state stays; nothing half-written is left beside it."""

import os

import pytest

from qtune import atomic


def test_a_failed_block_leaves_the_old_folder_and_no_scratch(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.staged_folder(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (out / "old.txt").read_text() == "old"


def test_replace_swaps_in_the_complete_folder_with_a_plain_mkdirs_permissions(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic.staged_folder(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and os.listdir(out) == ["new.txt"]
    assert out.stat().st_mode & 0o777 == atomic.default_mode(directory=True)


def test_a_full_disk_on_sync_leaves_neither_file_nor_scratch(tmp_path, monkeypatch):
    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "fsync_file", full)
    with pytest.raises(OSError, match="No space left"), atomic.staged_file(tmp_path / "x.gguf") as tmp:
        tmp.write_bytes(b"data")
    assert list(tmp_path.iterdir()) == []


def test_write_text_replaces_whole(tmp_path):
    path = tmp_path / "run.json"
    atomic.write_text(path, "one")
    atomic.write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
