"""Atomic writes: all or nothing, readable by others."""

import json
import stat

import pytest

from saelib.io import atomic_path, atomic_write_json, atomic_write_text


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "disk full")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_success_replaces_and_is_world_readable(tmp_path):
    dest = atomic_write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert json.loads(dest.read_text()) == {"a": 1}
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    atomic_write_text(dest, "second")
    assert dest.read_text() == "second"
    assert [p.name for p in dest.parent.iterdir()] == ["x.json"]


def test_atomic_folder_replaces_whole_folders_world_readable(tmp_path):
    import stat

    import pytest

    from saelib.io import atomic_folder

    dest = tmp_path / "sae"
    with atomic_folder(dest) as tmp:
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755 and stat.S_IMODE((dest / "a.txt").stat().st_mode) == 0o644
    with atomic_folder(dest) as tmp:  # a new version replaces the old one whole: no stale file stays
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as tmp:
            (tmp / "c.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary or old folder left
