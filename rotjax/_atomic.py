"""Files written whole or not at all, through a crash or a power loss.

A file is written under a temporary name beside its destination, flushed to the disk
(``fsync``), renamed over it (``os.replace``: atomic), and the directory's entry flushed
too; without the flushes a power loss after the rename can leave the new name on an empty
or partial file. Used by the checkpoint writer (`rotjax.hf.save`), the training logs and
the dataset caches.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_whole(path: str | os.PathLike[str], data: str | bytes | Callable[[BinaryIO], None]):
    """``data`` (text as UTF-8, bytes, or a function writing to a binary file) into
    ``path``, whole or not at all: an error leaves ``path`` as it was and nothing beside it.
    The new file has the permissions a plain ``open`` gives (the umask's), whoever writes
    beside it at the same time (its temporary name is its own). Through a symbolic link, the
    file it points to is replaced and the link kept (the link itself was replaced by a file),
    unless the link is in a loop or points into a missing folder: then the link is replaced."""
    path = Path(path)
    if path.is_symlink():  # (a link in a loop, or into a missing folder, is replaced)
        real = Path(os.path.realpath(path))
        path = real if real.parent.is_dir() and not real.is_symlink() else path
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync(path.parent)


def sync(path: str | os.PathLike[str]) -> None:
    """fsync ``path`` (a file, or a directory: its entries), where the system allows it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root``, deepest first, ``root`` last (links are
    not followed)."""
    for parent, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            if not os.path.islink(os.path.join(parent, name)):
                sync(Path(parent, name))
    sync(root)


def temporary_sibling(path: Path) -> Path:
    """The name a directory written whole (`rotjax.hf.save`) is built under, beside ``path``,
    before its rename onto ``path``: ``.NAME.tmp-`` and 12 hex digits (18 bytes more than
    NAME, as `write_whole`'s temporary files)."""
    return path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"


TEMPORARY_EXTRA_BYTES = len(temporary_sibling(Path("x")).name) - 1


def nearest_existing(path: Path) -> Path:
    """The deepest of ``path`` and its parents that exists (a name too long to look up counts
    as missing)."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:
            pass
    return Path(path.anchor)


def check_name_lengths(path: str | os.PathLike[str]) -> None:
    """Refuses a ``path`` that cannot be written whole, before any work: a name in it longer
    than its file system takes (``NAME_MAX``, 255 bytes on most), or a last name too long
    for its temporary sibling (`TEMPORARY_EXTRA_BYTES` more); without this, the write failed
    with ``ENAMETOOLONG`` only at the end.

    Raises:
      ValueError: naming the name, its length in bytes and the limit.
    """
    given, path = path, Path(path).absolute()
    try:  # the limit of the file system the path's existing part is on
        limit = os.pathconf(nearest_existing(path), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in path.parts[1:]:
        size = len(os.fsencode(name))
        if size > limit:
            raise ValueError(
                f"{given}: the name {name[:24]}... is {size} bytes, longer than the "
                f"file system takes ({limit})"
            )
    size = len(os.fsencode(path.name))
    if size + TEMPORARY_EXTRA_BYTES > limit:
        raise ValueError(
            f"{given}: its name is {size} bytes; it is first written under a temporary name "
            f"{TEMPORARY_EXTRA_BYTES} bytes longer, beside it, and the file system takes "
            f"{limit}: use a name of at most {limit - TEMPORARY_EXTRA_BYTES} bytes"
        )


def holds_cwd(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is the working directory or one of its parents: a directory that
    cannot be replaced as a whole (its temporary twin would go inside it, the rename onto it
    fails with EBUSY, and a process left in the deleted old directory loses its footing)."""
    return Path.cwd().resolve().is_relative_to(Path(path).absolute().resolve())
