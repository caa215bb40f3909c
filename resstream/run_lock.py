"""One training process per run directory: an advisory lock on `run_dir/.lock`.

The lock is `fcntl.flock`, which the kernel releases when its holder exits in any way (`kill -9`
and crashes included), so a lock left by a dead process never blocks a resume. The file records
the holder's pid and host, so a refused second process can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger("resstream")
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class RunLockedError(RuntimeError):
    """Another process is training in this run directory."""


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock, and removes the lock file on exit."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._file: Any = None

    def __enter__(self) -> RunLock:
        while True:
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                handle.seek(0)
                holder = _holder(handle.read())
                handle.close()
                raise RunLockedError(
                    f"{self.path.parent} is in use by another training process ({holder}): wait for it to "
                    "finish or stop it, or train into another --run_dir"
                ) from err
            except OSError as err:  # some network filesystems have no flock: run unlocked, and say so
                if err.errno not in _NO_LOCKS:
                    raise
                handle.close()
                self.path.unlink(missing_ok=True)
                log.warning(f"{self.path.parent} cannot be locked ({err.strerror}): nothing stops a second run there")
                return self
            # The holder before us may have removed the file between our open and our lock: then we
            # hold a lock on a file nobody else will see, so try again on the current one.
            if self.path.exists() and os.path.samestat(os.fstat(handle.fileno()), self.path.stat()):
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is None:  # not locked (a filesystem without flock)
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then retries on a new file
        self._file.close()
        self._file = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"
