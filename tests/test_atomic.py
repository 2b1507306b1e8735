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


def test_what_a_library_writes_private_gets_the_umasks_mode(tmp_path):
    """safetensors' save_file writes 0600: an adapter or export only its writer could read (issue 18)."""
    import torch
    from safetensors.torch import save_file

    with atomic.staged_folder(tmp_path / "adapter") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.json").write_text("{}")
        (tmp / "sub" / "x.json").chmod(0o600)
    with atomic.staged_file(tmp_path / "model.gguf") as tmp:
        tmp.unlink()  # a writer that creates its own file, private
        save_file({"a": torch.zeros(2)}, str(tmp))
    files = [
        tmp_path / "adapter" / "adapter_model.safetensors",
        tmp_path / "adapter/sub/x.json",
        tmp_path / "model.gguf",
    ]
    assert all(p.stat().st_mode & 0o777 == atomic.default_mode(directory=False) for p in files)
    assert (tmp_path / "adapter" / "sub").stat().st_mode & 0o777 == atomic.default_mode(directory=True)


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


def _killed_mid_write(out, replace=False):
    """A real process killed (SIGKILL) inside `staged_folder(out)`, as a kill during an adapter's save would be."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal\nfrom pathlib import Path\nfrom qtune import atomic\n"
        f"with atomic.staged_folder(Path({str(out)!r}), replace={replace}) as tmp:\n"
        "    (tmp / 'adapter_model.safetensors').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL


def test_what_a_killed_write_leaves_is_removed_by_remove_leftovers(tmp_path):
    out = tmp_path / "adapter"
    _killed_mid_write(out)
    assert [p.name.startswith(".adapter.partial-") for p in tmp_path.iterdir()] == [True]
    (tmp_path / "other").mkdir()  # not this output's: kept
    assert [line.startswith("removed ") for line in atomic.remove_leftovers(out)] == [True]
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_a_previous_version_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    out = tmp_path / "adapter"
    aside = tmp_path / f".adapter.old-{os.getpid() + 1}"  # killed between the two renames of replace_folder
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    assert atomic.remove_leftovers(out) == [f"put {aside} back as {out}"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (out / "old.txt").read_text() == "old"


def test_replacing_through_a_link_writes_the_folder_it_points_to_and_leaves_nothing_beside(tmp_path):
    real = tmp_path / "disk" / "adapter"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "adapter"
    link.symlink_to(real)
    with atomic.staged_folder(link, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and os.listdir(real) == ["new.txt"]
    assert os.listdir(tmp_path / "out") == ["adapter"] and os.listdir(real.parent) == ["adapter"]


def test_replace_folder_over_a_link_replaces_the_link_only(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (link := tmp_path / "dest").symlink_to(target)
    (src := tmp_path / "src").mkdir()
    atomic.replace_folder(src, link)
    assert sorted(os.listdir(tmp_path)) == ["dest", "target"] and not link.is_symlink()
    assert (target / "keep.txt").read_text() == "keep"
