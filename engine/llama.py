"""The real engine: a GGUF served by llama-cpp-python, with per-chat KV reuse.

Prompts are rendered with the chat template stored in the GGUF itself (the same template
training uses), tokenized once, and fed to `Llama.generate`, which evaluates only the part
after the longest prefix it already holds. When another chat used the context in between,
the returning chat's KV state is restored from `ChatStates` first, so it does not re-read
its whole history — from memory, or after a restart from the data folder (engine/kv_files.py).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import threading
import time
from pathlib import Path

from core.errors import OuroError
from engine.chat_states import ChatStates
from engine.kv_files import KVFiles
from engine.placement import model_layers, placement
from engine.protocol import Completion, Message, OnText, Sampling
from engine.template import CHATML, ChatFormat

log = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def model_params(*, extra_buffers: bool):
    """Load with llama.cpp's "extra buffer types" (AMX / weight repacking) on or off.

    Why: on Xeon CPUs that report AMX inside a VM (the machines this project runs on), the
    AMX buffer type that llama.cpp picks for Q4_1 weights segfaults on the first decode.
    `Llama()` has no argument for `llama_model_params.use_extra_bufts`, so the default-params
    factory it calls is wrapped for the duration of the load (under a lock).
    """
    import llama_cpp.llama_cpp as C

    if extra_buffers:
        yield
        return
    with _LOAD_LOCK:
        original = C.llama_model_default_params

        def without_extra_buffers():
            params = original()
            params.use_extra_bufts = False
            return params

        C.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            C.llama_model_default_params = original


class LlamaEngine:
    def __init__(self, model_path: Path, *, generation_id: str, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0, kv_cache_chats: int = 8, model_sha256: str = "",
                 extra_buffers: bool = False, logits_all: bool = False, kv_files: KVFiles | None = None) -> None:
        from llama_cpp import Llama

        self.model_path = Path(model_path)
        self.generation_id = generation_id
        self.model_sha256 = model_sha256
        try:
            with model_params(extra_buffers=extra_buffers):
                self.llm = Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=n_threads,
                                 n_gpu_layers=n_gpu_layers, logits_all=logits_all, verbose=False)
        except Exception as exc:  # llama.cpp says little; the file check upstream says more
            raise OuroError(f"llama.cpp could not load {self.model_path}: {exc}") from exc
        self.n_ctx = self.llm.n_ctx()
        where = placement(n_gpu_layers, model_layers(self.llm.model))
        self.placement = where.describe()
        if where.ignored:
            log.warning("%s: %s", self.model_path.name, self.placement)
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template") or CHATML
        # One renderer for serving and training (engine/template.py): a generation is trained
        # on exactly the prompts it will be served. The template writes BOS itself when the
        # model wants one; never add a second.
        self.format = ChatFormat(template=template, bos_token=self._piece(self.llm.token_bos()),
                                 eos_token=self._piece(self.llm.token_eos()),
                                 add_bos=meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
                                 and "bos_token" not in template)
        self._add_bos = self.format.add_bos
        self.stop_ids = self._end_of_turn_ids()
        self.kv_files = kv_files
        self.states = ChatStates(self.llm, max_chats=kv_cache_chats, files=kv_files)
        # True while generate() streams: the worker may run background work between its tokens,
        # and that work must not touch this model's context meanwhile (see prefill)
        self.generating = False

    # --- prompt ---------------------------------------------------------------------------
    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _end_of_turn_ids(self) -> set[int]:
        import llama_cpp

        vocab = self.llm._model.vocab
        ids = {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        # a model that starts a new turn header has finished its own turn
        start = self.llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
        if len(start) == 1:
            ids.add(start[0])
        ids.add(self.llm.token_eos())
        return ids

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        return self.format.render(messages, add_generation_prompt=add_generation_prompt)

    def tokenize(self, messages: list[Message]) -> list[int]:
        return self.llm.tokenize(self.render(messages).encode("utf-8"), add_bos=self._add_bos, special=True)

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.tokenize(messages))

    def chat_tokens(self, text: str, chat_key: int | str) -> list[int]:
        """The ids of a chat's rendered `text`, keeping the ids its state already holds wherever they
        spell the same text.

        A reply's own ids are often not how the tokenizer would write its text (BPE: the model may
        write " E"+"kh" where the tokenizer writes " Ek"+"h"), so the next prompt, tokenized afresh,
        parts from the chat's KV state inside the last reply and the whole reply is read again. The
        text the state spells is matched piece by piece instead, and only the rest is tokenized."""
        data = text.encode("utf-8")
        fresh = self.llm.tokenize(data, add_bos=self._add_bos, special=True)
        held = self.states.held(chat_key)
        n = 0
        for a, b in zip(held, fresh, strict=False):
            if a != b:
                break
            n += 1
        skip = 1 if self._add_bos else 0          # a BOS the tokenizer adds is not in the text
        if n <= skip or n == len(fresh):
            return fresh
        spelled = self.llm.detokenize(fresh[skip:n], special=True)
        if not data.startswith(spelled):          # a tokenizer whose pieces do not spell the text back
            return fresh
        pos, j = len(spelled), n
        while j < len(held):
            piece = self.llm.detokenize([int(held[j])], special=True)
            if not piece or data[pos:pos + len(piece)] != piece:
                break
            pos += len(piece)
            j += 1
        if j == n:
            return fresh
        return [int(t) for t in held[:j]] + self.llm.tokenize(data[pos:], add_bos=False, special=True)

    # --- generation -----------------------------------------------------------------------
    def generate(self, messages: list[Message], *, chat_key: int | str, sampling: Sampling,
                 on_text: OnText | None = None) -> Completion:
        started = time.perf_counter()
        tokens = self.chat_tokens(self.render(messages), chat_key)
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise OuroError(f"prompt of {len(tokens)} tokens does not fit the {self.n_ctx}-token context")
        max_tokens = min(sampling.max_tokens, room)
        self.states.activate(chat_key)
        cached = self.states.common_prefix(tokens)
        # every call sets it: the Llama keeps the last seed, so one seeded reply (🔁, an API client's
        # `seed`) would otherwise seed every later one; LLAMA_DEFAULT_SEED asks llama.cpp for a random one
        from llama_cpp import LLAMA_DEFAULT_SEED

        self.llm.set_seed(sampling.seed if sampling.seed is not None else LLAMA_DEFAULT_SEED)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        text_parts: list[str] = []
        ttft = None
        finish = "length"
        self.generating = True
        try:
            for token in self.llm.generate(tokens, temp=sampling.temperature, top_p=sampling.top_p,
                                           top_k=sampling.top_k, repeat_penalty=sampling.repeat_penalty,
                                           reset=True):
                if ttft is None:
                    ttft = time.perf_counter() - started
                if token in self.stop_ids:
                    finish = "stop"
                    break
                out.append(token)
                piece = decoder.decode(self.llm.detokenize([token], special=False))
                if piece:
                    text_parts.append(piece)
                    if on_text:
                        on_text(piece)
                if len(out) >= max_tokens:
                    break
        finally:
            self.generating = False
        tail = decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            if on_text:
                on_text(tail)
        total = time.perf_counter() - started
        return Completion(text="".join(text_parts).strip(), prompt_tokens=len(tokens), completion_tokens=len(out),
                          ttft_s=ttft if ttft is not None else total, total_s=total, finish_reason=finish,
                          cached_tokens=cached)

    def unread(self, messages: list[Message], *, chat_key: int | str) -> int:
        """Prompt tokens `generate(messages, chat_key=...)` would read now (the rest is cached).
        The hot-swap's handover compares it between two models to move a chat when it costs nothing."""
        tokens = self.chat_tokens(self.render(messages), chat_key)
        return len(tokens) - self.states.cached_prefix(chat_key, tokens)

    def prefill(self, messages: list[Message], *, chat_key: int | str, max_tokens: int | None = None) -> int:
        """Read a chat's conversation so far into its KV state without generating; returns tokens read.

        Used to warm a freshly loaded generation before the hot-swap, so the chats active right
        now do not each re-read their whole history on the new model's first reply. The text is
        rendered without a generation prompt: the next turn's prompt extends it token for token
        (the template closes every message with a special token, so no merge crosses the seam).
        `max_tokens` reads only that many: the next call goes on from there (the common prefix),
        so a long conversation can be read in short pieces between replies.

        Never while this model streams a reply (`generating`): the reply's sampler reads the
        context's last logits and KV cells, which reading another chat would replace (llama.cpp
        then aborts the process on a null logits pointer — seen when a trial catch-up pass after
        the swap, since dropped, ran between the tokens of a reply on the same model).
        """
        if self.generating:
            raise RuntimeError("prefill() while this model streams a reply: it would corrupt the reply's context")
        text = self.render(messages, add_generation_prompt=False)
        self.states.activate(chat_key)
        tokens = self.chat_tokens(text, chat_key)
        if not tokens or len(tokens) >= self.n_ctx:
            return 0
        keep = self.states.common_prefix(tokens)
        end = len(tokens) if max_tokens is None else min(len(tokens), keep + max_tokens)
        if keep >= end:
            return 0
        self.llm.n_tokens = keep            # eval() drops the KV cells past this point itself
        self.llm.eval(tokens[keep:end])
        return end - keep

    def set_batch_threads(self, n: int | None) -> None:
        """Threads llama.cpp uses to read a batch of prompt tokens (None: the loaded default).

        The hot-swap warm-up reads with one thread: beside a busy process two threads stall each
        other at every step of the graph (docs/design-notes.md has the figures).
        """
        import llama_cpp

        params = self.llm.context_params
        llama_cpp.llama_set_n_threads(self.llm.ctx, params.n_threads,
                                      n if n else params.n_threads_batch)

    def forget(self, chat_key: int | str) -> None:
        self.states.forget(chat_key)

    def save_states(self) -> int:
        """Write every chat's KV state to the data folder (a clean shutdown); states written."""
        if self.generating:
            raise RuntimeError("save_states() while this model streams a reply")
        return self.states.save_all()

    def close(self) -> None:
        self.states.clear()
        if self.kv_files is not None:
            self.kv_files.close()
        self.llm.close()
