"""Everything rft writes is for the service's user only: files 0600, folders 0700, whatever the umask.

Modes are set explicitly where a file or folder is made (`os.open` with a mode, then `fchmod`, since
the umask only ever removes bits and an inherited 0o000 umask would leave 0666 behind). The
restrictive umask that `rft serve`, the API and the workers set at start (`restrict_umask`) is the
second line, for what third-party code writes (Celery's broker messages and beat schedule,
transformers' `save_pretrained`). A tenant's bytes are never readable by another local user: not
through a Docker volume left 0755, nor through a sandbox that runs a grader under another uid.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
UMASK = 0o077


def restrict_umask() -> None:
    """New files of this process and its children get no group or other bits."""
    os.umask(UMASK)


def private_dir(path: Path, *, own: bool = True) -> Path:
    """`mkdir -p path` with every folder it creates set to 0700, and `path` itself too if `own`.

    `own=False` is for a folder the operator chose that may hold other things (the one an SQLite
    file named in RFT_DATABASE_URL lives in): it is created private but an existing one keeps its
    mode. Folders above `path` that exist are never changed: they are not ours.
    """
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first: it still gets our mode
            os.mkdir(folder, DIR_MODE)
        os.chmod(folder, DIR_MODE)
    if own and not missing and path.stat().st_uid != os.geteuid() and os.geteuid() != 0:
        # A folder mounted for us but owned by another user (a root-owned bind mount): we cannot
        # chmod it, and what we create inside is still private; say so rather than fail to start.
        log.warning(
            "%s is owned by uid %d, not this service's uid %d: chown it so it can be made 0700",
            path,
            path.stat().st_uid,
            os.geteuid(),
        )
    elif own:
        os.chmod(path, DIR_MODE)
    return path


def private_fd(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """`os.open` that creates `path` as 0600, and makes an existing one 0600 too."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: Path) -> IO[bytes]:
    """A new (or truncated) binary file opened for writing, readable by the service's user only."""
    return os.fdopen(private_fd(path), "wb")


def write_private(path: Path, data: bytes) -> None:
    with open_private(path) as f:
        f.write(data)


def touch_private(path: Path) -> None:
    """Create `path` empty as 0600 if it is missing (so a library that opens it later keeps the mode)."""
    os.close(private_fd(path, os.O_WRONLY | os.O_CREAT))


def make_tree_private(root: Path) -> None:
    """Set every folder under `root` (and `root`) to 0700 and every file to 0600.

    For trees third-party code wrote (a checkpoint from `save_pretrained` or `torch.save`) before
    they are moved into storage.
    """
    os.chmod(root, DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for names, mode in ((dirs, DIR_MODE), (files, FILE_MODE)):
            for name in names:
                path = os.path.join(folder, name)
                if not os.path.islink(path):  # chmod would follow a link out of the tree
                    os.chmod(path, mode)
