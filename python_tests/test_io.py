"""moa_engine._io: atomic writes (temp file beside the target, fsync, rename)."""

import json
import os
import stat

import pytest

from moa_engine._io import atomic_copy, atomic_write_json, atomic_write_text


def test_write_text_replaces_whole_file_with_a_normal_mode(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second, longer ünïcode\n")
    assert path.read_text(encoding="utf-8") == "second, longer ünïcode\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"step": object()})  # not JSON-serialisable: fails before writing
    assert json.loads(path.read_text()) == {"step": 1}

    class Boom(Exception):
        pass

    class Exploding(str):
        def encode(self, *args, **kwargs):
            raise Boom()

    with pytest.raises(Boom):
        atomic_write_text(path, Exploding("x"))
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_copy(tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    dst = tmp_path / "a" / "b" / "dst.bin"
    atomic_copy(src, dst)
    assert dst.read_bytes() == payload
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dst.bin"]
