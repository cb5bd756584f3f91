"""llama.cpp's own `llama-server`, for `ouro bench serve --concurrent N`: the engine to beat.

The binary is built from the llama.cpp tree that llama-cpp-python vendors (same version, same
kernels as the embedded engine), once, into the user's cache keyed by that version — `make
llama-server` does it; `OURO_LLAMA_SERVER` names another build. The bench runs it on the same GGUF
with `slots` parallel slots (`-np`, continuous batching, its prompt cache in RAM on by default), the
same threads as the embedded engine (llama-cpp-python's defaults: half the cores to generate, all
of them to read a prompt) and, like the embedded engine, without weight repacking unless
`llama_extra_buffers` is set. Each of N clients (the real `openai` client) holds a conversation:
every turn sends the persona and the whole history, as OpenAI clients do, and the server's slots and
prompt cache decide what it reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from config.settings import Settings
from core.errors import OuroError
from ouro.bench.concurrent import side_figures

SERVER_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]


def llama_server_binary(*, build: bool = True) -> Path:
    """`OURO_LLAMA_SERVER` when set, else `~/.cache/ouroboros/llama.cpp-<llama-cpp-python version>/build/bin/
    llama-server`, built there first when `build` (minutes on two cores; pip downloads the sdist)."""
    if os.environ.get("OURO_LLAMA_SERVER"):
        return Path(os.environ["OURO_LLAMA_SERVER"])
    version = importlib.metadata.version("llama_cpp_python")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ouroboros" / f"llama.cpp-{version}"
    binary = home / "build" / "bin" / "llama-server"
    if binary.is_file() or not build:
        return binary
    src = llama_cpp_source(home, version)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "-S", str(src), "-B", str(home / "build"), *SERVER_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(home / "build"), "--target", "llama-server", "-j", jobs], check=True)
    return binary


def llama_cpp_source(home: Path, version: str) -> Path:
    """The llama.cpp tree inside llama-cpp-python's sdist of `version` (pip downloads it, or takes it
    from its cache), unpacked once under `home`."""
    import tarfile

    src = home / "src"
    if not (src / "CMakeLists.txt").is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(home), f"llama-cpp-python=={version}"], check=True)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(home / f"llama_cpp_python-{version}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(home / "src.tmp", members=members, filter="data")
        os.replace(home / "src.tmp", src)
    return src


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_argv(binary: Path, gguf: Path, settings: Settings, slots: int, port: int, clients: int = 0) -> list[str]:
    """The embedded engine's model, context per chat, threads and buffer choice, with `slots` slots.
    An HTTP thread per client: llama-server's default (slots + 4) keeps the clients past that waiting
    for a thread, and closed some of their connections unanswered with 32 clients on 8 slots."""
    cores = os.cpu_count() or 1
    threads = settings.n_threads or max(cores // 2, 1)
    argv = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(settings.n_ctx * slots), "-t", str(threads), "-tb", str(settings.n_threads or cores),
            "--no-webui", "--threads-http", str(max(clients, slots) + 4)]
    if not settings.llama_extra_buffers:
        argv.append("--no-repack")
    return argv


@contextlib.contextmanager
def running_server(argv: list[str], port: int, log_file: Path, timeout_s: float = 120.0):
    """The server process, up and answering /v1/models, stopped on the way out."""
    with log_file.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise OuroError(f"llama-server exited with {proc.returncode}",
                                hint=log_file.read_text(errors="replace")[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise OuroError(f"llama-server did not come up in {timeout_s:g} s",
                                hint=log_file.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


async def chats_through_server(url: str, settings: Settings, messages: list[str], chats: int,
                               turns_each: int, lengths: dict[int, list[int]]) -> dict:
    """N conversations at once through the server, as `concurrent._chats_at_once` holds them through
    the bot: the next message as soon as the reply is complete; TTFT from sending to the first text.

    `lengths` (chat → tokens of each of its replies on the embedded side): each reply is held to that
    many tokens (`max_tokens` and llama-server's `ignore_eos`), so both sides do the same work. Left
    free, the server writes other replies than the bot from the same prompt, because it counts the
    prompt's last 64 tokens in the repeat penalty's window (llama-server accepts the prompt into its
    sampler; llama-cpp-python's `generate`, and the embedded engine with it, only the reply) — in
    one run 27 tokens a reply longer on average, which moves replies/min by a quarter."""
    import httpx2
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    persona = settings.persona()
    extra = {"top_k": settings.top_k, "repeat_penalty": settings.repeat_penalty, "seed": settings.seed,
             "ignore_eos": True}
    ttfts: list[float] = []
    tokens = read = 0
    texts: dict[int, list[str]] = {}
    # a connection per request: llama-server (cpp-httplib) closes an idle kept-alive connection after
    # 5 s, and a request sent on it as it closes fails with "Server disconnected without sending a
    # response" (seen once in a test run); a loopback connect costs far less than a token
    fresh = DefaultAsyncHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0))
    async with AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600.0, http_client=fresh) as client:

        async def ask(history: list[dict], length: int) -> tuple[str, float, int]:
            sent, first, parts, usage, timings = time.perf_counter(), None, [], None, None
            stream = await client.chat.completions.create(
                model="bench", messages=history, stream=True, temperature=settings.temperature, top_p=settings.top_p,
                max_tokens=max(length, 1), stream_options={"include_usage": True}, extra_body=extra)
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                timings = (chunk.model_extra or {}).get("timings") or timings   # llama-server's own figures
                for choice in chunk.choices:
                    if choice.delta.content:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(choice.delta.content)
            read = timings.get("prompt_n", 0) if timings else 0
            return "".join(parts), (first or time.perf_counter()) - sent, usage if usage is not None else len(parts), read

        await ask([{"role": "system", "content": persona}, {"role": "user", "content": "hello"}],   # warm-up
                  settings.reply_max_tokens)

        async def person(i: int) -> None:
            nonlocal tokens, read
            history = [{"role": "system", "content": persona}]
            texts[i] = []
            for turn in range(turns_each):
                history.append({"role": "user", "content": messages[(i + turn) % len(messages)]})
                text, ttft, n, prompt_read = await ask(history, lengths[i][turn])
                history.append({"role": "assistant", "content": text})
                ttfts.append(ttft)
                tokens += n
                read += prompt_read
                texts[i].append(text.strip())

        started = time.perf_counter()
        await asyncio.gather(*(person(i) for i in range(chats)))
        wall = time.perf_counter() - started
    return {"figures": side_figures(ttfts, tokens, wall, read), "texts": texts}
