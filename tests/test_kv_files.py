"""Chats' KV states on disk (engine/kv_files.py): the files themselves, without a model.

What a state holds does not matter here (llama.cpp's bytes are opaque to the files); the engine
tests in tests/test_kv_restart.py restore real states into real models.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import pytest

from core.files import atomic_write_bytes
from engine.kv_files import KVFiles, file_stem
from engine.worker import InferenceWorker
from tests.helpers.concurrency import built_on_a_niced_thread, nice_of, thread_named
from tests.helpers.fakes import FakeEngine

SHA_A = "a" * 64
SHA_B = "b" * 64


def blob(size: int, fill: int = 7) -> ctypes.Array:
    return (ctypes.c_uint8 * size)(*([fill] * size))


def files(root, sha=SHA_A, **bounds) -> KVFiles:
    return KVFiles(root, sha, max_files=bounds.get("max_files", 10), max_bytes=bounds.get("max_bytes", 1 << 20))


def test_a_state_put_comes_back_once_from_disk_in_a_new_instance(tmp_path):
    kv = files(tmp_path)
    kv.put(42, [1, 2, 3], blob(100, 9), 100, shareable=2)
    kv.put("api-chat", [5, 6], blob(50, 3), 50)
    kv.flush()
    kv.close()
    path = tmp_path / SHA_A / f"{file_stem(42)}.bin"
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    again = files(tmp_path)                         # a restart
    state = again.take(42)
    assert state.tokens == [1, 2, 3] and state.size == 100 and bytes(state.blob) == bytes([9] * 100)
    assert state.shareable == 2                     # how far its cells were read as a prompt
    assert not path.exists()                        # the state lives in memory again
    assert again.take(42) is None
    other = again.take("api-chat")
    assert other.tokens == [5, 6] and other.shareable == 0
    assert again.loaded == 2 and again.files() == {}
    again.close()


def test_a_state_taken_back_while_queued_or_being_written_leaves_no_file(tmp_path):
    kv = files(tmp_path)
    for chat in range(20):          # queued, being written or written: take() gives it back each time
        kv.put(chat, [chat + 1, 2], blob(20000, chat), 20000)
        state = kv.take(chat)
        assert state is not None and state.tokens == [chat + 1, 2] and bytes(state.blob)[:1] == bytes([chat])
    kv.flush()
    assert kv.files() == {} and not list((tmp_path / SHA_A).iterdir())
    kv.close()


def test_bounds_delete_the_oldest_files_by_count_and_by_bytes(tmp_path):
    kv = files(tmp_path, max_files=3, max_bytes=1 << 20)
    for chat in range(5):
        kv.put(chat, [chat + 1], blob(1000), 1000)
        kv.flush()
    assert list(kv.files()) == [file_stem(c) for c in (2, 3, 4)]
    assert sorted(p.stem for p in (tmp_path / SHA_A).iterdir()) == sorted(file_stem(c) for c in (2, 3, 4))
    kv.close()
    # fewer bytes allowed after a restart: the oldest go at once, then as new ones come
    small = files(tmp_path, max_files=10, max_bytes=2500)
    assert list(small.files()) == [file_stem(c) for c in (3, 4)]
    small.put(9, [1], blob(1000), 1000)
    small.flush()
    assert list(small.files()) == [file_stem(c) for c in (4, 9)]
    assert small.take(3) is None
    small.close()


def test_forget_deletes_the_chat_in_every_models_folder(tmp_path):
    a = files(tmp_path, SHA_A)
    a.put(7, [1], blob(10), 10)
    a.put(8, [1], blob(10), 10)
    a.flush()
    a.close()
    stray = tmp_path / SHA_B / f"{file_stem(7)}.bin"   # e.g. left by the old model during a hot-swap
    stray.parent.mkdir()
    stray.write_bytes(b"x")
    kv = KVFiles(tmp_path, SHA_A, max_files=10, max_bytes=1 << 20)
    kv.forget(7)
    assert not (tmp_path / SHA_A / f"{file_stem(7)}.bin").exists() and not stray.exists()
    assert kv.take(7) is None and kv.take(8) is not None
    kv.close()


def test_another_models_states_are_deleted_and_never_loaded(tmp_path):
    a = files(tmp_path, SHA_A)
    a.put(1, [1, 2], blob(10), 10)
    a.flush()
    a.close()
    b = files(tmp_path, SHA_B)                      # a generation change
    assert not (tmp_path / SHA_A).exists()
    assert b.take(1) is None
    b.close()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign model", "other chat", "garbage", "empty"])
def test_a_damaged_or_foreign_file_is_ignored_deleted_and_logged(tmp_path, caplog, damage):
    kv = files(tmp_path)
    kv.put(5, [1, 2, 3], blob(400), 400)
    kv.put(6, [1, 2, 3], blob(400), 400)
    kv.flush()
    kv.close()
    path = tmp_path / SHA_A / f"{file_stem(5)}.bin"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:-10]
    elif damage == "flipped":
        data[-50] ^= 0x10
    elif damage == "foreign model":
        data = data.replace(SHA_A.encode(), SHA_B.encode())
    elif damage == "other chat":   # a file renamed to another chat's name
        data = bytearray((tmp_path / SHA_A / f"{file_stem(6)}.bin").read_bytes())
    elif damage == "garbage":
        data = bytearray(b"\x00" * 300)
    else:
        data = bytearray()
    atomic_write_bytes(path, [bytes(data)])
    again = files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="engine.kv_files"):
        assert again.take(5) is None
    assert not path.exists() and again.dropped == 1
    assert "ignored and deleted" in caplog.text
    assert again.take(6) is not None                # the others are untouched
    again.close()


def test_a_write_a_crash_interrupted_is_cleaned_up(tmp_path):
    folder = tmp_path / SHA_A
    folder.mkdir()
    (folder / ".chat1.bin.tmp-123").write_bytes(b"half")
    kv = files(tmp_path)
    assert list(folder.iterdir()) == [] and kv.files() == {}
    kv.close()


def test_a_clean_shutdown_saves_the_states_and_a_failing_save_never_holds_it_up(caplog):
    engine = FakeEngine()
    InferenceWorker(engine).close()
    assert engine.states_saved == 1 and engine.closed

    class DiskFull(FakeEngine):
        def save_states(self) -> int:
            raise OSError("no space left on device")

    failing = DiskFull()
    with caplog.at_level(logging.WARNING, logger="engine.worker"):
        InferenceWorker(failing).close()
    assert failing.closed and "could not save the chats' KV states" in caplog.text


def test_the_writer_runs_at_its_first_callers_priority_not_the_niced_loaders(tmp_path):
    """The hot-swap opens the next model's folder on its niced loading thread; a writer thread born
    there would write at nice 19 after every swap and at the bot's own priority before the first."""
    kv = built_on_a_niced_thread(lambda: files(tmp_path))
    try:
        kv.put(1, [1, 2], blob(10), 10)
        kv.flush()
        assert file_stem(1) in kv.files()                 # written
        mine = nice_of()
        assert mine < 19 and nice_of(thread_named(f"kv-files-{SHA_A[:8]}")) == mine
    finally:
        kv.close()


