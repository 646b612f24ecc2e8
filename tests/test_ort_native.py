"""The native op library's build bookkeeping (apar_rt/backends/ort_native.py): which built library
may be loaded on this machine, and reading the headers package. The op's math is tested in
tests/test_tree_attention.py (impl "onnx-ort-native") and the engine in test_onnxruntime_backend.py."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from apar_rt.backends import ort_native


def _fake_build(tmp_path, **record):
    lib = tmp_path / "libapar_ort_ops.so"
    lib.write_bytes(b"\x7fELF")
    if record:
        lib.with_name(lib.name + ".json").write_text(json.dumps(record))
    return lib


def test_a_built_library_is_offered_only_where_it_can_run(tmp_path, monkeypatch):
    sha = ort_native._source_sha256()
    assert ort_native.unusable(tmp_path / "absent.so") == "not built"
    assert "no build record" in ort_native.unusable(_fake_build(tmp_path))
    assert "another tree_paged_attention.cpp" in ort_native.unusable(_fake_build(tmp_path, march="", source_sha256="0" * 64))
    assert ort_native.unusable(_fake_build(tmp_path, march="", source_sha256=sha)) is None
    lib = _fake_build(tmp_path, march="x86-64-v3", source_sha256=sha)
    monkeypatch.setattr(ort_native, "_cpu_flags", lambda: frozenset({"sse4_2", "avx", "fma"}))
    why = ort_native.unusable(lib)
    assert why.startswith("built for x86-64-v3, which this CPU lacks") and "avx2" in why
    monkeypatch.setattr(ort_native, "_cpu_flags", lambda: ort_native._X86_64_V3 | {"sse4_2"})
    assert ort_native.unusable(lib) is None
    monkeypatch.setattr(ort_native, "_cpu_flags", lambda: None)
    assert "lacks" in ort_native.unusable(lib)


def test_headers_come_out_of_the_package_and_nothing_else(tmp_path):
    """The .deb's data member is read as an ar archive; only usr/include/onnxruntime/*.h is unpacked."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in (("./usr/include/onnxruntime/onnxruntime_cxx_api.h", b"// api"),
                           ("./usr/include/onnxruntime/core/providers/resource.h", b"// r"),
                           ("./usr/lib/libx.so", b"ELF")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))

    def member(name: str, body: bytes) -> bytes:
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return head + body + (b"\n" if len(body) % 2 else b"")

    deb = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", data.getvalue())
    name, got = ort_native._deb_member(deb, "data.tar")
    assert name == "data.tar.xz" and got == data.getvalue()
    out = ort_native.unpack_headers(deb, tmp_path / "include")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "core/providers/resource.h", "onnxruntime_cxx_api.h"]
    assert (out / "onnxruntime_cxx_api.h").read_bytes() == b"// api"
    with pytest.raises(ValueError, match="no control.tar"):
        ort_native._deb_member(deb, "control.tar")
    with pytest.raises(ValueError, match="not a Debian package"):
        ort_native._deb_member(b"PK\x03\x04", "data.tar")
