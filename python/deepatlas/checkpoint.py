"""Atomic checkpoints: written to a temporary file in the target folder, flushed to disk, then renamed over the
old one, so a crash or a full disk mid-write never leaves a corrupt checkpoint; loaded with weights_only=True."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_file(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """(descriptor, name) of a new temporary file next to ``path``, to be renamed onto it: with the permissions a
    plain ``open`` would give (0666 less the umask), not ``mkstemp``'s owner-only 0600, which ``os.replace`` keeps."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def temporary_name_pattern(name_pattern: str, suffix: str = ".tmp") -> re.Pattern:
    """Matches the names :func:`temporary_file` gives the temporaries of targets whose name matches the regular
    expression ``name_pattern``: ".", the target's name, ".", mkstemp's random part, ``suffix``."""
    return re.compile(r"\.(?:" + name_pattern + r")\.[^.]+" + re.escape(suffix))


def remove_stray_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (:func:`temporary_file`) that a writer killed mid-write (kill -9, a power cut)
    left next to ``names`` in ``folder``; returns the paths removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = temporary_name_pattern("|".join(map(re.escape, names)))
    removed = []
    for path in sorted(folder.iterdir()):
        if pattern.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync it, then ``os.replace`` it onto
    ``path`` (and fsync the folder). On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_file(path)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {_describe(error)}") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write {path}: {_describe(error)}") from error
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(error).__name__}: {error})") from error


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable"
    return error.strerror or str(error)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
