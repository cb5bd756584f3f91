"""What ran at once, and at which CPU priority: llama.cpp's decode calls and named threads."""

from __future__ import annotations

import os
import threading

import llama_cpp


class DecodeWatch:
    """Wraps `llama_cpp.llama_decode` (the engines look it up on the module at each call) and
    counts the calls and the most that ran at once."""

    def __init__(self, monkeypatch) -> None:
        self.calls = self.most = 0
        self._now = 0
        self._lock = threading.Lock()
        real = llama_cpp.llama_decode

        def decode(ctx, batch):
            with self._lock:
                self._now += 1
                self.most = max(self.most, self._now)
                self.calls += 1
            try:
                return real(ctx, batch)
            finally:
                with self._lock:
                    self._now -= 1

        monkeypatch.setattr(llama_cpp, "llama_decode", decode)


def nice_of(thread: threading.Thread | None = None) -> int:
    """The nice value of `thread` (the calling thread by default): Linux keeps it per thread."""
    native = threading.get_native_id() if thread is None else thread.native_id
    return os.getpriority(os.PRIO_PROCESS, native)


def thread_named(name: str) -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == name)


def built_on_a_niced_thread(build):
    """`build()` run on a thread of its own niced to 19, as the hot-swap loads the next model
    (serving/hotswap.py `_low_priority`); what it returned."""
    made: list = []

    def run() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        made.append(build())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return made[0]
