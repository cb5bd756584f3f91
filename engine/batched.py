"""Parallel decoding: the replies under way are decoded together, one llama_batch per step.

One llama.cpp context holds `slots` sequences (`n_seq_max`), each with its own KV stream
(`kv_unified = False`, `n_ctx` tokens per sequence), so a chat's cells sit at the same places
as when it is decoded alone and its greedy text is the same token for token (tests hold it).
A decode thread owns the context: each step it admits waiting requests into free slots (in
arrival order), decodes the token each generating sequence sampled last — all of them in one
llama_batch — and reads waiting prompts in pieces (each in a decode of its own: `_plan` says
why), then samples each sequence that asked for logits with that request's own sampler chain
(the chain `Llama.generate` builds, so sampled replies match the single-chat engine for the same
seed). A finished or failed request leaves its slot; new ones join between steps.

Per-chat KV reuse: a chat stays in the slot it last used, so its next turn reads only the new
tokens. When more chats than slots take turns, the least recently used idle slot's chat is
saved out with the per-sequence state API and restored into whichever slot it gets next — the
same copy `engine/chat_states.py` makes for the one-sequence engine, bounded by `kv_cache_chats`;
past that bound, and at a clean shutdown (`save_states`), states go to the data folder
(engine/kv_files.py) and come back from there when their chat returns. A chat new to the engine
starts from a copy of the longest prefix another slot holds — the persona — instead of reading
it again (`_share`).

Two engines in one process (a hot-swap's handover: the serving model and the incoming one)
take turns to decode (`_Turns`), and a decode thread starts with its first caller, never on the
niced thread that loaded the model (it would inherit nice 19).

Callers (the worker's job threads) block in `generate()` and receive their tokens through a
queue; `on_text` runs on the caller's thread, so a reply's consumer can never be handed another
sequence's tokens, and an `on_text` that raises (the bot stopping) frees the slot before the
error goes on.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
from llama_cpp import _internals

from core.errors import OuroError
from engine import neighbours
from engine.chat_states import copy_seq_state, evict_oldest
from engine.kv_files import KVFiles
from engine.llama import LlamaEngine, model_params
from engine.protocol import Completion, Message, OnText, Sampling
from engine.threads import FirstUseThread

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64        # `Llama`'s default `last_n_tokens_size`: the window the repeat penalty sees
MIN_P = 0.05               # `Llama.generate`'s default min_p, kept so sampled replies match
SHARE_MIN = 32             # a prefix at least this much longer in another slot is copied, not read (`_share`)


_PARAMS_LOCK = threading.Lock()


class _Turns:
    """Whose llama_decode runs next, among the engines of this process: one at a time, first come
    first served.

    Each engine has its own decode thread, and during a hot-swap's handover two of them are
    loaded — the serving model answering, the incoming one reading the chats ahead. Decoding at
    once, their threads (two for a prompt read, one for a warm-up piece) outnumber the cores, and
    ggml's threads wait for each other at every step of the graph: in `ouro bench swap` on 2 cores
    a reply's 22-token read took 0.93 s beside the new model's 8-token pieces, against ~0.08 s
    alone. Taking turns, a reply waits at most for one piece of the other model's. FIFO so that
    a thread stepping again at once cannot starve the other (a plain lock's releaser tends to win
    it back); with a single engine nobody waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    @contextlib.contextmanager
    def turn(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


_TURNS = _Turns()


@contextlib.contextmanager
def context_params(*, slots: int):
    """Create the context with `slots` sequences, each with its own KV stream. `Llama()` has no
    argument for `n_seq_max`/`kv_unified`, so its default-params factory is wrapped during the load."""
    import llama_cpp.llama_cpp as C

    def with_slots():
        params = original()
        params.n_seq_max = slots
        params.kv_unified = False
        return params

    with _PARAMS_LOCK:
        original = C.llama_context_default_params
        C.llama_context_default_params = with_slots
        try:
            yield
        finally:
            C.llama_context_default_params = original


@dataclass
class _Saved:
    tokens: list[int]
    blob: ctypes.Array
    size: int
    shareable: int = 0           # the slot's `shareable` when copied out (kept in the KV files too)


@dataclass
class _Slot:
    seq: int
    key: int | str | None = None
    tokens: list[int] = field(default_factory=list)   # the ids this sequence's KV cells hold
    shareable: int = 0           # leading cells read as prompt pieces, none decoded alone: what another chat may copy
    request: _Request | None = None
    used: float = 0.0


class _CallerThreads(threading.local):
    threads: int | None = None       # prompt threads a caller asked for (`set_batch_threads`)


@dataclass(eq=False)
class _Request:
    key: int | str
    tokens: list[int]            # the prompt (or, for a read, the text to read)
    max_tokens: int              # 0: read only (prefill), nothing is sampled
    sampling: Sampling | None
    events: queue.Queue = field(default_factory=queue.Queue)
    slot: _Slot | None = None
    read: int = 0                # prompt tokens in the slot's KV so far
    cached: int = 0
    out: list[int] = field(default_factory=list)
    pending: int | None = None   # sampled, not yet decoded
    sampler: object = None
    cancelled: bool = False
    released: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    threads: int | None = None   # prompt threads for this request's reads (None: the engine's)
    budget: int | None = None    # a read: at most this many tokens past what its slot holds when it binds


class BatchedEngine(LlamaEngine):
    """A GGUF served with `slots` replies decoded at once. Thread-safe, unlike `LlamaEngine`: the
    worker calls `generate` from several threads and one decode thread serves them all."""

    def __init__(self, model_path: Path, *, generation_id: str, slots: int, n_ctx: int = 2048,
                 n_threads: int | None = None, n_gpu_layers: int = 0, kv_cache_chats: int = 8,
                 model_sha256: str = "", extra_buffers: bool = False, n_batch: int = 512,
                 kv_files: KVFiles | None = None) -> None:
        if slots < 1:
            raise OuroError(f"max_parallel must be at least 1, not {slots}")
        with context_params(slots=slots), model_params(extra_buffers=extra_buffers):
            # the loader's own lock is taken inside model_params; the factory swap above is ours
            super().__init__(model_path, generation_id=generation_id, n_ctx=n_ctx * slots, n_threads=n_threads,
                             n_gpu_layers=n_gpu_layers, kv_cache_chats=0, model_sha256=model_sha256,
                             extra_buffers=True)
        self.n_ctx = n_ctx                  # per chat: what the context builder may fill
        self.slots = [_Slot(seq) for seq in range(slots)]
        self.kv_cache_chats = kv_cache_chats
        self.kv_files = kv_files
        self.states = _SlotView(self)
        self._caller = _CallerThreads()     # `set_batch_threads`, per calling thread
        # `generating` (from LlamaEngine) stays False: prefill is a request like any other, safe
        # while replies stream, so the hot-swap's warm-up never has to wait for one
        self.n_batch = min(n_batch, self.llm.n_batch)
        self._saved: OrderedDict[int | str, _Saved] = OrderedDict()
        self._waiting: deque[_Request] = deque()
        self._cond = threading.Condition()  # guards slots, _waiting, _saved; the decode thread waits on it
        self._closing = False
        self._stale: set[int] = set()       # sequences forgotten: cleared by the decode thread once idle
        self._save_asked: list[threading.Event] = []   # save_states() waiting for the decode thread
        self._states_saved = 0
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._vocab = self.llm.n_vocab()
        self.saves = self.restores = 0
        self.peak_active = 0                # most sequences in one llama_decode (the tests read it)
        self.moves = 0                      # replies moved to another slot to keep the batch in one run (_pack)
        self.shared = 0                     # prompts that started from another slot's copied prefix (_share)
        self.peak_runs = 0                  # most runs of consecutive sequence ids in one generation step
        self.step_threads: set[tuple[bool, int]] = set()   # (several chats generating, threads) seen (tests)
        # started by the first caller (a worker job thread), never on the niced loader: engine/threads.py
        self._thread = FirstUseThread(self._loop, f"decode-{generation_id}")

    # --- what callers see -----------------------------------------------------------------
    @property
    def active(self) -> int:
        """Slots with a request under way."""
        with self._cond:
            return sum(1 for s in self.slots if s.request is not None)

    def generate(self, messages: list[Message], *, chat_key: int | str, sampling: Sampling,
                 on_text: OnText | None = None) -> Completion:
        started = time.perf_counter()
        text = self.render(messages)       # outside the lock: the decode thread takes it after every step
        with self._cond:
            self._check_open()
            tokens = self.chat_tokens(text, chat_key)
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise OuroError(f"prompt of {len(tokens)} tokens does not fit the {self.n_ctx}-token context")
        request = _Request(chat_key, tokens, min(sampling.max_tokens, room), sampling, started=started,
                           threads=self._caller.threads)
        self._submit(request)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        ttft = None
        try:
            while True:
                kind, value = request.events.get()
                if kind == "token":
                    ttft = value[1] if ttft is None else ttft
                    piece = decoder.decode(self.llm.detokenize([value[0]], special=False))
                    if piece:
                        parts.append(piece)
                        if on_text:
                            on_text(piece)
                elif kind == "error":
                    raise value
                else:
                    finish = value
                    break
        except BaseException:
            self._cancel(request)
            raise
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)
            if on_text:
                on_text(tail)
        total = time.perf_counter() - started
        return Completion(text="".join(parts).strip(), prompt_tokens=len(tokens), completion_tokens=len(request.out),
                          ttft_s=ttft if ttft is not None else total, total_s=total, finish_reason=finish,
                          cached_tokens=request.cached)

    def unread(self, messages: list[Message], *, chat_key: int | str) -> int:
        text = self.render(messages)
        with self._cond:
            self._check_open()
            tokens = self.chat_tokens(text, chat_key)
            return len(tokens) - self.states.cached_prefix(chat_key, tokens)

    def prefill(self, messages: list[Message], *, chat_key: int | str, max_tokens: int | None = None) -> int:
        """Read a chat's conversation into its sequence (see `LlamaEngine.prefill`), as a request the
        decode thread serves between steps; safe while other chats' replies stream."""
        text = self.render(messages, add_generation_prompt=False)
        with self._cond:
            self._check_open()
            tokens = self.chat_tokens(text, chat_key)
            if not tokens or len(tokens) >= self.n_ctx:
                return 0
            keep = self.states.cached_prefix(chat_key, tokens)
        end = len(tokens) if max_tokens is None else min(len(tokens), keep + max_tokens)
        if keep >= end:
            return 0
        request = _Request(chat_key, tokens[:end], 0, None, threads=self._caller.threads, budget=max_tokens)
        self._submit(request)
        try:
            kind, value = request.events.get()
        except BaseException:
            self._cancel(request)
            raise
        if kind == "error":
            raise value
        return len(request.tokens) - request.cached

    def set_batch_threads(self, n: int | None) -> None:
        """Threads for the prompts this calling thread reads from now on (None: the loaded default).

        Per calling thread, carried by each request: the decode thread serves several callers, and
        an engine-wide setting made for the hot-swap's one-thread warm-up pieces also caught the
        replies read between them (a 54-token read took 0.35 s instead of ~0.15)."""
        self._caller.threads = n

    def forget(self, chat_key: int | str) -> None:
        with self._cond:
            self._saved.pop(chat_key, None)
            if self.kv_files is not None:
                self.kv_files.forget(chat_key)
            for slot in self.slots:
                if slot.key == chat_key:
                    slot.key = None        # its cells are dropped by the decode thread, between steps
                    self._stale.add(slot.seq)
            self._cond.notify_all()

    def save_states(self) -> int:
        """Write every idle chat's state to the data folder (see `LlamaEngine.save_states`); the
        decode thread copies them out between steps, the KV files' writer writes them."""
        if self.kv_files is None:
            return 0
        done = threading.Event()
        with self._cond:
            self._check_open()
            self._save_asked.append(done)
            self._thread.start_once()
            self._cond.notify_all()
        done.wait()
        self.kv_files.flush()
        return self._states_saved

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join_if_started()       # none starts once closing: `_check_open` comes first
        llama_cpp.llama_batch_free(self._batch)
        self._saved.clear()
        if self.kv_files is not None:
            self.kv_files.close()
        self.llm.close()

    # --- the caller's side of the queue ---------------------------------------------------
    def _check_open(self) -> None:
        if self._closing:
            raise OuroError("the engine is closed")

    def _submit(self, request: _Request) -> None:
        with self._cond:
            self._check_open()
            self._waiting.append(request)
            self._thread.start_once()
            self._cond.notify_all()

    def _cancel(self, request: _Request) -> None:
        """Give the request's slot back (the decode thread drops it at its next step) and wait for that."""
        with self._cond:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                request.released.set()
            self._cond.notify_all()
        request.released.wait()

    # --- the decode thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._waiting or self._stale or self._save_asked
                           or any(s.request for s in self.slots)):
                    self._cond.wait()
                if self._closing:
                    self._fail_all(OuroError("the engine was closed"))
                    return
                if self._save_asked:
                    self._save_all()
                self._drop_cancelled()
                for slot in self.slots:
                    if slot.seq in self._stale and slot.request is None:
                        self._stale.discard(slot.seq)
                        if slot.key is None:
                            self._clear(slot)
                self._admit()
                self._pack()
                plan = self._plan()
            try:
                for group in plan:
                    self._step(group)
                with self._cond:
                    generating = self._generating()
                if generating:
                    self._step(generating)
            except Exception as exc:   # never leave a caller waiting on a thread that died
                log.exception("decode step failed")
                with self._cond:
                    for slot in self.slots:
                        if slot.request is not None:
                            self._finish(slot, ("error", OuroError(f"decoding failed: {exc}")))
                        self._clear(slot)

    def _save_all(self) -> None:
        """Copy every idle slot's chat out, then hand every saved state to the KV files, oldest first."""
        for slot in sorted(self.slots, key=lambda s: s.used):
            if slot.key is not None and slot.request is None and slot.tokens:
                self._save(slot, keep=len(self._saved) + 1)   # all of them stay in memory too
        for key, saved in self._saved.items():
            self.kv_files.put(key, saved.tokens, saved.blob, saved.size, saved.shareable)
        self._states_saved = len(self._saved)
        for done in self._save_asked:
            done.set()
        self._save_asked.clear()

    def _fail_all(self, exc: Exception) -> None:
        for done in self._save_asked:
            done.set()
        self._save_asked.clear()
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, ("error", exc))
        while self._waiting:
            request = self._waiting.popleft()
            request.events.put(("error", exc))
            request.released.set()

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, None)

    def _admit(self) -> None:
        """Waiting requests take free slots in arrival order; one whose chat is busy in a slot waits
        (its turn needs that reply's cells), without holding up the requests behind it."""
        for request in list(self._waiting):
            if any(s.key == request.key and s.request is not None for s in self.slots):
                continue
            slot = self._slot_for(request.key)
            if slot is None:
                break
            self._waiting.remove(request)
            self._bind(slot, request)
            if request.max_tokens == 0 and request.read == len(request.tokens):
                self._finish(slot, ("done", None))     # read by someone else meanwhile: nothing to do

    def _slot_for(self, key: int | str) -> _Slot | None:
        idle = [s for s in self.slots if s.request is None]
        if not idle:
            return None
        for s in idle:
            if s.key == key:
                return s
        empty = [s for s in idle if s.key is None]
        if empty:   # the lowest: llama.cpp decodes consecutive sequence ids in one micro-batch
            return empty[0]
        return min(idle, key=lambda s: s.used)

    def _bind(self, slot: _Slot, request: _Request) -> None:
        foreign = False              # the slot's cells are another chat's
        if slot.key != request.key:
            if slot.key is not None and (self.kv_cache_chats > 0 or self.kv_files is not None) and slot.tokens:
                self._save(slot)
            saved = self.stored(request.key)
            self._saved.pop(request.key, None)
            foreign = saved is None
            if saved is not None:
                self._restore(slot, saved)
            slot.key = request.key
        keep = _shared_prefix(slot.tokens, request.tokens)
        if foreign:   # another chat's cells keep their common prefix (the persona), as far as it was read as a prompt
            keep = min(keep, slot.shareable)
        keep = self._share(slot, request.tokens, keep)
        if request.max_tokens > 0 and keep >= len(request.tokens) - 1:
            # the last prompt token's logits are not kept: read it again, with the one before it (a
            # piece of one token takes llama.cpp's one-query path, whose numbers differ; see _plan)
            keep = max(0, len(request.tokens) - 2)
        self._truncate(slot, keep)
        if request.budget is not None:
            # `prefill` sized the read from what it expected to find; when the chat's cells went
            # meanwhile, a hot-swap warm-up piece meant to read 8 tokens read 238 (1.5 s of one
            # thread, a reply waiting behind it). A read never takes more than it asked for.
            del request.tokens[keep + request.budget:]
        request.read = request.cached = keep
        request.slot = slot
        slot.request = request
        slot.used = time.perf_counter()
        if request.max_tokens > 0:
            request.sampler = _sampler(request.sampling, self._vocab)

    def _share(self, slot: _Slot, tokens: list[int], keep: int) -> int:
        """Start `slot` from another slot's cells when they hold a longer prefix of `tokens` — the
        persona, for a chat new to this engine (after a start or a hot-swap every slot is empty, and
        each new chat would read the persona again: ~80 tokens of the default one, ~0.3 s here, and an
        owner's persona can be ten times that). The donor's cells are copied whole through host memory
        (the copy `_save` makes: a few ms for a few hundred tokens) and cut back to the shared prefix;
        only cells read as prompt pieces are taken (`shareable`), never ones decoded one token at a
        time, whose numbers differ (see `_piece_size`), so the text is the same as reading it.
        Returns the prompt tokens the slot now holds."""
        donor, best = self._donor(tokens, slot)
        if donor is None or best < keep + SHARE_MIN:
            return keep
        cells = self._copy(donor)
        if cells is None:
            return keep
        if not self._load(slot, cells):
            log.warning("another chat's cells (%d tokens) could not be copied; the prompt is read", len(cells.tokens))
            return 0
        self._truncate(slot, best)
        self.shared += 1
        return best

    def _donor(self, tokens: list[int], exclude: _Slot | None) -> tuple[_Slot | None, int]:
        """The slot whose shareable cells hold the longest prefix of `tokens` (the shortest such
        sequence, the cheapest to copy), and that prefix's length."""
        donor, best = None, 0
        for other in self.slots:
            if other is exclude or other.key is None:   # no chat (a forgotten one's cells wait to be cleared)
                continue
            n = min(other.shareable, _shared_prefix(other.tokens, tokens))
            if n > best or (n == best and donor is not None and len(other.tokens) < len(donor.tokens)):
                donor, best = other, n
        return (donor, best) if best > 0 else (None, 0)

    def _pack(self) -> None:
        """Keep the replies under way on consecutive sequence ids, moving a reply's cells into a free
        slot when they are not.

        With a KV stream per sequence, llama.cpp cuts a batch into micro-batches of *consecutive*
        sequence ids (`split_equal(..., sequential=true)`): the generation step of slots {0, 3, 6}
        is three graph evaluations of one token each, not one of three. Replies end at different
        times and chats come back to the slot that holds their cells, so without packing a busy
        engine's steps are cut up most of the time (8 chats on 2 cores: a step of 3 chats took
        41-43 ms cut in three, 24 ms in one run). A move copies the cells of the reply and of the
        idle chat in the slot it takes (llama_state_seq_get/set_data, the copy `_save`/`_restore`
        make; a few ms for a chat of a few hundred tokens) and swaps them, so neither is read again;
        the cells land at the same places, so the text is the same (tests/test_parallel.py)."""
        busy = [s for s in self.slots if s.request is not None and s.request.max_tokens > 0]
        k = len(busy)
        if k < 2 or busy[-1].seq - busy[0].seq == k - 1:
            return
        seqs = [s.seq for s in busy]
        start = max(range(len(self.slots) - k + 1), key=lambda w: (sum(w <= q < w + k for q in seqs), -w))
        outside = [s for s in busy if not start <= s.seq < start + k]
        free = [s for s in self.slots[start:start + k] if s.request is None]   # a prefill being read stays
        for moving, other in zip(outside, free, strict=False):
            self._swap(moving, other)
        self.slots.sort(key=lambda s: s.seq)

    def _swap(self, moving: _Slot, other: _Slot) -> None:
        """Exchange the cells of two slots' sequences (and their ids): `moving` holds a reply under
        way, `other` an idle chat's cells or none (a forgotten idle chat's were cleared by `_loop`)."""
        moving_cells = self._copy(moving) if moving.tokens else None
        if moving.tokens and moving_cells is None:
            return                       # could not copy: the step stays cut, nothing is lost
        other_cells = self._copy(other) if other.tokens else None
        for slot in (moving, other):
            self._truncate(slot, 0)
        if moving.seq in self._stale:    # forgotten while its reply runs: the mark goes with the cells
            self._stale.discard(moving.seq)
            self._stale.add(other.seq)
        moving.seq, other.seq = other.seq, moving.seq
        if moving_cells is not None and not self._load(moving, moving_cells):
            log.warning("a reply's cells (%d tokens) could not be moved to another slot", len(moving_cells.tokens))
            self._finish(moving, ("error", OuroError("decoding failed: a reply's cells could not be moved")))
        if other_cells is not None:
            self._load(other, other_cells)   # refused: the idle chat is read again on its next turn
        self.moves += 1

    def _plan(self) -> list[list[tuple[_Slot, list[int], bool]]]:
        """This step's prompt pieces, each a decode of its own (oldest request first, `n_batch`
        prompt tokens in all); the generation step follows them (`_generating`).

        Why not one batch for everything: with a KV stream per sequence llama.cpp splits a batch
        into micro-batches holding the same number of tokens of each sequence (`split_equal`), so
        a prompt beside a generating sequence would be cut into a piece of one token and the rest —
        and a piece of one token takes the one-query attention path, whose numbers differ (see
        `_piece_size`). Read alone, each prompt is read as it is on the one-at-a-time engine."""
        plan = []
        room = self.n_batch
        for slot in sorted((s for s in self.slots if s.request is not None), key=lambda s: s.request.started):
            r = slot.request
            if r.pending is None and room > 0:
                n = _piece_size(len(r.tokens) - r.read, room)
                if n == 0:
                    continue
                piece = r.tokens[r.read:r.read + n]
                last = r.read + n == len(r.tokens)
                plan.append([(slot, piece, last and r.max_tokens > 0)])
                room -= n
        return plan

    def _generating(self) -> list[tuple[_Slot, list[int], bool]]:
        """The generation step: the token each generating sequence sampled last, in slot order.

        It runs after the step's prompt pieces, so a reply whose prompt was just read decodes its
        first token with the others. The other way round, a chat reading its prompt in the middle
        of the run of generating slots cut that step in two graph passes (see `_pack`): in `ouro
        bench serve --concurrent 32` a step of 7 took 64 ms on average against 56 for a step of 8.
        Each sequence sees the same computations in the same order either way."""
        return [(s, [s.request.pending], True) for s in self.slots
                if s.request is not None and s.request.pending is not None and not s.request.cancelled]

    def _step(self, group: list[tuple[_Slot, list[int], bool]]) -> None:
        """One llama_decode of `group`, then each sequence that asked for logits samples its next token."""
        batch = self._batch
        n, outputs = 0, []
        for slot, piece, wants in group:
            start = len(slot.tokens)
            for i, token in enumerate(piece):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = wants and i == len(piece) - 1
                n += 1
            if wants:
                outputs.append((slot, n - 1))
        batch.n_tokens = n
        self.peak_active = max(self.peak_active, len(group))
        # a step of several generating chats reads with the prompt threads, as llama.cpp and its
        # server do for any batch of more than one token (quiet, that is the batch's throughput);
        # while the bot's own cycle trains beside it, with the generation threads, which two
        # threads waiting for each other at every step of the graph would not be (engine/neighbours.py)
        generation = group[0][0].request.pending is not None
        threads, prompt_threads = self.llm.context_params.n_threads, self.llm.context_params.n_threads_batch
        if not generation:                   # a prompt piece: one request's, with its caller's setting
            batch_threads = group[0][0].request.threads or prompt_threads
        elif len(group) == 1 or neighbours.training():
            batch_threads = threads
        else:
            batch_threads = prompt_threads
        self.step_threads.add((generation and len(group) > 1, batch_threads))
        if generation:
            seqs = [slot.seq for slot, _, _ in group]
            self.peak_runs = max(self.peak_runs, 1 + sum(b != a + 1 for a, b in zip(seqs, seqs[1:], strict=False)))
        with _TURNS.turn():
            llama_cpp.llama_set_n_threads(self.ctx, threads, batch_threads)
            rc = llama_cpp.llama_decode(self.ctx, batch)
        with self._cond:
            if rc != 0:
                exc = OuroError(f"llama.cpp could not decode a batch of {n} tokens (code {rc})")
                for slot, _, _ in group:
                    if slot.request is not None:
                        self._finish(slot, ("error", exc))
                    self._clear(slot)
                return
            for slot, piece, _ in group:
                if len(piece) > 1 and slot.shareable == len(slot.tokens):
                    slot.shareable += len(piece)       # a prompt piece (never one token: `_piece_size`)
                slot.tokens.extend(piece)
                r = slot.request
                if r.pending is not None:
                    r.pending = None
                else:
                    r.read += len(piece)
                    if r.max_tokens == 0 and r.read == len(r.tokens):
                        self._finish(slot, ("done", None))
            now = time.perf_counter()
            for slot, index in outputs:
                r = slot.request
                if r is None or r.cancelled:
                    continue
                token = llama_cpp.llama_sampler_sample(r.sampler.sampler, self.ctx, index)
                if token in self.stop_ids:
                    self._finish(slot, ("done", "stop"))
                    continue
                r.out.append(token)
                r.events.put(("token", (token, now - r.started)))
                if len(r.out) >= r.max_tokens:
                    self._finish(slot, ("done", "length"))
                else:
                    r.pending = token

    @property
    def ctx(self):
        return self.llm.ctx

    def _finish(self, slot: _Slot, event: tuple | None) -> None:
        """The request leaves its slot; the slot keeps the chat's cells for its next turn."""
        request = slot.request
        slot.request = None
        slot.used = time.perf_counter()
        if request.sampler is not None:
            request.sampler.close()
        if event is not None:
            request.events.put(event)
        request.released.set()

    # --- KV bookkeeping (under _cond, never during a decode) ------------------------------
    def _truncate(self, slot: _Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), slot.seq, keep, -1)
            del slot.tokens[keep:]
        slot.shareable = min(slot.shareable, keep)

    def _clear(self, slot: _Slot) -> None:
        self._truncate(slot, 0)
        slot.key = None

    def _copy(self, slot: _Slot) -> _Saved | None:
        """The slot's cells copied out with the ids they hold (None when llama.cpp wrote none)."""
        blob, written = copy_seq_state(self.ctx, slot.seq)
        return _Saved(list(slot.tokens), blob, written, slot.shareable) if written else None

    def _load(self, slot: _Slot, saved: _Saved) -> bool:
        """`saved` into the slot's sequence, emptied first; False, the sequence left empty, when
        llama.cpp refuses it."""
        self._truncate(slot, 0)
        if llama_cpp.llama_state_seq_set_data(self.ctx, saved.blob, saved.size, slot.seq) == 0:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), slot.seq, -1, -1)
            return False
        slot.tokens = list(saved.tokens)
        slot.shareable = saved.shareable       # never past its tokens: `_copy`, KVFiles clamp it
        return True

    def _save(self, slot: _Slot, keep: int | None = None) -> None:
        saved = self._copy(slot)
        if saved is None:
            return
        self._saved[slot.key] = saved
        self._saved.move_to_end(slot.key)
        self.saves += 1
        self._evict(self.kv_cache_chats if keep is None else keep)

    def _evict(self, keep: int) -> None:
        evict_oldest(self._saved, keep, self.kv_files)

    def stored(self, key: int | str) -> _Saved | None:
        """`key`'s saved state: in memory, or read back from disk (into memory) when it is there."""
        saved = self._saved.get(key)
        if saved is not None or self.kv_files is None:
            return saved
        found = self.kv_files.take(key)
        if found is None:
            return None
        if len(found.tokens) >= self.n_ctx or min(found.tokens) < 0 or max(found.tokens) >= self._vocab:
            return None                 # not from a context like this one's: the chat is read again
        saved = self._saved[key] = _Saved(found.tokens, found.blob, found.size, found.shareable)
        self._evict(self.kv_cache_chats + 1)
        return saved

    def _restore(self, slot: _Slot, saved: _Saved) -> None:
        if not self._load(slot, saved):
            log.warning("a saved KV state (%d tokens) could not be restored; the chat is read again",
                        len(saved.tokens))
            return                  # could not restore: the chat is read again
        self.restores += 1


