"""Devices and dtypes: what a user names (`--device`, `--dtype`), checked before any model loads.

- `resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps")`: `auto` (the default
  everywhere) is `cuda` when CUDA is available, else `cpu`;
- `resolve_dtype("auto" | "float32" | "bfloat16" | "float16", device)`: also `fp32`/`bf16`/
  `fp16`; `auto` (the default everywhere) is bfloat16 on CUDA (float16 on a GPU without it),
  as vLLM and SGLang serve, and float32 elsewhere (torch's bfloat16 CPU kernels are slower than
  its float32 ones for these shapes); refused where the device cannot run it (a short probe: a
  matmul and a softmax);
- TF32 for float32 matrix products on CUDA: off unless asked (`--allow-tf32`, which sets
  `ADACTL_TF32=1`), since it changes float32 results; applied by `device_and_dtype`;
- `describe(device, dtype)`: the machine as benches print and record it (GPU name, or CPU
  model and thread count; dtype; torch version), and as step-cost profiles are keyed.

Every error says what was wrong and what to do, and is raised before anything is loaded.
Not here: loading models (models.py) or timing them (adactl.profiler).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda", "mps")


class DeviceError(ValueError):
    """A device or dtype the user named that this machine cannot run."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for a name; raises `DeviceError` naming the problem and the fix."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps ({e})") from None
    if device.type not in DEVICE_TYPES:
        raise DeviceError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} asked for CUDA, but this torch ({torch.__version__}) sees no CUDA device: "
                "use --device cpu (or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"device {name!r} does not exist: this machine has {count} CUDA device(s), 0..{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: MPS is not available on this machine; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for a name, checked to run on `device`; raises `DeviceError` otherwise."""
    if name == "auto":
        name = auto_dtype(torch.device(device))
    if isinstance(name, torch.dtype):
        dtype = name
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {name} is not supported: use one of {', '.join(DTYPE_CHOICES)}")
    else:
        if name not in DTYPES:
            raise DeviceError(
                f"unknown dtype {name!r}: use auto or one of {', '.join(DTYPE_CHOICES)} (or fp32, bf16, fp16)"
            )
        dtype = DTYPES[name]
    device = torch.device(device)
    if not _runs(device.type, device.index, dtype):
        raise DeviceError(
            f"{device} cannot run {dtype_name(dtype)} (a matmul and softmax in it failed): "
            f"use --dtype float32{' or bfloat16' if device.type == 'cpu' else ''}"
        )
    return dtype


def auto_dtype(device: torch.device) -> str:
    """What `--dtype auto` means on `device` (module docstring)."""
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if _runs(device.type, device.index, torch.bfloat16) else "float16"


@functools.cache
def _runs(device_type: str, index: int | None, dtype: torch.dtype) -> bool:
    """A matmul, softmax and embedding lookup in `dtype` on the device: what a forward needs."""
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return False
    try:
        device = torch.device(device_type, index) if index is not None else torch.device(device_type)
        x = torch.ones(4, 8, dtype=dtype, device=device)
        y = torch.softmax(x @ x.T, dim=-1)
        emb = torch.nn.functional.embedding(torch.zeros(2, dtype=torch.long, device=device), x)
        return bool(torch.isfinite((y.sum() + emb.sum()).float()).item())
    except (RuntimeError, TypeError):
        return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Machine:
    """The machine a run used, as plot titles, JSON metadata and profile keys name it."""

    device_type: str  # "cpu" | "cuda" | "mps"
    device_name: str  # GPU name, or the CPU model
    threads: int  # torch CPU threads (a CPU step's cost depends on them)
    dtype: str  # "float32" | "bfloat16" | "float16"
    torch: str  # torch version

    @property
    def label(self) -> str:
        """E.g. `NVIDIA H100 80GB HBM3, bfloat16, torch 2.11.0` or `CPU AMD EPYC (2 threads), float32, ...`."""
        where = self.device_name if self.device_type != "cpu" else f"CPU {self.device_name} ({self.threads} threads)"
        return f"{where}, {self.dtype}, torch {self.torch}"

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self) | {"label": self.label}


def describe(device: torch.device | str, dtype: torch.dtype) -> Machine:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple MPS"
    else:
        name = cpu_model()
    return Machine(device.type, name, torch.get_num_threads(), dtype_name(dtype), torch.__version__)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name and the vector instructions torch's kernels use on it ("AMD EPYC
    (AVX2)"): machines sold under one name differ by 2x in step cost with and without AVX-512
    (measured: the same "AMD EPYC" name, plain decoding at batch 1 in 59 and 118 ms)."""
    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()
    return f"{name} ({capability})" if capability else name


GRAPHS_ENV = "ADACTL_CUDA_GRAPHS"
"""Set to 0 to turn CUDA graphs off for every engine whose config leaves `graphs` unset
(what `--no-cuda-graphs` sets: `adactl.settings.device_environment`)."""
TF32_ENV = "ADACTL_TF32"
"""Set to 1 to let CUDA run float32 matrix products in TF32 (what `--allow-tf32` sets)."""


def graphs_wanted(device: torch.device) -> bool:
    """Whether an engine on `device` replays CUDA graphs by default: on CUDA, unless
    `ADACTL_CUDA_GRAPHS=0` (what `--no-cuda-graphs` sets)."""
    return device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"


def device_and_dtype(device: str | torch.device | None, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    """Both checked, in the order a user fixes them; on CUDA, TF32 as `ADACTL_TF32` says."""
    resolved = resolve_device(device)
    dt = resolve_dtype(dtype, resolved)
    if resolved.type == "cuda" and os.environ.get(TF32_ENV, "0") == "1":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return resolved, dt
