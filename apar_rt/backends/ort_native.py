"""The onnxruntime CPU backend's native op library: `apar.ort::TreePagedAttention`.

`plugins/onnxruntime/tree_paged_attention.cpp` computes the op contract's function over the CPU
graph's head-major KV pools, reading every key and value where it lies in the pool; the
standard-op bodies (`attention_body.attend_decode`, `attend_small`) gather each sequence's whole
context out of the pool first, in every layer and step. The backend's graph rewrite runs the node
for every step whose sequences have at most SMALL_MAX_QUERY new tokens (decodes, forks, draft
trees, short chunks) when the library is loaded (`ort_attention.rewrite(model, native=True)`);
longer prefill chunks keep the general body, whose matmuls suit them better. Where the layer's q
and k come through `ort_rotary`'s fused RotaryEmbedding, the node is `TreePagedAttentionRope`,
which rotates them itself and outputs the rotated keys (the step's new K): one node per layer.
The rewrite also hands each node the step's slot mapping (`ort_attention.SLOT_INPUT`): the node
stores its layer's new keys and values in the pools itself, in place (the pools are memory the
backend binds), so a step the native body takes needs no write of the K/V after the run.

The library is compiled here, against ONNX Runtime's public C/C++ API headers, which are fetched
at build time and never committed: Debian's `libonnxruntime-dev` package (a pinned version and
sha256, from deb.debian.org), of which only `usr/include/onnxruntime/` is unpacked (into
HEADERS_CACHE, git-ignored, so that a rebuild needs no network). Nothing is
linked: the runtime that loads the library hands it the API table (`RegisterCustomOps`), and an
older header's API version is served by every newer runtime. `python -m apar_rt.backends.ort_native`
builds it (the README's setup commands run it); without it the backend runs the standard-op bodies.

`APAR_RT_ORT_OPS` overrides where the library is looked for: a path, or `off`.

The built library is portable across the machines it may be copied to (an image built on one
host, run on another): on x86-64 it targets x86-64-v3 (AVX2 and FMA: the kernel's speed, within
2% of -march=native here) when the building CPU has it, else the baseline (the kernel then works
in four-lane vectors instead of eight, as on aarch64). A sidecar file
(`<library>.json`) records that target and the source's sha256; the built library is offered
only on a CPU that has the target's features and while the source is unchanged, so a copied
library never meets an illegal instruction and a stale one is rebuilt (`--if-stale`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OP_DOMAIN = "apar.ort"
OP_TYPE = "TreePagedAttention"
ROPE_OP_TYPE = "TreePagedAttentionRope"   # the same with the layer's rotary embedding inside
ENV_VAR = "APAR_RT_ORT_OPS"
ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "plugins" / "onnxruntime" / "tree_paged_attention.cpp"
BUILT = ROOT / "plugins" / "build" / "libapar_ort_ops.so"
HEADERS_CACHE = ROOT / "plugins" / "build" / "onnxruntime-headers"   # the fetched headers, kept for rebuilds
HEADERS_URL = ("https://deb.debian.org/debian/pool/main/o/onnxruntime/"
               "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADERS_DIR = "usr/include/onnxruntime/"
MIN_ONNXRUNTIME = (1, 21)   # the headers' API version: an older runtime cannot serve the library


def library(onnxruntime_version: str | None = None) -> Path | None:
    """The library to load: $APAR_RT_ORT_OPS (a path; `off`: none), else the built one if present;
    None under an onnxruntime older than MIN_ONNXRUNTIME (`onnxruntime_version`, default: the
    installed one)."""
    if onnxruntime_version is None:
        import onnxruntime

        onnxruntime_version = onnxruntime.__version__
    if tuple(int(x) for x in onnxruntime_version.split(".")[:2]) < MIN_ONNXRUNTIME:
        return None
    env = os.environ.get(ENV_VAR)
    if env:
        if env.lower() == "off":
            return None
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env} is not a file (a path to libapar_ort_ops.so, or 'off')")
        return path.resolve()
    why = unusable(BUILT)
    if why:
        if BUILT.is_file():
            import logging

            logging.getLogger(__name__).warning("not using %s: %s", BUILT, why)
        return None
    return BUILT


# x86-64-v3's features as /proc/cpuinfo names them (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE)
_X86_64_V3 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"})


def _cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def cpu_target() -> str:
    """The -march this machine builds for: x86-64-v3 where it has those features, else ''."""
    import platform

    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and flags is not None and _X86_64_V3 <= flags:
        return "x86-64-v3"
    return ""


def _source_sha256() -> str:
    import hashlib

    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def unusable(lib: Path) -> str | None:
    """Why the built library `lib` is not to be loaded here (absent, no record of its build, built
    from another source, or for CPU features this machine lacks), or None."""
    import json

    if not lib.is_file():
        return "not built"
    try:
        record = json.loads(lib.with_name(lib.name + ".json").read_text())
    except (OSError, ValueError):
        return "no build record beside it; rebuild it"
    if record.get("source_sha256") != _source_sha256():
        return f"built from another {SOURCE.name}; rebuild it"
    if record.get("march") == "x86-64-v3":
        flags = _cpu_flags()
        if flags is None or not _X86_64_V3 <= flags:
            return f"built for x86-64-v3, which this CPU lacks ({', '.join(sorted(_X86_64_V3 - (flags or set())))})"
    return None


def _deb_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """The (name, bytes) of the first member of the ar archive `deb` whose name starts with `prefix`."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    at = 8
    while at + 60 <= len(deb):
        header = deb[at:at + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return name, deb[at + 60:at + 60 + size]
        at += 60 + size + (size & 1)
    raise ValueError(f"the package has no {prefix}* member")


def fetch_headers(dest: Path, url: str = HEADERS_URL, sha256: str = HEADERS_SHA256) -> Path:
    """Download the pinned headers package, check its sha256, and unpack its headers into `dest`;
    returns the include folder."""
    import hashlib
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        deb = r.read()
    got = hashlib.sha256(deb).hexdigest()
    if got != sha256:
        raise ValueError(f"{url}: sha256 {got}, expected {sha256}")
    return unpack_headers(deb, dest)


def unpack_headers(deb: bytes, dest: Path) -> Path:
    """Write the HEADERS_DIR/**.h files of the Debian package `deb` into `dest` (nothing else;
    no path may leave `dest`); returns `dest`."""
    import io
    import tarfile

    name, data = _deb_member(deb, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            path = m.name.lstrip("./")
            if not (m.isfile() and path.startswith(HEADERS_DIR) and path.endswith(".h")):
                continue
            rel = path[len(HEADERS_DIR):]
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"unsafe path {m.name!r} in {name}")
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
    if not (dest / "onnxruntime_cxx_api.h").is_file():
        raise ValueError("the package holds no onnxruntime_cxx_api.h")
    return dest


def cached_headers(fetch: bool = True, log=print) -> Path | None:
    """HEADERS_CACHE, the pinned headers unpacked once (fetched now if absent and `fetch`), or
    None when absent and not fetched."""
    import shutil
    import tempfile

    if (HEADERS_CACHE / "onnxruntime_cxx_api.h").is_file():
        return HEADERS_CACHE
    if not fetch:
        return None
    log(f"fetching ONNX Runtime's API headers from {HEADERS_URL}")
    HEADERS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="apar-ort-headers-", dir=HEADERS_CACHE.parent) as tmp:
        fetch_headers(Path(tmp) / "include")
        shutil.rmtree(HEADERS_CACHE, ignore_errors=True)   # a partial one, or none
        try:
            (Path(tmp) / "include").replace(HEADERS_CACHE)   # whole or not at all
        except OSError:
            if not (HEADERS_CACHE / "onnxruntime_cxx_api.h").is_file():   # else another build put it there
                raise
    return HEADERS_CACHE


