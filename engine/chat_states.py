"""Per-chat KV states, so a chat that returns after others spoke does not re-read its history.

llama-cpp-python keeps one KV cache (sequence 0) and reuses its longest common prefix with
the next prompt. With several chats taking turns, each switch would otherwise throw the
returning chat's history away. Before switching, the leaving chat's sequence is copied out
with the per-sequence C API (`llama_state_seq_get_data`, a few ms) and restored later with
`llama_state_seq_set_data`; then the `Llama` object's token bookkeeping (`input_ids`,
`n_tokens`) is set to match, so `generate()` evaluates only the new tokens.

The high-level `save_state()`/`load_state()` would also work but copy the full logits
array through Python (~0.5 s for a 1000-token chat); this path restores in milliseconds.
A bounded LRU keeps the most recently active chats (`kv_cache_chats`); with `files`
(engine/kv_files.py), a state pushed out of it, and every state at a clean shutdown
(`save_all`), goes to disk, and a chat in neither is looked for there when it returns.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass

import llama_cpp
import numpy as np

from engine.kv_files import KVFiles

log = logging.getLogger(__name__)

SEQ = 0


@dataclass
class SavedState:
    tokens: np.ndarray
    blob: ctypes.Array
    size: int
    shareable: int = 0   # only the batched engine counts it (engine/batched.py `_share`)


def copy_seq_state(ctx, seq: int) -> tuple[ctypes.Array, int]:
    """A copy of sequence `seq`'s KV state in `ctx`: (buffer, bytes written; 0 when llama.cpp wrote none)."""
    size = llama_cpp.llama_state_seq_get_size(ctx, seq)
    blob = (ctypes.c_uint8 * size)()
    return blob, llama_cpp.llama_state_seq_get_data(ctx, blob, size, seq)


def evict_oldest(saved: OrderedDict, keep: int, files: KVFiles | None) -> None:
    """The least recently active states past `keep` leave memory (for the disk, when there is one)."""
    while len(saved) > keep:
        key, state = saved.popitem(last=False)
        if files is not None:
            files.put(key, state.tokens, state.blob, state.size, state.shareable)


class ChatStates:
    def __init__(self, llm: llama_cpp.Llama, *, max_chats: int, files: KVFiles | None = None) -> None:
        self.llm = llm
        self.max_chats = max_chats
        self.files = files
        self.current: int | str | None = None
        self._saved: OrderedDict[int | str, SavedState] = OrderedDict()
        self.restores = 0
        self.saves = 0

    def __len__(self) -> int:
        return len(self._saved)

    def activate(self, key: int | str) -> None:
        """Make `key`'s KV state the live one (saving the previous chat's first)."""
        if key == self.current:
            return
        if self.current is not None and (self.max_chats > 0 or self.files is not None) and self.llm.n_tokens > 0:
            self._save(self.current)
        saved = self._stored(key)
        self._saved.pop(key, None)
        self.current = key
        if saved is not None:
            self._restore(saved)
        # No saved state: whatever is live stays, and generate() keeps the common prefix
        # (at least the pinned persona) — still better than starting from nothing.

    def common_prefix(self, tokens: list[int]) -> int:
        return _shared_prefix(self.llm.input_ids[: self.llm.n_tokens], tokens)

    def held(self, key: int | str):
        """The ids `key`'s state holds: its saved state, or (live, or none saved) what is live."""
        saved = self._stored(key) if key != self.current else None
        return self.llm.input_ids[: self.llm.n_tokens] if saved is None else saved.tokens

    def cached_prefix(self, key: int | str, tokens: list[int]) -> int:
        """How many of `tokens` `key`'s state already holds, without switching to it: its saved
        state, or (live, or none saved) what is live — what `activate` then `common_prefix` would give."""
        saved = self._stored(key) if key != self.current else None
        return self.common_prefix(tokens) if saved is None else _shared_prefix(saved.tokens, tokens)

    def forget(self, key: int | str) -> None:
        """Drop `key`'s saved state; when it is the live one, it is not saved away at the next switch."""
        self._saved.pop(key, None)
        if key == self.current:
            self.current = None
        if self.files is not None:
            self.files.forget(key)

    def clear(self) -> None:
        self._saved.clear()
        self.current = None

    def save_all(self) -> int:
        """Write every chat's state to disk, the live one included (a clean shutdown); states written."""
        if self.files is None:
            return 0
        if self.current is not None and self.llm.n_tokens > 0:
            self._save(self.current, keep=len(self._saved) + 1)   # all of them stay
        for key, saved in self._saved.items():     # oldest first: the files' age follows the chats'
            self.files.put(key, saved.tokens, saved.blob, saved.size)
        self.files.flush()
        return len(self._saved)

    def _stored(self, key: int | str) -> SavedState | None:
        """`key`'s saved state: in memory, or read back from disk (into memory) when it is there."""
        saved = self._saved.get(key)
        if saved is not None or self.files is None:
            return saved
        found = self.files.take(key)
        if found is None:
            return None
        tokens = np.asarray(found.tokens, dtype=np.intc)
        if len(tokens) >= self.llm.n_ctx() or tokens.min() < 0 or tokens.max() >= self.llm.n_vocab():
            return None                    # not from a context like this one's: the chat is read again
        saved = SavedState(tokens, found.blob, found.size)
        self._saved[key] = saved
        self._evict(self.max_chats + 1)    # it leaves memory again when activated
        return saved

    def _save(self, key: int | str, keep: int | None = None) -> None:
        blob, written = copy_seq_state(self.llm.ctx, SEQ)
        if written == 0:
            return
        self._saved[key] = SavedState(self.llm.input_ids[: self.llm.n_tokens].copy(), blob, written)
        self._saved.move_to_end(key)
        self.saves += 1
        self._evict(self.max_chats if keep is None else keep)

    def _evict(self, keep: int) -> None:
        evict_oldest(self._saved, keep, self.files)

    def _restore(self, saved: SavedState) -> None:
        ctx = self.llm.ctx
        mem = llama_cpp.llama_get_memory(ctx)
        llama_cpp.llama_memory_seq_rm(mem, SEQ, -1, -1)
        if llama_cpp.llama_state_seq_set_data(ctx, saved.blob, saved.size, SEQ) == 0:
            log.warning("a saved KV state (%d tokens) could not be restored; the chat is read again", len(saved.tokens))
            self.llm.n_tokens = 0          # could not restore: start clean, generate() re-reads
            return
        n = len(saved.tokens)
        self.llm.input_ids[:n] = saved.tokens
        self.llm.n_tokens = n
        self.llm._requires_eval = True      # logits are not live; generate() replays one token if needed
        self.restores += 1


def _shared_prefix(held, tokens: list[int]) -> int:
    n = 0
    for a, b in zip(held, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n
