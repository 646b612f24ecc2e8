"""Backends by name. Each factory imports its heavy library only when that backend is asked for."""

from __future__ import annotations

import importlib

from apar_rt.backends.base import Backend, BackendUnavailable

_REGISTRY = {
    "torch": "apar_rt.backends.torch_backend:TorchBackend",
    "onnxruntime": "apar_rt.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "apar_rt.backends.tensorrt_backend:TensorRTBackend",
}

BACKEND_NAMES = tuple(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name`; ValueError lists the valid names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(_REGISTRY)}")
    module, _, attr = _REGISTRY[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("apar_rt"):
            raise BackendUnavailable(f"backend {name!r} is not implemented in this build of apar-rt") from None
        raise BackendUnavailable(f"backend {name!r} needs the Python package {e.name!r}, which is not "
                                 f"installed") from None
    return getattr(mod, attr)


__all__ = ["Backend", "BackendUnavailable", "BACKEND_NAMES", "backend_class"]
