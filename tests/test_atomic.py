"""The one atomic-write helper: complete files or the old ones, the user's mode, no temporaries left."""

from __future__ import annotations

import os

import pytest

from worldmodel.atomic import atomic_file, default_file_mode, durable_rename, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_written_files_get_the_users_mode_and_the_suffix_the_writer_needs(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "sub" / "clip.mp4", suffix=".tmp.mp4") as tmp:
            assert (
                tmp.name.startswith(".clip.mp4.")
                and tmp.name.endswith(".tmp.mp4")
                and tmp.parent == tmp_path / "sub"
            )
            tmp.write_bytes(b"x")
        assert (tmp_path / "sub" / "clip.mp4").stat().st_mode & 0o777 == 0o640 == default_file_mode()
    finally:
        os.umask(old)
    write_json(tmp_path / "d.json", {"a": 1})
    durable_rename(tmp_path / "d.json", tmp_path / "e.json")
    assert (tmp_path / "e.json").read_text() == '{\n  "a": 1\n}' and not (tmp_path / "d.json").exists()
