"""A generation served by an OpenAI-compatible inference server (llama.cpp's server, vLLM, Ollama…).

`engine = "openai"` puts replies on a server the owner runs (more cores, a GPU, continuous
batching) instead of the embedded llama-cpp-python engine. This class implements the same
`Engine` protocol, so the conversation, the worker, the limits and the hot-swap take the same
paths as with the embedded engine.

Each generation is one model name on the server: its generation id (`gen-0003`). That is how
the bot tells the server which generation to serve, and how it checks that the server has it:
a name missing from `GET /v1/models` is refused with what the owner must do, never sent anyway
(llama-cpp-python's server silently answers an unknown name with its default model). Per server:
- llama.cpp's llama-server in router mode (`--models-dir <data>/models`): every generation folder
  is a model named by its id; the listing asks it to look again (`reload=1`), and the first
  request for a new generation loads it — a hot-swap needs nothing from the owner.
- llama-cpp-python's server with a `--config_file` listing every generation (`ouro export
  --format llama-cpp-python`): swaps among them at runtime; a generation trained after it
  started needs the file written again and the server restarted.
- a server started on one model (llama-server `-m … --alias gen-0003`, vLLM, Ollama after
  `ollama create gen-0003`): serves what it was given; the swap to anything else is refused.
A refused swap keeps the old generation serving and tells the admins what to do (`missing_model`).

Token counts (the context budget) come from the generation's own GGUF, read vocab-only here
(~0.4 s, a few MB): the GGUF is on this machine anyway (the lineage keeps every generation), its
tokenizer and chat template are exactly what a llama.cpp-family server renders the prompt with,
and counting needs no request per count (the context builder counts many times per turn; a
server's `/tokenize` only tokenizes text, so the template would have to be rendered here
regardless, and vLLM and Ollama do not share one tokenize endpoint).

The server keeps its own prompt cache, so `unread`, `prefill`, `forget` and `set_batch_threads`
have nothing to do here: the hot-swap's warm-up reads nothing, and a chat moves to the new
generation at its next reply.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from core.errors import OuroError
from engine.protocol import Completion, Message, OnText, Sampling
from engine.template import ChatFormat

STOP = ["<|im_start|>"]   # a ChatML model that opens a new turn has finished its own (as the embedded engine stops)


def api_root(base_url: str) -> str:
    """`http://host:port`, `…/` or `…/v1` → `http://host:port/v1` (the OpenAI clients' convention)."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise OuroError(f"engine_base_url must start with http:// or https://, got {base_url!r}",
                        hint="e.g. http://127.0.0.1:8080/v1 for a server on this machine")
    return url if url.endswith("/v1") else url + "/v1"


