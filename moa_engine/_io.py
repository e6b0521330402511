"""Atomic file writes: the one way moa_engine writes a file that others may read.

Each write goes to a temporary file in the target's folder, is flushed to disk, then
renamed over the target (os.replace), so a reader sees the old file or the whole new one,
never a partial one, and an interrupted write leaves no temporary file behind.
"""

import json
import os
import shutil
import tempfile


def _replace_via_temp(path, fill) -> None:
    """Create a temp file beside `path`, let `fill(file)` write it, then rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically; creates the folder."""
    _replace_via_temp(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    """Write `text` (UTF-8, "\\n" line ends) to `path` atomically; creates the folder."""
    _replace_via_temp(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, payload) -> None:
    """Write `payload` as indented JSON to `path` atomically; creates the folder."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def atomic_copy(src, dst) -> None:
    """Copy the file `src` to `dst` atomically; creates the folder."""
    with open(src, "rb") as source:
        _replace_via_temp(dst, lambda f: shutil.copyfileobj(source, f))
