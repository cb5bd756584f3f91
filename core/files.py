"""Small file helpers every floor needs: atomic writes, SHA-256, private folders, one clock.

They live on the ground floor so that no module has to import upwards for a helper.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path


def now(timespec: str = "milliseconds") -> str:
    """The one clock: UTC, ISO 8601 (the store keeps milliseconds, the ledger seconds)."""
    return datetime.now(UTC).isoformat(timespec=timespec)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write to a hidden temporary beside `path`, fsync, then rename over it: readers see old or new.

    `mode` (e.g. 0o600): the file's permissions, set before a byte of it is written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, parts: Iterable[bytes | memoryview], *, mode: int | None = None) -> int:
    """The same for binary data given in pieces (no copy joins them); bytes written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = 0
    try:
        with open(tmp, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            for part in parts:
                written += f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) readable by its owner only; parents that existed are left as they are."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for folder in {path, *created}:
        try:
            os.chmod(folder, 0o700)
        except OSError:  # pragma: no cover - e.g. a folder owned by someone else; leave it as it is
            pass
