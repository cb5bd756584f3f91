"""One cycle at a time, with a lock that a crashed holder cannot leave behind.

`flock` locks belong to the open file: when the process dies — even by SIGKILL — the kernel
releases it, so a stale lock file never blocks the next cycle. The holder's pid is written
into the file only to say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from core.errors import OuroError


class CycleLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> CycleLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OuroError(f"another learning cycle is running (pid {holder})",
                            hint="wait for it to finish; two cycles never run at once") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