class ServerClient:
    """HTTP to one OpenAI-compatible server, every failure turned into an OuroError that names it."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.root = api_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # connect: fail fast when nothing listens; read: the longest silence between two streamed pieces
        self.timeout_s = timeout_s
        self.http = httpx.Client(base_url=self.root, headers=headers,
                                 timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)))

    def failure(self, exc: Exception, what: str) -> OuroError:
        if isinstance(exc, httpx.ConnectError):
            return OuroError(f"the inference server at {self.root} is not reachable ({what}): {exc}",
                             hint="start it, or fix engine_base_url")
        if isinstance(exc, httpx.TimeoutException):
            return OuroError(f"the inference server at {self.root} did not answer within {self.timeout_s:g} s "
                             f"({what})", hint="is it overloaded? engine_timeout_s sets the wait")
        return OuroError(f"the inference server at {self.root} broke off ({what}): {type(exc).__name__}: {exc}")

    def status_error(self, response: httpx.Response, what: str) -> OuroError:
        body = response.text if response.is_closed else response.read().decode("utf-8", "replace")
        return OuroError(f"the inference server at {self.root} answered HTTP {response.status_code} ({what}): "
                         f"{body.strip()[:300]}")

    def models(self) -> list[str]:
        """The model names the server serves (`GET /v1/models`). `reload=1` makes llama.cpp's llama-server
        in router mode look at its --models-dir again, so a generation trained since it started is
        listed (and loaded when asked for); other servers ignore it."""
        try:
            response = self.http.get("/models", params={"reload": "1"})
        except httpx.HTTPError as exc:
            raise self.failure(exc, "listing its models") from exc
        if response.status_code >= 400:
            raise self.status_error(response, "listing its models")
        try:
            # Ollama lists its models with their tag (gen-0003:latest) and answers to the bare name too
            return [str(m["id"]).removesuffix(":latest") for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise OuroError(f"{self.root}/models is not an OpenAI model list: {response.text[:200]}") from exc

    def close(self) -> None:
        self.http.close()


def missing_model(root: str, name: str, served: list[str]) -> OuroError:
    """What the owner must do when the server does not have a generation (it cannot be loaded from here)."""
    return OuroError(
        f"the inference server at {root} does not serve {name} (it serves: {', '.join(served) or 'nothing'})",
        hint=(f"make the server serve the GGUF of {name} under the name {name!r}, then /promote {name}. "
              "llama-cpp-python's server: `ouro export --format llama-cpp-python` writes a --config_file listing "
              "every generation; restart the server with it. llama.cpp's llama-server: run it in router mode "
              "with --models-dir set to the bot's models folder (it then finds new generations itself). "
              f"Ollama: `ouro export --format ollama {name}`, then `ollama create {name} -f <that Modelfile>`. "
              "Until then the bot keeps serving what it serves."))


class OpenAIServerEngine:
    """One generation on an OpenAI-compatible server, behind the `Engine` protocol."""

    def __init__(self, client: ServerClient, model_path: Path, *, generation_id: str, n_ctx: int = 2048,
                 model_sha256: str = "") -> None:
        """Check that the server serves `generation_id` and read its tokenizer; `client` is this
        engine's own (closed with it)."""
        from llama_cpp import Llama

        self.client = client
        self.model_path = Path(model_path)
        self.generation_id = generation_id
        self.model_sha256 = model_sha256
        self.n_ctx = n_ctx
        self.generating = False
        self.placement = f"the server at {client.root} (it decides where the model runs)"
        try:
            served = client.models()
            if generation_id not in served:
                raise missing_model(client.root, generation_id, served)
            try:
                self.vocab = Llama(model_path=str(self.model_path), vocab_only=True, verbose=False)
            except Exception as exc:  # llama.cpp says little; the file check upstream says more
                raise OuroError(f"llama.cpp could not read the tokenizer of {self.model_path}: {exc}") from exc
        except BaseException:
            client.close()
            raise
        self.format = ChatFormat.from_gguf(self.model_path)   # the template the server renders with, too

    # --- prompt ---------------------------------------------------------------------------
    def count_tokens(self, messages: list[Message]) -> int:
        text = self.format.render(messages, add_generation_prompt=True)
        return len(self.vocab.tokenize(text.encode("utf-8"), add_bos=self.format.add_bos, special=True))

    def _text_tokens(self, text: str) -> int:
        return len(self.vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # --- generation -----------------------------------------------------------------------
    def request(self, messages: list[Message], sampling: Sampling, max_tokens: int) -> dict:
        body = {"model": self.generation_id, "messages": messages, "stream": True, "max_tokens": max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "stop": STOP,
                # not in OpenAI's API, understood by llama.cpp's and llama-cpp-python's servers (vLLM: top_k)
                "top_k": sampling.top_k, "repeat_penalty": sampling.repeat_penalty}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    def generate(self, messages: list[Message], *, chat_key: int | str, sampling: Sampling,
                 on_text: OnText | None = None) -> Completion:
        started = time.perf_counter()
        prompt_tokens = self.count_tokens(messages)
        room = self.n_ctx - prompt_tokens
        if room < 1:
            raise OuroError(f"prompt of {prompt_tokens} tokens does not fit the {self.n_ctx}-token context")
        parts: list[str] = []
        ttft = None
        finish = "length"
        usage: dict = {}
        finished = False    # a finish_reason or [DONE]: a stream that just stops was broken off
        what = f"{self.generation_id}, chat {chat_key}"
        self.generating = True
        try:
            with self.client.http.stream("POST", "/chat/completions",
                                         json=self.request(messages, sampling, min(sampling.max_tokens, room))) as r:
                if r.status_code >= 400:
                    raise self.client.status_error(r, what)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue            # SSE comments, keep-alive pings, blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    chunk = _chunk(data, self.client.root)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - started
                            parts.append(piece)
                            if on_text:
                                on_text(piece)
                        if choice.get("finish_reason"):
                            finished = True
                            finish = "stop" if choice["finish_reason"] == "stop" else "length"
        except httpx.HTTPError as exc:
            raise self.client.failure(exc, what) from exc
        finally:
            self.generating = False
        if not finished:    # llama-cpp-python's server, for one, starts the stream before reading the prompt
            raise OuroError(f"the inference server at {self.client.root} ended the reply to {what} without "
                            f"finishing it, after {len(parts)} pieces", hint="its own log says why (a prompt "
                            "longer than its context? set n_ctx to at most the server's)")
        total = time.perf_counter() - started
        text = "".join(parts)
        return Completion(text=text.strip(), prompt_tokens=prompt_tokens,
                          completion_tokens=int(usage.get("completion_tokens") or self._text_tokens(text)),
                          ttft_s=ttft if ttft is not None else total, total_s=total, finish_reason=finish,
                          stats={"server": self.client.root, "server_prompt_tokens": usage.get("prompt_tokens")})

    # --- what the server's own cache does for us --------------------------------------------
    def unread(self, messages: list[Message], *, chat_key: int | str) -> int:
        return 0      # unknown to us; 0 lets the hot-swap move every chat at its next reply

    def prefill(self, messages: list[Message], *, chat_key: int | str, max_tokens: int | None = None) -> int:
        return 0      # nothing to read ahead here: the server reads the prompt when it gets it

    def set_batch_threads(self, n: int | None) -> None:
        pass          # the server's threads are the server's

    def forget(self, chat_key: int | str) -> None:
        pass          # the server's prompt cache holds no chat by name

    def save_states(self) -> int:
        return 0      # the server keeps (or drops) its own cache across its restarts

    def close(self) -> None:
        self.vocab.close()
        self.client.close()


def _chunk(data: str, root: str) -> dict:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise OuroError(f"the inference server at {root} streamed something that is not JSON: {data[:200]}") from exc
    if isinstance(chunk, dict) and chunk.get("error"):
        raise OuroError(f"the inference server at {root} reported an error mid-reply: {chunk['error']}")
    return chunk
