"""One owner per sweep directory: ``sweep.lock`` holds the owner's pid and host.

A second sweep (or ``--resume``) on a directory a live process owns is refused; a lock whose process
is gone (killed) is taken over. Zombies count as gone; on Windows a lock is always taken as held.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Optional

from ..options import OptionError

log = logging.getLogger(__name__)
LOCK_NAME = "sweep.lock"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (a zombie counts as gone)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # no probe without native calls: a lock is taken as held
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _lock_owner(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half written: no owner can be shown alive


def _owner_alive(owner: dict) -> bool:
    if not owner:
        return False
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process (a shared disk): cannot be probed from here
    return owner["pid"] != os.getpid() and _pid_alive(owner["pid"])


def acquire_lock(out_dir: str) -> str:
    """Make this process the owner of ``out_dir`` (the file ``sweep.lock`` with its pid and host);
    an OptionError naming ``out_dir`` while another live process owns it. A lock whose process is
    gone (killed) is taken over. Returns the lock's path, for :func:`release_lock`."""
    path = os.path.join(out_dir, LOCK_NAME)
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner == {}:  # perhaps being written this instant: look again before calling it stale
                time.sleep(0.2)
                owner = _lock_owner(path)
            if owner is None:
                continue  # released meanwhile
            if _owner_alive(owner):
                raise OptionError("out_dir", f"{out_dir!r} is in use by process {owner['pid']} on "
                                             f"{owner['host']} (lock file {path}); wait for that sweep "
                                             f"to end or stop it (delete the lock file only if no "
                                             f"sweep runs there)") from None
            # stale: move it aside atomically; if what moved is not the stale lock we read,
            # another process took it over in between: give it back and stop
            aside = f"{path}.{os.getpid()}.stale.tmp"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if _lock_owner(aside) != owner:
                try:
                    os.link(aside, path)
                finally:
                    os.unlink(aside)
                continue
            os.unlink(aside)
            log.info("took over %s from process %s, which is gone", path, owner.get("pid", "?"))
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(me)
        return path
    raise OptionError("out_dir", f"{out_dir!r}: could not take the lock file {path}; another "
                                 f"process keeps taking it")


def release_lock(path: str) -> None:
    """Remove the lock at ``path`` if this process still owns it."""
    owner = _lock_owner(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        os.unlink(path)
