"""llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`), run for a test.

A real server process on a free loopback port, started from a config file
(`lineage.server_config`) and stopped, paused (SIGSTOP: it accepts connections and answers
nothing, as a hung server does) or killed by the test. The models load with llama.cpp's extra
buffer types off, as the embedded engine loads them (`engine.llama.model_params`: a VM that
reports AMX segfaults on Q4_1 weights otherwise); nothing else about the server is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ouro.bench.llama_server import free_port, llama_server_binary
from tests.helpers.layers import ROOT

__all__ = ["LlamaCppServer", "LlamaServer", "free_port", "llama_server_binary"]

LAUNCH = ("import sys; from engine.llama import model_params; from llama_cpp.server.__main__ import main\n"
          "with model_params(extra_buffers=False):\n    main()\n")


class LlamaServer:
    """`with LlamaServer(config_file) as server:` — `server.url` is its /v1 address."""

    def __init__(self, config_file: Path, log_file: Path) -> None:
        config = json.loads(Path(config_file).read_text())
        self.port = int(config["port"])
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.config_file = Path(config_file)
        self.log_file = Path(log_file)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> LlamaServer:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--config_file", str(self.config_file)],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/models", timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not come up in {timeout_s:g} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)     # a paused server cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- llama.cpp's own llama-server, built from the source llama-cpp-python vendors ----------------
# (ouro/bench/llama_server.py locates or builds it: the concurrent bench runs it too)


class LlamaCppServer(LlamaServer):
    """llama-server in router mode over a models folder: each sub-folder with a GGUF is a model named
    after the folder (a generation id), loaded on first use, at most `models_max` at once."""

    def __init__(self, binary: Path, models_dir: Path, log_file: Path, *, n_ctx: int = 1024,
                 threads: int = 1, models_max: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_file = Path(log_file)
        self.proc = None
        self.argv = [str(binary), "--models-dir", str(models_dir), "--models-max", str(models_max),
                     "--host", "127.0.0.1", "--port", str(self.port), "-c", str(n_ctx), "-t", str(threads),
                     "--no-webui", "--no-repack"]   # the router passes it on; AMX repacking faults on some VMs

    def start(self, timeout_s: float = 120.0) -> LlamaCppServer:
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/models", timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server did not come up in {timeout_s:g} s:\n{self.log()[-3000:]}")


if __name__ == "__main__":     # `python -m tests.helpers.llama_server`: build it (the set-up's step)
    print(llama_server_binary())
