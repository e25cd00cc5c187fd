"""Files another local user cannot have planted: the job's keys (``--secure``) and its checkpoints.

A file is trusted when this process's user (or root) owns it and every directory it is reached through keeps other
users out: owned by this user or root and writable by nobody else -- or, like ``/tmp``, sticky (then nobody else
may rename or remove an entry this user or root owns) -- or on a read-only mount (a Kubernetes Secret). Files are
opened without following a final symbolic link, and checked on the descriptor opened (no window between the check
and the use).
"""
from __future__ import annotations

import os
import stat


class UntrustedFile(OSError):
    """A file or directory another user could have written or swapped; the message says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.strerror = reason


def _trusted_owner(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def check_directory(directory: str | os.PathLike[str]) -> None:
    """UntrustedFile unless no other user can add, replace or remove entries of ``directory`` (see the module)."""
    path = os.fspath(directory)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedFile(f"{path} is not a directory")
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return
    if not _trusted_owner(info.st_uid):
        raise UntrustedFile(f"{path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise UntrustedFile(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})")


def check_entry(path: str | os.PathLike[str]) -> os.stat_result:
    """The ``lstat`` of ``path`` once its directory is trusted and the entry itself (a file, or a link: it is not
    followed) belongs to this user or root; UntrustedFile otherwise."""
    text = os.fspath(path)
    check_directory(os.path.dirname(os.path.abspath(text)) or ".")
    info = os.lstat(text)
    if not _trusted_owner(info.st_uid):
        raise UntrustedFile(f"{text} belongs to another user (uid {info.st_uid})")
    return info


def open_trusted(path: str | os.PathLike[str], private: bool = False) -> int:
    """A descriptor of the regular file ``path`` for reading, checked as the module says (``private``: also no
    access for other users, group read allowed). A symbolic link is followed only where it and its target's
    directory are trusted too (a Kubernetes Secret's files are links). UntrustedFile says why a file is refused."""
    text = os.fspath(path)
    info = check_entry(text)
    flags = os.O_RDONLY | os.O_CLOEXEC
    if stat.S_ISLNK(info.st_mode):
        check_directory(os.path.dirname(os.path.realpath(text)))
    else:
        flags |= os.O_NOFOLLOW
    fd = os.open(text, flags)
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise UntrustedFile(f"{text} is not a regular file")
        if not _trusted_owner(opened.st_uid):
            raise UntrustedFile(f"{text} belongs to another user (uid {opened.st_uid})")
        if private and opened.st_mode & (stat.S_IRWXO | stat.S_IWGRP):
            raise UntrustedFile(f"{text} is open to other users (mode {stat.S_IMODE(opened.st_mode):o}): chmod 600 it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_trusted(path: str | os.PathLike[str], private: bool = False, limit: int = 1 << 26) -> bytes:
    """The bytes of ``path`` opened by :func:`open_trusted` (at most ``limit``: a larger file is refused)."""
    fd = open_trusted(path, private)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UntrustedFile(f"{os.fspath(path)} is larger than {limit} bytes")
    return data
