"""Run files (checkpoints, metrics, results) written so that a kill or a planted link cannot harm them.

Each file is written into a fresh temporary file beside it (created exclusively, never through a
symbolic link), then renamed over its name: a kill leaves the old or the new file, never half of
one, and at most a ``*.tmp`` that :func:`remove_leftovers` removes on resume. A sweep worker writes
for its parent only (:func:`write_only_while_parent_lives`).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Callable, List, Optional

from .options import one_line

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the platform has none (Windows)


class RunFileError(ValueError):
    """A run file (checkpoint, metrics, results) that cannot be used; the message names it."""


# A sweep worker writes for its parent only: it sets the parent's pid here when it starts, and every
# write below first checks that parent is still alive (a worker orphaned by a kill writes nothing).
_WRITES_FOR_PARENT: Optional[int] = None


def write_only_while_parent_lives(parent_pid: Optional[int]) -> None:
    """In a worker process: exit (``os._exit``) instead of writing once ``parent_pid`` is gone."""
    global _WRITES_FOR_PARENT
    _WRITES_FOR_PARENT = parent_pid


def _check_parent() -> None:
    if _WRITES_FOR_PARENT is not None and os.getppid() != _WRITES_FOR_PARENT:
        os._exit(1)  # orphaned: the parent was killed; a resume may own these files now


def write_atomic(path: str, write: Callable) -> None:
    """Call ``write(binary file)`` on a fresh temporary file beside ``path`` (created exclusively,
    never through a symbolic link), then rename it over ``path`` (a link there is replaced, not
    followed). A kill leaves ``path`` old or new, never half written, and at most a ``*.tmp``."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f"{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _check_parent()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        _check_parent()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON, written as :func:`write_atomic` writes."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def append_line(path: str, line: str) -> None:
    """Append one line, refusing to write through a symbolic link."""
    _check_parent()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as err:
        raise RunFileError(f"{path}: cannot append to it ({one_line(err)}); a symbolic link is "
                           f"never written through") from None
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")


def remove_leftovers(directory: str) -> List[str]:
    """Remove the ``*.tmp`` files a killed writer left in ``directory`` (links themselves, never
    their targets); returns their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            if entry.name.endswith(".tmp") and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed
