"""The TreePagedAttention TensorRT plugin, and the one way apar-rt loads a plugin.

The loading contract (`load_plugin`), shared by the builder, the tensorrt backend and `--check`:

* `"python"`: register apar-rt's Python-implemented IPluginV3 creator (`TreePagedAttentionCreator`
  below) with the library's plugin registry;
* a path to a shared library: `IPluginRegistry.load_library` on its absolute path (a C++ library
  registers its creator with `REGISTER_TENSORRT_PLUGIN` when loaded);

then, either way, the registry must hold a creator named `TreePagedAttention`, version `1`,
namespace `apar`, or PluginError says what the registry holds instead. The manifest records
the kind (and for a library its absolute path and sha256, which the backend checks).

The plugin's fields are the ONNX node's numeric attributes (apar_rt/export/op.py). Its output is
q's shape and type. Its enqueue launches the GPU kernel of `apar.TreePagedAttention`
(`apar_rt.kernels.tree_attention`, the one implementation the torch backend on CUDA also uses)
on TensorRT's stream, over TensorRT's device buffers wrapped as torch tensors (no copies).
Building needs no GPU; enqueue runs only on a GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from apar_rt.export.op import OP_ATTRIBUTES, OP_INPUTS, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

CREATOR = f"{PLUGIN_NAMESPACE}::{OP_TYPE} version {PLUGIN_VERSION}"
INT_FIELDS = tuple(n for n, kind in OP_ATTRIBUTES if kind == "i")      # num_heads, num_kv_heads, ...
FLOAT_FIELDS = tuple(n for n, kind in OP_ATTRIBUTES if kind == "f")    # scale
PYTHON = "python"
_REGISTERED: dict[str, object] = {}    # library name -> our creator (kept alive: TensorRT holds a raw pointer)


class PluginError(RuntimeError):
    """The plugin cannot be loaded, or does not provide apar::TreePagedAttention version 1."""


def find_creator(lib):
    """The registry's apar::TreePagedAttention v1 creator, or None."""
    return lib.module.get_plugin_registry().get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_plugin(lib, spec: str, *, expect_sha256: str | None = None) -> dict:
    """Make apar::TreePagedAttention v1 available to `lib` (a TensorRTLibrary); returns its record.

    Args:
        spec: "python" or the path of a shared library.
        expect_sha256: refuse a library whose sha256 differs (the backend passes the recorded one).

    Returns:
        {"kind": "python"} or {"kind": "library", "library": absolute path, "sha256": ...}, plus "creator".

    Raises:
        PluginError: naming the library and what is wrong.
    """
    trt = lib.module
    registry = trt.get_plugin_registry()
    if spec == PYTHON:
        if lib.rtx:
            raise PluginError(f"--plugin python cannot be used with {lib.label}: its ONNX parser aborts the process "
                              f"(\"terminate called without an active exception\") right after creating a "
                              f"Python-implemented IPluginV3, any plugin (checked with 1.7.1). Use full TensorRT, "
                              f"or a C++ plugin library built against TensorRT-RTX's headers")
        if lib.name not in _REGISTERED:
            creator = _creator_class(trt)()
            if not registry.register_creator(creator, PLUGIN_NAMESPACE):
                raise PluginError(f"{lib.label} refused to register the Python creator {CREATOR}")
            _REGISTERED[lib.name] = creator
        record = {"kind": PYTHON}
    else:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugin library {spec!r} does not exist (pass --plugin python or the path of a "
                              f"library that registers {CREATOR})")
        digest = _sha256(path)
        if expect_sha256 and digest != expect_sha256:
            raise PluginError(f"plugin library {path} has changed since the plan was built (sha256 {digest[:16]}... "
                              f"instead of {expect_sha256[:16]}...); rebuild the plan or restore the library")
        before = {(c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators}
        if find_creator(lib) is None and registry.load_library(str(path)) is None:
            raise PluginError(f"{lib.label} could not load the plugin library {path} (see the TensorRT log)")
        if find_creator(lib) is None:
            new = sorted({(c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators} - before)
            got = ", ".join(f"{ns}::{n} version {v}" for n, v, ns in new) or "no creators"
            raise PluginError(f"plugin library {path} loaded but does not register {CREATOR} (it registered "
                              f"{got})")
        record = {"kind": "library", "library": str(path), "sha256": digest}
    if find_creator(lib) is None:
        raise PluginError(f"{CREATOR} is not in {lib.label}'s plugin registry after loading {spec!r}")
    record["creator"] = CREATOR
    return record


def spec_of(record: dict | None) -> str | None:
    """The `load_plugin` spec of a manifest's plugin record (None: no plugin)."""
    if not record:
        return None
    return PYTHON if record.get("kind") == PYTHON else record["library"]


# ---- the Python IPluginV3 -----------------------------------------------------------------------

_CLASSES: dict[int, tuple] = {}


def _creator_class(trt):
    """(Creator class) for one TensorRT module; the plugin class is built alongside it."""
    key = id(trt)
    if key not in _CLASSES:
        _CLASSES[key] = _define(trt)
    return _CLASSES[key][1]


def _field_values(fc) -> dict:
    """{name: python value} of a PluginFieldCollection (only our numeric fields)."""
    out = {}
    for f in fc:
        if f.name in INT_FIELDS:
            out[f.name] = int(np.asarray(f.data).reshape(-1)[0])
        elif f.name in FLOAT_FIELDS:
            out[f.name] = float(np.asarray(f.data).reshape(-1)[0])
    return out


def _define(trt):
    """Define the plugin and creator classes against `trt` (tensorrt or tensorrt_rtx)."""
    float_types = {trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16}
    n_in = len(OP_INPUTS)                   # q k v k_cache v_cache block_tables context_lens query_start mask
    index_inputs = {OP_INPUTS.index(n) for n in ("block_tables", "context_lens", "query_start")}
    mask_input = OP_INPUTS.index("mask")

    class TreePagedAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                   trt.IPluginV3OneRuntime):
        """apar.TreePagedAttention as an IPluginV3 (fields: the node's numeric attributes)."""

        def __init__(self, fields: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            missing = [n for n in (*INT_FIELDS, *FLOAT_FIELDS) if n not in fields]
            if missing:
                raise ValueError(f"{CREATOR}: missing fields {missing}")
            if fields["num_heads"] % fields["num_kv_heads"]:
                raise ValueError(f"{CREATOR}: num_heads {fields['num_heads']} is not a multiple of num_kv_heads "
                                 f"{fields['num_kv_heads']}")
            self.fields = dict(fields)
            self.num_outputs = 1
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_name = OP_TYPE
            self.plugin_version = PLUGIN_VERSION
            self.timing_cache_id = ""

        # core / build
        def get_capability_interface(self, type):
            return self

        def clone(self):
            return TreePagedAttentionPlugin(self.fields)

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in index_inputs:
                return desc.type == trt.DataType.INT32
            if pos == mask_input:
                return desc.type == trt.DataType.BOOL
            if pos == 0:
                return desc.type in float_types
            return desc.type == in_out[0].desc.type       # k, v, pools, out: like q

        def configure_plugin(self, inputs, outputs):
            if len(inputs) != n_in:
                raise ValueError(f"{CREATOR} takes {n_in} inputs, got {len(inputs)}")

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def get_fields_to_serialize(self):
            fields = [trt.PluginField(n, np.array([self.fields[n]], np.int32), trt.PluginFieldType.INT32)
                      for n in INT_FIELDS]
            fields += [trt.PluginField(n, np.array([self.fields[n]], np.float32), trt.PluginFieldType.FLOAT32)
                       for n in FLOAT_FIELDS]
            return trt.PluginFieldCollection(fields)

        # runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            _enqueue(trt, self.fields, input_desc, output_desc, inputs, outputs, stream)

    class TreePagedAttentionCreator(trt.IPluginCreatorV3One):
        """Creates TreePagedAttentionPlugin from the ONNX node's attributes."""

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            fields = [trt.PluginField(n, np.array([], np.int32), trt.PluginFieldType.INT32) for n in INT_FIELDS]
            fields += [trt.PluginField(n, np.array([], np.float32), trt.PluginFieldType.FLOAT32)
                       for n in FLOAT_FIELDS]
            self.field_names = trt.PluginFieldCollection(fields)

        def create_plugin(self, name, fc, phase):
            return TreePagedAttentionPlugin(_field_values(fc))

    return TreePagedAttentionPlugin, TreePagedAttentionCreator


# ---- enqueue: TensorRT's buffers as torch tensors, then the kernel ------------------------------------

class _DeviceArray:
    """A device buffer described by __cuda_array_interface__, for torch.as_tensor (zero copy)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (int(ptr), False),
                                         "version": 3, "strides": None}


def _typestr(trt, dtype) -> str:
    return {trt.DataType.FLOAT: "<f4", trt.DataType.HALF: "<f2", trt.DataType.INT32: "<i4",
            trt.DataType.BOOL: "|b1", trt.DataType.BF16: "<f2"}[dtype]


def _enqueue(trt, fields, input_desc, output_desc, inputs, outputs, stream) -> None:
    """Launch the TreePagedAttention kernel on TensorRT's stream over TensorRT's buffers."""
    import torch

    from apar_rt.kernels.tree_attention import tree_paged_attention

    def wrap(desc, ptr):
        t = torch.as_tensor(_DeviceArray(ptr, tuple(desc.dims), _typestr(trt, desc.type)), device="cuda")
        return t.view(torch.bfloat16) if desc.type == trt.DataType.BF16 else t

    args = [wrap(d, p) for d, p in zip(input_desc, inputs)]
    out = wrap(output_desc[0], outputs[0])
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tree_paged_attention(*args, fields["scale"], out=out)
