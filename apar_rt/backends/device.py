"""The one check of a `--device` value against the GPUs this machine has (torch's view of them)."""

from __future__ import annotations

import torch

from apar_rt.backends.base import BackendUnavailable


def resolve_device(device: str | None, *, runner: str = "the torch backend", cuda_only: bool = False,
                   cuda=torch.cuda) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a torch.device; a CUDA device always has an index ("cuda" is the
    current device: torch.cuda.set_device refuses a device without one).

    Args:
        device: the value given; None, "" or "auto" mean cuda when a GPU is visible (always cuda
            when `cuda_only`), else cpu.
        runner: what runs there, named in errors ("the tensorrt backend", "training").
        cuda_only: the backend runs only on CUDA (cpu is an error).
        cuda: what answers is_available / device_count / current_device (torch.cuda; tests pass
            a stand-in machine).
    Raises:
        ValueError: not a device name, or a device type the backend does not run on.
        BackendUnavailable: no GPU visible, or no GPU with that index.
    """
    allowed = "cuda or cuda:N" if cuda_only else "cpu, cuda or cuda:N"
    if device in (None, "", "auto"):
        device = "cuda" if cuda_only or cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use {allowed}") from None
    if dev.type == "cpu" and not cuda_only:
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{runner} runs on {allowed}, not {device!r}")
    if not cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        hint = "" if cuda_only else "; use --device cpu"
        raise BackendUnavailable(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} "
                                 f"(its CUDA: {built}){hint}")
    count = cuda.device_count()
    index = dev.index if dev.index is not None else cuda.current_device()
    if index >= count:
        raise BackendUnavailable(f"--device {device}: this machine has {count} CUDA device(s), "
                                 f"cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)
