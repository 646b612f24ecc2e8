"""Which TensorRT: full TensorRT (`tensorrt`) where installed, else TensorRT for RTX (`tensorrt_rtx`).

Both have the same Python API. They differ in where a plan can run:

* full TensorRT builds on the GPU that will serve and its plan runs on GPUs of that compute
  capability (the builder needs a GPU);
* TensorRT-RTX builds ahead of time on the CPU, and its plan runs on the RTX-class compute
  capabilities it was built for: 8.6, 8.9 and 12.0 by default; 7.5 (Turing) only when asked for.
  It does not run on data-centre GPUs (A100, H100, H200).

`APAR_RT_TENSORRT=tensorrt|tensorrt_rtx` picks one explicitly. The manifest records the
library, its version and the plan's GPU targets; `check_device` refuses a GPU outside them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

LIBRARIES = ("tensorrt", "tensorrt_rtx")          # in order of preference
ENV_VAR = "APAR_RT_TENSORRT"
MIN_VERSION = {"tensorrt": (10, 0), "tensorrt_rtx": (1, 0)}
INSTALL_HINT = ("install TensorRT 10.x on a machine with an NVIDIA GPU (`pip install tensorrt-cu12`), or "
                "TensorRT for RTX, which builds on the CPU (`pip install tensorrt-rtx-cu13`); or build with "
                "--backend onnxruntime")
RTX_DEFAULT_TARGETS = ("8.6", "8.9", "12.0")       # TensorRT-RTX's portable set
RTX_OPTIONAL_TARGETS = ("7.5", "12.1")             # Turing (asked for explicitly); GB10


class TensorRTUnavailable(RuntimeError):
    """No usable TensorRT library here; the message says what is missing and what to install."""


class PlanNotForThisGPU(RuntimeError):
    """A plan was asked to run on a GPU outside the targets it was built for."""


@dataclass(frozen=True, slots=True)
class TensorRTLibrary:
    """An imported TensorRT library."""

    module: object      # the module itself (`trt` in TensorRT's samples)
    name: str           # "tensorrt" or "tensorrt_rtx"
    version: str        # module.__version__

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.rtx else 'TensorRT'} {self.version}"


def _version(v: str) -> tuple[int, int]:
    parts = (v.split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def load(name: str | None = None) -> TensorRTLibrary:
    """Import TensorRT: `name`, else $APAR_RT_TENSORRT, else the first of LIBRARIES that imports.

    Raises:
        TensorRTUnavailable: none imports (each library's import error is in the message), the
            name is unknown, or the version is too old.
    """
    name = name or os.environ.get(ENV_VAR) or None
    if name is not None and name not in LIBRARIES:
        raise TensorRTUnavailable(f"{ENV_VAR}={name!r} is not a TensorRT library; use one of "
                                  f"{', '.join(LIBRARIES)}")
    errors = []
    for candidate in ([name] if name else LIBRARIES):
        try:
            module = importlib.import_module(candidate)
        except ImportError as e:
            errors.append(f"import {candidate}: {e}")
            continue
        lib = TensorRTLibrary(module, candidate, str(module.__version__))
        need = MIN_VERSION[candidate]
        if _version(lib.version) < need:
            raise TensorRTUnavailable(f"{lib.label} is too old: apar-rt needs {candidate} >= "
                                      f"{'.'.join(map(str, need))}")
        return lib
    raise TensorRTUnavailable(f"no TensorRT library could be imported ({'; '.join(errors)}); {INSTALL_HINT}")


def _cc_member(lib: TensorRTLibrary, cc: str):
    return getattr(lib.module.ComputeCapability, "SM" + cc.replace(".", ""), None)


def resolve_targets(lib: TensorRTLibrary, requested=None, device_cc: str | None = None) -> list[str]:
    """The compute capabilities ("8.6", ...) a plan will be built for.

    TensorRT-RTX: `requested`, else RTX_DEFAULT_TARGETS; each must be one this library can target.
    Full TensorRT: the build GPU's compute capability (`device_cc`), which `requested` may only repeat.

    Raises:
        ValueError: a target the library cannot build for (the message lists the allowed ones).
        TensorRTUnavailable: full TensorRT without a GPU to build on.
    """
    requested = [str(t).strip() for t in (requested or ()) if str(t).strip()]
    if lib.rtx:
        allowed = [t for t in (*RTX_DEFAULT_TARGETS, *RTX_OPTIONAL_TARGETS) if _cc_member(lib, t) is not None]
        targets = requested or list(RTX_DEFAULT_TARGETS)
        bad = [t for t in targets if t not in allowed]
        if bad:
            raise ValueError(f"--gpu-targets: {', '.join(bad)} cannot be targeted by {lib.label}; allowed: "
                             f"{', '.join(allowed)} (RTX-class GPUs; data-centre GPUs need full TensorRT)")
        return sorted(set(targets), key=lambda t: tuple(map(int, t.split("."))))
    if device_cc is None:
        raise TensorRTUnavailable(f"{lib.label} builds on the GPU that will serve the plan, and no CUDA device "
                                  f"is visible; build on that GPU, or use TensorRT for RTX for RTX-class GPUs")
    if requested and requested != [device_cc]:
        raise ValueError(f"--gpu-targets {','.join(requested)}: {lib.label} builds for the GPU it runs on "
                         f"(compute capability {device_cc}); build on a GPU of the target kind instead")
    return [device_cc]


def apply_targets(lib: TensorRTLibrary, config, targets: list[str]) -> None:
    """Set the builder config's target compute capabilities (TensorRT-RTX; full TensorRT: nothing)."""
    if not lib.rtx:
        return
    config.num_compute_capabilities = len(targets)
    for i, t in enumerate(targets):
        if not config.set_compute_capability(_cc_member(lib, t), i):
            raise RuntimeError(f"{lib.label} refused compute capability {t} as a build target")


def check_device(engine: dict, device_cc: str, device_name: str = "this GPU") -> None:
    """Refuse to run a plan on a GPU outside the targets recorded in its manifest record.

    Args:
        engine: the manifest's engine record ({"library", "library_version", "gpu_targets", ...}).
        device_cc: the GPU's compute capability, e.g. "9.0".

    Raises:
        PlanNotForThisGPU: naming the GPU, its compute capability, and the plan's targets.
    """
    targets = list(engine.get("gpu_targets") or ())
    if device_cc in targets:
        return
    library = "TensorRT-RTX" if engine.get("library") == "tensorrt_rtx" else "TensorRT"
    hint = (" TensorRT-RTX plans run only on RTX-class GPUs; for data-centre GPUs (A100, H100, H200) build "
            "with full TensorRT on that GPU" if engine.get("library") == "tensorrt_rtx" else
            " rebuild the engine on this GPU")
    raise PlanNotForThisGPU(f"{engine.get('file', 'the plan')} was built by {library} "
                            f"{engine.get('library_version', '?')} for GPUs of compute capability "
                            f"{', '.join(targets) or '(none recorded)'}; {device_name} has compute capability "
                            f"{device_cc}.{hint}")
