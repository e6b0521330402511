"""Atomic writes: the one way moa_engine writes a file or a folder that others may read.

Each file write goes to a temporary file in the target's folder, is flushed to disk, then
renamed over the target (os.replace), so a reader sees the old file or the whole new one,
never a partial one, and an interrupted write leaves no temporary file behind. A folder is
built under a hidden name beside its target and renamed into place (staged_folder).
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _replace_via_temp(path, fill) -> None:
    """Create a temp file beside `path`, let `fill(file)` write it, then rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        private_mode_to_default(tmp, 0o666)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_with(path, write) -> None:
    """Write `path` atomically by `write(binary_file)` (torch.save, say); creates the folder."""
    _replace_via_temp(path, write)


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


def private_mode_to_default(path, mode: int = 0o777) -> None:
    """Give `path` (made private by mkdtemp or mkstemp) the mode a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def staged_folder(target, overwrite: bool, accept_existing=None):
    """`with staged_folder(target, overwrite) as stage:` fills `stage`, a new hidden folder
    beside target (.<name>.tmp-XXXX), and renames it to `target` when the block succeeds.
    On failure the stage is removed and `target` is as it was.

    An existing target is replaced when `overwrite` (renamed aside to .<name>.old-XXXX, then
    removed). Otherwise it is a FileExistsError, unless accept_existing(target) says that it
    is as good as ours (another process finished the same folder first): ours is dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        private_mode_to_default(stage)
        yield stage
        _rename_into_place(stage, target, overwrite, accept_existing)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already after the rename


def _rename_into_place(stage: Path, target: Path, overwrite: bool, accept_existing) -> None:
    if target.exists() and overwrite:
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / target.name)
        os.rename(stage, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if not target.exists():
        try:
            os.rename(stage, target)
            return
        except OSError:
            if not target.exists():
                raise
    if accept_existing is None or not accept_existing(target):
        raise FileExistsError(f"{target}: appeared while writing (pass overwrite=True to replace it)")