class _SlotView:
    """What `LlamaEngine.chat_tokens` and `unread` ask of the per-chat states, answered from the slots
    and the saved states (callers hold the engine's condition lock)."""

    def __init__(self, engine: BatchedEngine) -> None:
        self.engine = engine

    def held(self, key: int | str) -> list[int]:
        for slot in self.engine.slots:
            if slot.key == key:
                return slot.tokens
        saved = self.engine.stored(key)
        return saved.tokens if saved is not None else []

    def cached_prefix(self, key: int | str, tokens: list[int]) -> int:
        """The prompt tokens `_bind` will find in place for `key`'s next request: its own cells (in a
        slot or saved), or for a chat new to the engine the prompt-read prefix of the slot it will
        take (the persona) — or a longer prefix copied from another slot (`_share`)."""
        engine = self.engine
        slot = next((s for s in engine.slots if s.key == key), None)
        if slot is not None:
            held = slot.tokens
        else:
            slot = engine._slot_for(key) or min(engine.slots, key=lambda s: s.used)
            saved = engine.stored(key)
            held = saved.tokens if saved is not None else slot.tokens[:slot.shareable]
        keep = _shared_prefix(held, tokens)
        _, best = engine._donor(tokens, slot)
        return best if best >= keep + SHARE_MIN else keep

    def clear(self) -> None:
        self.engine._saved.clear()

    def __len__(self) -> int:
        """Chats whose cells are kept: in a slot, or saved in memory (`ouro bench soak` reports the peak)."""
        with self.engine._cond:
            return len({s.key for s in self.engine.slots if s.key is not None} | set(self.engine._saved))


def _sampler(sampling: Sampling, n_vocab: int) -> _internals.LlamaSampler:
    """The chain `Llama._init_sampler` builds for `Llama.generate` (penalties, then greedy, or
    top-k → typical → top-p → min-p → temperature → a seeded draw)."""
    chain = _internals.LlamaSampler()
    chain.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N, penalty_repeat=sampling.repeat_penalty,
                        penalty_freq=0.0, penalty_present=0.0)
    if sampling.temperature == 0.0:
        chain.add_greedy()
    else:
        chain.add_top_k(sampling.top_k)
        chain.add_typical(1.0, 1)
        chain.add_top_p(sampling.top_p, 1)
        chain.add_min_p(MIN_P, 1)
        chain.add_temp(sampling.temperature)
        chain.add_dist(sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
    return chain


def _piece_size(left: int, room: int) -> int:
    """Prompt tokens to read this step: as many as fit, but never a piece of one token out of a
    longer prompt, nor leaving one for later. A sequence's piece of one token goes through
    llama.cpp's one-query attention, whose numbers differ from reading the same token among others
    (by up to 0.7 in a logit on SmolLM2), while pieces of two or more — and any mix of other
    sequences' tokens in the batch, each sequence in its own KV stream — give the same numbers bit
    for bit as reading the whole prompt at once. So a prompt reads the same beside others as alone."""
    n = min(left, room)
    if n < left and left - n == 1:
        n -= 1                       # leave two for the next step rather than one
    if n == 1 and left > 1:
        return 0                     # wait for room for two
    return n


def _shared_prefix(held, tokens: list[int]) -> int:
    n = 0
    for a, b in zip(held, tokens, strict=False):
        if a != b:
            break
        n += 1
    return n
