"""Where llama.cpp runs a model — the CPU, or a GPU and how many layers — in one line for /status.

`n_gpu_layers` asks llama.cpp to offload layers, but a llama.cpp built without GPU support (the
set-up builds it with CUDA only where it finds the CUDA compiler, Makefile) ignores the setting
without a word, and an admin would believe the model is on the card. So the engine says where the
layers are: from llama.cpp's own answer to "can this offload" (true only where a GPU device
exists), the GPU backends it was built with and the devices they found (ggml's backend registry,
read through the library llama-cpp-python loaded) — so a CPU build and a CUDA build that sees no
GPU get different fixes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

_GPU_TYPES = {1, 2}      # ggml_backend_dev_type: 0 CPU, 1 GPU, 2 integrated GPU, 3 accelerator (BLAS …)
REBUILD = ("on a machine with an NVIDIA GPU and the CUDA compiler (nvcc), `make clean-venv setup` builds "
           "llama.cpp with CUDA")


@dataclass(frozen=True)
class Placement:
    """`layers_on_gpu` of the model's `layers` (its blocks and the output layer, as llama.cpp counts).

    `gpu_backends`: the GPU backends this llama.cpp was built with (CUDA, Vulkan, …); `gpus`: the
    GPU devices they found, None when the registry could not be read (then llama.cpp's own
    `offload_supported`, true only where a GPU device exists, decides)."""

    gpu_layers_asked: int
    layers: int | None
    offload_supported: bool
    gpus: tuple[str, ...] | None
    gpu_backends: tuple[str, ...] | None = None

    @property
    def layers_on_gpu(self) -> int:
        if not self.offload_supported or self.gpus == () or self.gpu_layers_asked == 0:
            return 0
        if self.layers is None:
            return self.gpu_layers_asked
        return self.layers if self.gpu_layers_asked < 0 else min(self.gpu_layers_asked, self.layers)

    @property
    def ignored(self) -> bool:
        """Layers were asked for the GPU and none can go there."""
        return self.gpu_layers_asked != 0 and self.layers_on_gpu == 0

    def describe(self) -> str:
        asked = "all" if self.gpu_layers_asked < 0 else str(self.gpu_layers_asked)
        if self.layers_on_gpu:
            of = f"{self.layers_on_gpu} of {self.layers} layers" if self.layers else f"{asked} layers"
            on_cpu = "" if self.layers is None or self.layers_on_gpu == self.layers else ", the rest on the CPU"
            return f"GPU ({', '.join(self.gpus) if self.gpus else 'device unknown'}): {of}{on_cpu}"
        if not self.ignored:
            spare = f"; {', '.join(self.gpus)} is free for it (n_gpu_layers = -1)" if self.gpus else ""
            return f"CPU{spare}"
        if self.gpu_backends == ():
            return (f"CPU — n_gpu_layers = {asked} is ignored: this llama.cpp was built without GPU support "
                    f"({REBUILD})")
        built = f" (built with {', '.join(self.gpu_backends)})" if self.gpu_backends else ""
        return f"CPU — n_gpu_layers = {asked} is ignored: llama.cpp finds no GPU on this machine{built}"


@functools.cache
def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """ggml's libraries as llama-cpp-python loaded them, with the signatures used here (once a
    process). By soname (`.so.0`): the wheel also ships `libggml.so` as a separate file, and opening
    that would map a second ggml with a registry of its own."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    ggml, base = ctypes.CDLL(str(lib / "libggml.so.0")), ctypes.CDLL(str(lib / "libggml-base.so.0"))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_description.restype = ctypes.c_char_p
    base.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_name.restype = ctypes.c_char_p
    base.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    return ggml, base


T = TypeVar("T")


def _read_registry(read: Callable[[ctypes.CDLL, ctypes.CDLL], T], what: str) -> T | None:
    """`read(ggml, base)`, or None when ggml's registry cannot be read (another build layout):
    unknown, never a guessed "none"."""
    try:
        return read(*_ggml())
    except (OSError, AttributeError, ImportError) as exc:
        log.debug("could not read llama.cpp's %s: %s", what, exc)
        return None


def _gpu_handles(ggml: ctypes.CDLL, base: ctypes.CDLL) -> list[int]:
    devices = (ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count()))
    return [dev for dev in devices if dev and base.ggml_backend_dev_type(dev) in _GPU_TYPES]


_NOT_GPU_BACKENDS = {"CPU", "BLAS", "RPC"}


def gpu_backends() -> tuple[str, ...] | None:
    """The GPU backends compiled into this llama.cpp (e.g. ('CUDA',)); () for a CPU build; None
    when the registry cannot be read."""
    def read(ggml, base):
        names = (base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)) or b""
                 for i in range(ggml.ggml_backend_reg_count()))
        return tuple(n for n in (b.decode("utf-8", "replace") for b in names) if n and n.upper() not in _NOT_GPU_BACKENDS)

    return _read_registry(read, "backends")


def gpu_devices() -> tuple[str, ...] | None:
    """The GPUs llama.cpp can offload to (their descriptions, e.g. 'NVIDIA H100 80GB HBM3'); () when
    there are none; None when the registry cannot be read."""
    return _read_registry(lambda ggml, base: tuple(
        (base.ggml_backend_dev_description(dev) or b"GPU").decode("utf-8", "replace")
        for dev in _gpu_handles(ggml, base)), "devices")


def gpu_free_bytes() -> int | None:
    """Free memory on the first GPU llama.cpp sees, as its backend reports it (CUDA: cudaMemGetInfo);
    None where there is none or the registry cannot be read."""
    def read(ggml, base):
        for dev in _gpu_handles(ggml, base)[:1]:
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            return int(free.value)
        return None

    return _read_registry(read, "GPU memory")


def placement(n_gpu_layers: int, layers: int | None = None) -> Placement:
    """Where a model with `layers` layers (None: not loaded yet) runs with this `n_gpu_layers`."""
    import llama_cpp

    return Placement(gpu_layers_asked=n_gpu_layers, layers=layers,
                     offload_supported=bool(llama_cpp.llama_supports_gpu_offload()), gpus=gpu_devices(),
                     gpu_backends=gpu_backends())


def model_layers(model) -> int:
    """The layers llama.cpp can offload for a loaded model: its blocks and the output layer."""
    import llama_cpp

    return int(llama_cpp.llama_model_n_layer(model)) + 1


# room a model needs on the card beyond its file: KV cache and compute buffers (a cycle's own
# models run with small contexts)
ROOM = 1.25


def offload_fits(file_bytes: int, free_bytes: int | None, supported: bool) -> bool:
    """Whether a model file of `file_bytes` goes on a GPU with `free_bytes` free, whole."""
    return supported and free_bytes is not None and file_bytes * ROOM <= free_bytes


def side_job_gpu_layers(model_file: Path) -> int:
    """n_gpu_layers for a model the learning cycle loads for itself (evals, self-refinement, contrast
    pairs): every layer on the GPU when llama.cpp can offload and the card has room for the whole
    file now, else 0 (the CPU). A 7B's eval suite on CPU cores takes hours; on a card it is minutes.
    Decided at each load, so a second model sees what the first one took."""
    import llama_cpp

    supported = bool(llama_cpp.llama_supports_gpu_offload())
    fits = offload_fits(Path(model_file).stat().st_size, gpu_free_bytes() if supported else None, supported)
    return -1 if fits else 0