def hang_first_write(kv: KVFiles) -> tuple[threading.Event, threading.Event]:
    """Make the writer's first write wait for `release`; `writing` is set once it waits."""
    release, writing = threading.Event(), threading.Event()
    write = kv._write

    def slow_write(path, stem, state):
        if not writing.is_set():
            writing.set()
            release.wait(10)
        return write(path, stem, state)

    kv._write = slow_write
    return release, writing


def test_a_slow_disk_never_queues_more_states_than_the_bounds_keep(tmp_path):
    kv = files(tmp_path, max_files=3, max_bytes=1 << 20)
    release, writing = hang_first_write(kv)
    kv.put(0, [1], blob(1000), 1000)
    assert writing.wait(10)
    for chat in range(1, 8):                            # chats leave memory faster than the disk writes
        kv.put(chat, [chat + 1], blob(1000, chat), 1000)
    assert kv.skipped == 4                              # 1–4 were dropped, never held in memory
    assert kv.take(2) is None
    assert kv.take(7).tokens == [8]                     # the newest are queued
    release.set()
    kv.flush()
    assert list(kv.files()) == [file_stem(c) for c in (0, 5, 6)]
    kv.close()
    # by bytes too: 2500 bytes hold two 1004-byte states
    small = files(tmp_path / "b", max_files=10, max_bytes=2500)
    release, writing = hang_first_write(small)
    small.put(0, [1], blob(1000), 1000)
    assert writing.wait(10)
    for chat in range(1, 5):
        small.put(chat, [1], blob(1000), 1000)
    assert small.skipped == 2 and small.take(2) is None and small.take(3) is not None
    small.put(9, [1], blob(3000), 3000)                 # one state past the bound alone: it goes, the rest stay
    assert small.skipped == 3 and small.take(9) is None and small.take(4) is not None
    release.set()
    small.close()