def build(out: Path = BUILT, include: Path | None = None, compiler: str | None = None, log=print,
          march: str | None = None) -> Path:
    """Compile the library into `out` (with `cached_headers()` unless `include` names a folder
    holding onnxruntime_cxx_api.h), for `march` (default `cpu_target()`; "" for the compiler's
    baseline), and write its build record beside it."""
    import json
    import shutil
    import subprocess

    cxx = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) found; install one, or run without the native op")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if include is None:
        include = cached_headers(log=log)
    partial = out.with_name(out.name + ".partial")
    march = cpu_target() if march is None else march
    # -ffp-contract=fast: the kernel's `a += x * y` on vectors becomes one FMA
    cmd = [cxx, "-O3", "-ffp-contract=fast", *([f"-march={march}"] if march else []), "-std=c++17",
           "-shared", "-fPIC", "-fvisibility=hidden", f"-I{include}", str(SOURCE), "-o", str(partial)]
    log(" ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
    partial.replace(out)
    out.with_name(out.name + ".json").write_text(json.dumps({"march": march, "source_sha256": _source_sha256()}))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m apar_rt.backends.ort_native",
                                 description="Build the onnxruntime CPU backend's native op library "
                                             f"({OP_DOMAIN}::{OP_TYPE}) into {BUILT.relative_to(ROOT)}.")
    ap.add_argument("--out", type=Path, default=BUILT, help="library path (default: %(default)s)")
    ap.add_argument("--include", type=Path, help="a folder holding ONNX Runtime's onnxruntime_cxx_api.h "
                                                  "(default: the pinned headers package, fetched once into "
                                                  f"{HEADERS_CACHE.relative_to(ROOT)})")
    ap.add_argument("--if-stale", action="store_true",
                    help="build only when the library cannot be used as it is (absent, built from another "
                         "source or for another CPU)")
    ap.add_argument("--optional", action="store_true",
                    help="on failure, say why and exit 0 (the backend then runs its standard-op bodies)")
    args = ap.parse_args(argv)
    if args.if_stale and unusable(args.out) is None:
        print(f"{args.out} is up to date")
        return 0
    try:
        print(f"built {build(args.out, args.include)}")
    except Exception as e:
        print(f"the native op library was not built: {e}", file=sys.stderr)
        return 0 if args.optional else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
