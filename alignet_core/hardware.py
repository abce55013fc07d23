"""The one place that picks hardware: torch device, autocast dtype, where k-means runs."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from alignet_core.config.base import device_list_problem
from alignet_core.errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch


#: device nodes one of which a GPU that torch can use needs: NVIDIA's driver, AMD's ROCm, WSL2's GPU bridge
GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def gpu_driver_present(paths: tuple[str, ...] = GPU_DRIVER_PATHS) -> bool:
    """Whether this machine has a GPU driver torch could use. Without one torch sees no GPU, so asking it
    (importing torch: seconds) is skipped where only the answer is needed, as when a stage's key is planned."""
    return any(os.path.exists(p) for p in paths)


def device_type(setting: str) -> str:
    """`resolve_device(setting).type` ('cpu' or 'cuda'), without importing torch where no GPU driver exists."""
    if setting == "cpu" or (setting == "auto" and not gpu_driver_present()):
        return "cpu"
    return resolve_device(setting).type


def resolve_device(setting: str) -> "torch.device":
    """'auto' → cuda when available else cpu; 'cuda' without a GPU is an error, never a silent fallback."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if setting not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {setting!r}")
    return torch.device(setting)


def resolve_devices(settings: list[str], field: str = "embed.devices") -> "list[torch.device]":
    """Devices for one worker each: 'cpu' (may repeat) or 'cuda' / 'cuda:<i>', checked before any work.

    `ConfigError` naming `field` for an unknown string, an empty list, a mix of cpu and cuda (rows
    would be computed in different precisions: bf16 autocast on GPUs, float32 on CPU), a CUDA device
    when torch sees no GPU, or an index beyond the GPUs torch sees. 'cuda' means 'cuda:0'.
    """
    import torch

    problem = device_list_problem(settings)
    if problem:
        raise ConfigError(f"{field}: {problem}")
    devices = [torch.device("cuda:0" if s == "cuda" else s) for s in settings]
    if devices[0].type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{field}: {list(settings)} asks for CUDA but torch sees no CUDA GPU; use 'cpu' or null")
        beyond = [str(d) for d in devices if d.index >= count]
        if beyond:
            raise ConfigError(f"{field}: {beyond} asked for, but torch sees {count} CUDA GPU(s): "
                              f"cuda:0 .. cuda:{count - 1}")
    return devices


def process_group_backend(device: "torch.device") -> Literal["nccl", "gloo"]:
    """The `torch.distributed` backend for ranks on `device`'s kind: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch (its intra-op pool, OpenMP, MKL, oneDNN) on `n` threads for the block; restored after. A float32
    reduction split over another number of threads adds its partial sums in another order, so two runs are
    compared bit for bit only on the same thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rank_threads(device: "torch.device", local_ranks: int) -> int | None:
    """CPU threads for each of `local_ranks` training ranks on one machine, or None to leave torch's choice.

    CPU ranks share the machine's usable cores (⌊cores / ranks⌋, at least 1): torchrun's default of one
    thread each would leave cores idle, and every rank taking all cores oversubscribes them. GPU ranks: None
    (torchrun's one thread; the GPU computes, DataLoader workers decode)."""
    if device.type == "cuda":
        return None
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks))


def autocast_dtype(device: "torch.device") -> "torch.dtype | None":
    """bf16 autocast on GPUs that support it; full float32 on CPU (where bf16 is slower)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class ComputeIdentity:
    """Where a computation runs, as far as it changes the numbers: the device kind ('cpu', 'cuda')
    and the compute dtype ('float32', or 'bfloat16' under autocast on GPUs). Part of the keys and the
    provenance of stages whose rows depend on it: GPU rows are bf16-autocast, CPU rows float32."""

    device: str
    dtype: str


def compute_identity(device: "torch.device") -> ComputeIdentity:
    """The `ComputeIdentity` of autocast computation on `device` (see `autocast_dtype`)."""
    import torch

    return ComputeIdentity(device=device.type, dtype=str(autocast_dtype(device) or torch.float32).removeprefix("torch."))


def faiss_gpu_available(setting: str = "auto") -> bool:
    """True when FAISS is installed, was built with GPU support, sees a GPU, and the config allows it."""
    if setting == "never":
        return False
    try:
        import faiss
    except ImportError:  # no FAISS at all (a GPU image may have none): torch's k-means can still use the GPU
        return False

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return n > 0


@dataclass(frozen=True)
class KMeansBackend:
    """Where k-means runs: FAISS (device "cpu" or "gpu", its own GPUs) or torch on a torch device."""

    library: Literal["faiss", "torch"]
    device: str


def kmeans_backend(setting: str = "auto") -> KMeansBackend:
    """FAISS on its GPUs when it has any; else torch on CUDA when torch sees a GPU (the pip
    FAISS wheels are CPU-only); else FAISS on the CPU. 'never' is always FAISS on the CPU."""
    if setting == "never":
        return KMeansBackend("faiss", "cpu")
    if faiss_gpu_available(setting):
        return KMeansBackend("faiss", "gpu")
    if not gpu_driver_present():
        return KMeansBackend("faiss", "cpu")
    import torch

    if torch.cuda.is_available():
        return KMeansBackend("torch", "cuda")
    return KMeansBackend("faiss", "cpu")


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic torch kernels inside the block (restored after), so that a fit gives
    bit-identical weights run after run: multithreaded CPU index-add backward otherwise sums
    in a varying order."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
