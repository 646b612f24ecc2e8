"""Export our Llama, one packed step, to ONNX with one `apar.TreePagedAttention` node per layer.

The TorchScript exporter (opset 18) traces `LlamaForCausalLM.forward`; a registered symbolic
turns each `apar::tree_paged_attention` call into our node, and the model-local function
(`apar_rt.export.op.attention_function`) is added afterwards so that any ONNX consumer can run it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from apar_rt.export import op as aop
from apar_rt.export import step_io

DEFAULT_OPSET = 18
EXTERNAL_DATA_SUFFIX = ".data"    # model.onnx's weights: model.onnx.data beside it


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: Path                    # the .onnx file
    files: tuple[Path, ...]       # it and its external data file, if any
    opset: int
    num_attention_nodes: int
    attrs: aop.AttentionAttrs
    medusa: dict                  # {"num_heads", "num_layers"} when heads were exported, else {}


def attention_attrs(cfg, block_size: int) -> aop.AttentionAttrs:
    return aop.AttentionAttrs(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                              head_size=cfg.head_dim, block_size=block_size, scale=cfg.head_dim ** -0.5)


def _step_module(model, heads=None):
    import torch

    n = model.config.num_hidden_layers

    class StepGraph(torch.nn.Module):
        """forward(step inputs..., k_cache_0, v_cache_0, ...) -> (logits, [medusa_logits], new_k_0, ...).

        The same computation as the torch backend: final hidden states at `logits_indices`,
        then lm_head (and the Medusa heads) in float32.
        """

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.heads = heads

        def forward(self, input_ids, positions, block_tables, context_lens, query_start, mask, logits_indices,
                    *caches):
            h, new_k, new_v = self.model.hidden_states(input_ids, positions, list(caches[0::2]),
                                                       list(caches[1::2]), block_tables, context_lens,
                                                       query_start, mask)
            h = h[logits_indices.long()]
            out = [self.model.lm_head(h).float()]
            if self.heads is not None:
                out.append(self.heads(h).float())
            for k, v in zip(new_k, new_v):
                out += [k, v]
            return tuple(out)

    assert len(step_io.input_names(n)) == 7 + 2 * n
    return StepGraph().eval()


def example_step(cfg, block_size: int, dtype, num_blocks: int = 8):
    """A small mixed step (a prefill chunk with context, a decode token) to trace with."""
    import torch

    i32 = torch.int32
    T = 4
    ids = torch.arange(1, T + 1, dtype=i32) % cfg.vocab_size
    positions = torch.tensor([2, 3, 4, 5], dtype=i32)
    tables = torch.tensor([[1, 2], [3, 0]], dtype=i32)
    ctx = torch.tensor([2, 5], dtype=i32)
    qs = torch.tensor([0, 3, 4], dtype=i32)
    mask = torch.zeros(T, 3, dtype=torch.bool)
    mask[:3, :3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    mask[3, 0] = True
    li = torch.tensor([2, 3], dtype=i32)
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, positions, tables, ctx, qs, mask, li, *caches)


def export_onnx(model_dir: str | Path, out_path: str | Path, *, dtype: str = "float32", block_size: int = 16,
                opset: int = DEFAULT_OPSET, external_data: bool = True, model=None,
                medusa_dir: str | Path | None = None) -> ExportResult:
    """Write `out_path` (model.onnx) for the checkpoint in `model_dir`.

    Args:
        model_dir: a HF Llama folder.
        out_path: the .onnx file to write; its external data, if any, goes next to it.
        dtype: weights and KV pools' dtype: float32, float16 or bfloat16.
        block_size: KV block size recorded on every attention node.
        opset: default-domain opset (>= 18).
        external_data: False keeps the weights inside the .onnx file (`save_model`).
        model: an already-loaded `LlamaForCausalLM` to export instead of loading `model_dir`.
        medusa_dir: a Medusa heads folder; the graph then also outputs `medusa_logits`.

    Returns:
        ExportResult with the written files.

    Raises:
        ModelLoadError: the folder holds no model apar-rt can load.
        ValueError: a bad dtype, opset or block size.
    """
    import onnx
    import torch

    from apar_rt.backends.torch_backend import DTYPES
    from apar_rt.model.weights import load_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if opset < 18:
        raise ValueError(f"opset must be >= 18, got {opset}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tdtype = DTYPES[dtype]
    if model is None:
        model, cfg = load_model(model_dir, dtype=tdtype, device="cpu")
    else:
        cfg = model.config
        model = model.to(tdtype)
    n = cfg.num_hidden_layers
    attrs = attention_attrs(cfg, block_size)
    heads = None
    if medusa_dir is not None:
        from apar_rt.medusa.heads import load_heads
        heads = load_heads(medusa_dir, hidden=cfg.hidden_size, vocab=cfg.vocab_size, dtype=tdtype)
    module = _step_module(model, heads)
    args = example_step(cfg, block_size, tdtype)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    sym = aop.make_symbolic(attrs)
    torch.onnx.register_custom_op_symbolic("apar::tree_paged_attention", sym, opset)
    try:
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = Path(tmp) / "raw.onnx"
            with torch.no_grad():
                torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                                  input_names=step_io.input_names(n),
                                  output_names=step_io.output_names(n, heads is not None),
                                  dynamic_axes=step_io.dynamic_axes(n), custom_opsets={aop.OP_DOMAIN: 1},
                                  do_constant_folding=True)
            proto = onnx.load(str(raw), load_external_data=True)
    finally:
        torch.onnx.unregister_custom_op_symbolic("apar::tree_paged_attention", opset)

    _finish_model(proto, opset)
    num_nodes = sum(1 for nd in proto.graph.node if nd.domain == aop.OP_DOMAIN and nd.op_type == aop.OP_TYPE)
    if num_nodes != n:
        raise RuntimeError(f"export produced {num_nodes} {aop.OP_TYPE} nodes for {n} layers")
    files = save_model(proto, out_path, external_data)
    medusa = {"num_heads": heads.num_heads, "num_layers": heads.num_layers} if heads is not None else {}
    return ExportResult(out_path, files, opset, num_nodes, attrs, medusa)


def save_model(proto, path: Path, external_data: bool = True) -> tuple[Path, ...]:
    """Write `proto` to `path`; returns the files written. The weights go to `<name>.data` beside
    it unless `external_data` is False.

    External weights are what a session should be given: onnxruntime maps them from the file,
    while weights inside a model handed to it as bytes (as the CPU backend does, since it
    rewrites the graph on load) stay resident twice: loading a 222 MB engine took 180 MB of
    resident memory with external weights and 464 MB with them inside (build_engines/README.md).
    Protobuf's 2 GiB limit needs them external anyway for large models."""
    import onnx

    data = path.parent / (path.name + EXTERNAL_DATA_SUFFIX)
    if data.exists():
        os.remove(data)
    if not external_data:
        onnx.save_model(proto, str(path))
        return (path,)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return (path, data) if data.exists() else (path,)


def _finish_model(proto, opset: int) -> None:
    """Add the local function, name the attention nodes, and fix the opset imports in place."""
    from onnx import helper

    proto.functions.append(aop.attention_function(opset))
    domains = {o.domain: o for o in proto.opset_import}
    if aop.OP_DOMAIN not in domains:
        proto.opset_import.append(helper.make_opsetid(aop.OP_DOMAIN, aop.OP_DOMAIN_VERSION))
    layer = 0
    for nd in proto.graph.node:
        if nd.domain == aop.OP_DOMAIN and nd.op_type == aop.OP_TYPE:
            nd.name = f"/model/layers.{layer}/self_attn/{aop.OP_TYPE}"
            layer += 1
    proto.producer_name = "apar-rt"
    from apar_rt import __version__
    proto.producer_version = __version__
