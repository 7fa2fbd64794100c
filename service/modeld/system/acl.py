"""POSIX access ACLs for named users, written as the kernel's ``system.posix_acl_access``
extended attribute (no libacl needed): how a lease holder reaches a private backend socket.

An ACL keeps the file's mode for its owner, group and others, adds one entry per named
user, and a mask that lets those entries through. Files are reached through an
``O_PATH | O_NOFOLLOW`` descriptor: a symlink put in the place of the file is never followed.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

ACL_XATTR = "system.posix_acl_access"
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF
_ENTRY = struct.Struct("<HHI")

READ, WRITE, EXECUTE = 4, 2, 1


def encode_acl(mode: int, users: Iterable[int], perm: int) -> bytes:
    """The xattr value of an ACL: ``mode``'s owner, group and other bits, ``perm`` for each
    of ``users`` (in ascending order, as the kernel requires) and the mask over both."""
    owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    named = sorted(set(users))
    entries = [(_USER_OBJ, owner, _UNDEFINED_ID)]
    entries += [(_USER, perm, uid) for uid in named]
    entries.append((_GROUP_OBJ, group, _UNDEFINED_ID))
    if named:
        entries.append((_MASK, group | perm, _UNDEFINED_ID))
    entries.append((_OTHER, other, _UNDEFINED_ID))
    return struct.pack("<I", _VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def decode_users(value: bytes) -> dict[int, int]:
    """The named users of an ACL xattr value and their permissions."""
    entries = (_ENTRY.unpack_from(value, offset) for offset in range(4, len(value), _ENTRY.size))
    return {uid: perm for tag, perm, uid in entries if tag == _USER}


def grant_users(path: Path, users: Iterable[int], perm: int) -> None:
    """Let ``users`` (besides the file's owner) have ``perm`` on ``path``; no users removes
    the ACL. Raises OSError (EOPNOTSUPP where the file system has no ACLs)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if stat.S_ISLNK(info.st_mode):
            raise OSError(errno.ELOOP, "is a symbolic link", str(path))
        target = f"/proc/self/fd/{fd}"
        uids = set(users)
        if uids:
            os.setxattr(target, ACL_XATTR, encode_acl(info.st_mode, uids, perm))
            return
        try:
            os.removexattr(target, ACL_XATTR)
        except OSError as err:
            if err.errno != errno.ENODATA:
                raise
    finally:
        os.close(fd)
