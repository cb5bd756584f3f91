"""Chats' KV states on disk, so a restarted bot does not re-read the history of every chat that returns.

The engines keep the states of recently active chats in memory (engine/chat_states.py,
engine/batched.py). A state pushed out of memory, and every state at a clean shutdown, is
written here: `<data_dir>/kv/<the GGUF's sha256>/<chat>.bin`, holding the token ids the state
covers, how far its cells were read as a prompt (the batched engine lends that part to new chats:
`_share`; files without it count as none) and llama.cpp's per-sequence state
(`llama_state_seq_get_data`). When a chat's next turn
comes and its state is in no memory, the file is read back (and removed: the state lives in
memory again), then the usual prefix reuse reads only the new tokens.

Keyed by the model file's SHA-256, a state is only ever restored into the model that wrote it;
the folders of other models are deleted when a model is loaded (a hot-swap, a rollback). Bounded
in files and bytes, the oldest going first. A file that is truncated, corrupt or written for
another model or chat is deleted with a warning and the chat is simply read again.

Writes go through one writer thread: the decode thread hands a state over and goes on decoding
(a 1000-token chat of the 135M model is ~23 MB, written and fsync-ed in tens of ms). The queue
holds no more than the bounds let onto disk, so a slow disk drops the oldest states instead of
piling them up in memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.files import atomic_write_bytes, ensure_private_dir
from engine.threads import FirstUseThread

log = logging.getLogger(__name__)

MAGIC = b"OUROKV1\n"
SUFFIX = ".bin"
_HEAD = struct.Struct("<8sI")     # magic, length of the JSON header that follows


@dataclass
class StoredState:
    """A chat's state as the engines hold it: the ids its KV cells hold, and llama.cpp's bytes of them."""

    tokens: list[int]
    blob: ctypes.Array
    size: int
    shareable: int = 0   # leading cells read as a prompt (engine/batched.py `_share`); 0 when unknown


def file_stem(key: int | str) -> str:
    """A chat key as a file name: numbers as they are, other keys (API chats, test keys) hashed."""
    if isinstance(key, int):
        return f"chat{key}"
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _file_bytes(state: StoredState) -> int:
    """About what the state's file takes (the header aside): its token ids and llama.cpp's bytes."""
    return 4 * len(state.tokens) + state.size


class KVFiles:
    """One model's folder of chat states: `put` (written by the writer thread), `take`, `forget`, `flush`."""

    def __init__(self, root: Path, model_sha256: str, *, max_files: int, max_bytes: int) -> None:
        if not model_sha256:
            raise ValueError("KV files need the model's SHA-256: a state must only go back into its own model")
        self.root = Path(root)
        self.model_sha256 = model_sha256
        self.folder = self.root / model_sha256
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.written = self.loaded = self.dropped = 0
        self.skipped = 0          # queued states dropped past the bounds, never written
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, StoredState] = OrderedDict()
        self._writing: tuple[str, StoredState] | None = None   # the file being written now
        self._writing_cancelled = False
        self._stopping = False
        ensure_private_dir(self.folder)
        self._drop_other_models()
        self._index = self._scan()            # stem → bytes, oldest first
        self._trim()
        # started by the first `put`, never on the hot-swap's niced loader: engine/threads.py
        self._thread = FirstUseThread(self._writer, f"kv-files-{model_sha256[:8]}")

    # --- what the engines call ---------------------------------------------------------------
    def put(self, key: int | str, tokens: Sequence[int] | np.ndarray, blob: ctypes.Array, size: int,
            shareable: int = 0) -> None:
        """Queue a state for writing (a newer state of the same chat replaces one not yet written)."""
        if not self.max_files or not self.max_bytes:
            return
        state = StoredState([int(t) for t in tokens], blob, size, shareable)
        stem = file_stem(key)
        with self._cond:
            if self._stopping:
                return
            self._pending[stem] = state
            self._pending.move_to_end(stem)
            # past the bounds a queued state would be deleted as soon as written: dropped now, so a
            # disk slower than the chats leaving memory never piles states up in memory
            for gone in self._past_bounds({s: _file_bytes(q) for s, q in self._pending.items()}):
                del self._pending[gone]
                self.skipped += 1
            self._thread.start_once()
            self._cond.notify_all()

    def take(self, key: int | str) -> StoredState | None:
        """The chat's state, if one was saved (queued or on disk), now removed from here; None if
        there is none or its file does not hold a valid state of this model and chat (then deleted)."""
        stem = file_stem(key)
        with self._cond:
            writing = self._writing if self._writing is not None and self._writing[0] == stem else None
            if writing is not None:              # the write is dropped: the state goes back to memory
                self._writing_cancelled = True
            queued = self._pending.pop(stem, None)
            if queued is not None or writing is not None:
                self._index.pop(stem, None)
                self._path(stem).unlink(missing_ok=True)   # an older state of this chat
                return queued if queued is not None else writing[1]
            if stem not in self._index:
                return None
            self._index.pop(stem)
            path = self._path(stem)
            try:
                state = self._read(path, stem)
            except (OSError, ValueError) as exc:
                log.warning("KV state file %s ignored and deleted: %s", path, exc)
                self.dropped += 1
                state = None
            path.unlink(missing_ok=True)
            if state is not None:
                self.loaded += 1
            return state

    def forget(self, key: int | str) -> None:
        """Delete the chat's state: queued, being written, and its files in every model's folder."""
        stem = file_stem(key)
        with self._cond:
            self._pending.pop(stem, None)
            if self._writing is not None and self._writing[0] == stem:
                self._writing_cancelled = True
            self._index.pop(stem, None)
            for path in self.root.glob(f"*/{stem}{SUFFIX}"):
                path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until every queued state is on disk."""
        with self._cond:
            while (self._pending or self._writing is not None) and self._thread.is_alive():
                self._cond.wait()

    def close(self) -> None:
        """Stop the writer; states still queued are dropped (`flush` first to keep them)."""
        with self._cond:
            self._stopping = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join_if_started()       # none starts once stopping: `put` checks first

    def files(self) -> dict[str, int]:
        """The states on disk: file stem → bytes, oldest first."""
        with self._cond:
            return dict(self._index)

    # --- the writer thread ------------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    self._cond.notify_all()
                    return
                stem, state = self._pending.popitem(last=False)
                self._writing, self._writing_cancelled = (stem, state), False
            path = self._path(stem)
            try:
                ensure_private_dir(self.folder)   # deleted by another model's load meanwhile: written again
                size = self._write(path, stem, state)
            except OSError as exc:
                log.warning("could not write the KV state file %s: %s", path, exc)
                size = None
            with self._cond:
                if self._writing_cancelled:          # forgotten or taken back while it was written
                    path.unlink(missing_ok=True)
                    self._index.pop(stem, None)
                elif size is not None:
                    self._index.pop(stem, None)
                    self._index[stem] = size
                    self.written += 1
                    self._trim()
                self._writing = None
                self._cond.notify_all()

    # --- the file format ---------------------------------------------------------------------
    def _path(self, stem: str) -> Path:
        return self.folder / f"{stem}{SUFFIX}"

    def _write(self, path: Path, stem: str, state: StoredState) -> int:
        tokens = np.asarray(state.tokens, dtype="<i4").tobytes()
        blob = memoryview(state.blob).cast("B")[: state.size]
        crc = zlib.crc32(blob, zlib.crc32(tokens))
        header = json.dumps({"model_sha256": self.model_sha256, "chat": stem, "tokens": len(state.tokens),
                             "state_bytes": state.size, "crc32": crc, "shareable": state.shareable}).encode("utf-8")
        return atomic_write_bytes(path, [_HEAD.pack(MAGIC, len(header)), header, tokens, blob], mode=0o600)

    def _read(self, path: Path, stem: str) -> StoredState:
        """Map the file (no copy: llama.cpp reads the state straight from the page cache) and check it."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < _HEAD.size:
                raise ValueError("truncated")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # private: writable, never written back
        magic, header_len = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a KV state file")
        try:
            header = json.loads(data[_HEAD.size:_HEAD.size + header_len])
            n, size, crc = int(header["tokens"]), int(header["state_bytes"]), int(header["crc32"])
            shareable = int(header.get("shareable", 0))     # files from before it was kept: 0
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable header ({exc})") from exc
        if header.get("model_sha256") != self.model_sha256 or header.get("chat") != stem:
            raise ValueError("written for another model or chat")
        start = _HEAD.size + header_len
        if n < 1 or size < 1 or len(data) != start + 4 * n + size:
            raise ValueError(f"{len(data)} bytes where the header says {start + 4 * n + size} (truncated?)")
        with memoryview(data) as view:
            if zlib.crc32(view[start:]) != crc:
                raise ValueError("checksum mismatch (corrupt)")
        tokens = np.frombuffer(data, dtype="<i4", count=n, offset=start).tolist()
        blob = (ctypes.c_uint8 * size).from_buffer(data, start + 4 * n)   # keeps the mapping alive
        return StoredState(tokens, blob, size, min(max(shareable, 0), n))

    # --- housekeeping -------------------------------------------------------------------------
    def _drop_other_models(self) -> None:
        """States of any other model can never be restored here: delete them (a generation change)."""
        for entry in self.root.iterdir():
            if entry.name != self.model_sha256 and entry.is_dir() and not entry.is_symlink():
                log.info("deleting the KV states of another model: %s", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def _scan(self) -> OrderedDict[str, int]:
        found = []
        for path in self.folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:   # a write a crash interrupted
                path.unlink(missing_ok=True)
            elif path.suffix == SUFFIX and path.is_file():
                st = path.stat()
                found.append((st.st_mtime_ns, path.stem, st.st_size))
        return OrderedDict((stem, size) for _, stem, size in sorted(found))

    def _past_bounds(self, sizes: dict[str, int]) -> list[str]:
        """What goes to keep `sizes` (stem → bytes, oldest first) within the bounds: a state larger
        than `max_bytes` alone (keeping it would push out every other one, then itself), then the
        oldest until both the count and the bytes fit. The one rule for the queue and the disk."""
        gone = [stem for stem, size in sizes.items() if size > self.max_bytes]
        kept = [(stem, size) for stem, size in sizes.items() if size <= self.max_bytes]
        total = sum(size for _, size in kept)
        for stem, size in kept:
            if len(sizes) - len(gone) <= self.max_files and total <= self.max_bytes:
                break
            gone.append(stem)
            total -= size
        return gone

    def _trim(self) -> None:
        """Delete the files past the bounds (under the lock)."""
        for stem in self._past_bounds(self._index):
            del self._index[stem]
            self._path(stem).unlink(missing_ok=True)
