"""The `onnxruntime` backend: an engine folder's model.onnx in an InferenceSession.

Everything crosses into the session by pointer through one IOBinding, into buffers the backend
owns and keeps (onnxruntime keeps only the pointer of a bound buffer):
- the KV pools, one [2, layers, blocks, block_size, Hkv, D] array (numpy on the CPU, a torch
  tensor on CUDA with the CUDA execution provider), read in place;
- the step inputs, copied into persistent buffers on the device (grown on demand);
- the outputs (logits, Medusa logits, every layer's new K/V in one block), persistent too.
After the run one indexed write per step stores all layers' new K/V at the step's slots (numpy
on the CPU, where its per-call overhead is far below torch's). Steps are padded to the engine's
batch buckets with null-block sequences (see `apar_rt.export.step_io`).

On the CPU this module needs no torch: it returns numpy logits, and an engine folder runs with
onnxruntime, numpy and tokenizers alone (the fast start; tests/test_fast_start.py). torch is
imported only for a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from apar_rt.backends import ort_native
from apar_rt.backends.base import Backend, BackendUnavailable, load_engine_folder
from apar_rt.backends.huge_pages import BackgroundCollapse
from apar_rt.backends.onnx_graph import cast_to, drop_outputs, producers_and_uses
from apar_rt.backends.ort_attention import DECODE_INPUTS, SLOT_INPUT, decode_feeds, runs_native
from apar_rt.backends.ort_medusa import RANK_INPUT, RANK_OUTPUT, HeadsSplit, int8_weights, rank_heads
from apar_rt.backends.ort_medusa import split_heads as split_medusa_heads
from apar_rt.build.manifest import ONNX_NAME
from apar_rt.core import StepInput
from apar_rt.export import step_io

_NUMPY = {"float32": np.float32, "float16": np.float16}
# numpy types of the session's input types (ONNX Runtime's names)
_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
                "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def _torch_dtype(np_dtype):
    """The torch dtype of a numpy dtype (CUDA buffers only; imports torch)."""
    import torch

    return {np.float32: torch.float32, np.float16: torch.float16, np.int32: torch.int32,
            np.int64: torch.int64, np.bool_: torch.bool}[np.dtype(np_dtype).type]


def _check_dtype(requested: str | None, built: str) -> None:
    if requested not in (None, "auto", built):
        raise ValueError(f"dtype {requested!r} differs from the engine's dtype {built!r} (fixed at build "
                         f"time); "
                         f"pass --dtype auto or rebuild with --dtype {requested}")


def _torch_cuda() -> bool:
    """Whether torch is installed with a usable CUDA device (torch holds the pools on CUDA)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _device(requested: str | None) -> tuple[str, int]:
    """(device type, index): "cpu" unless CUDA is asked for or onnxruntime and torch both have it.
    torch is imported only when onnxruntime has its CUDA execution provider or CUDA is asked for."""
    cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if requested is None:
        return ("cuda", 0) if cuda_ep and _torch_cuda() else ("cpu", 0)
    kind, _, index = str(requested).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ValueError(f"the onnxruntime backend runs on cpu or cuda[:N], not {requested!r}")
    if kind == "cuda" and not (cuda_ep and _torch_cuda()):
        raise BackendUnavailable(f"device {requested!r} needs onnxruntime's CUDAExecutionProvider and a CUDA "
                                 f"build of torch; available providers: "
                                 f"{', '.join(ort.get_available_providers())}")
    return kind, int(index or 0)


# Long prompts prefill in chunks of this many tokens per step on the CPU (the engine's default
# long_prefill_token_threshold): the rewritten graph's general body scores every row of a chunk
# against all of the chunk's tokens (`attention_body.long_group`), so one chunk of P tokens costs
# P x P scores where P x P / 2 are needed. A 980-token prompt took 13-21% less time in chunks of
# 256 than in one (demo model, hidden-512 8-layer MHA and GQA models; 128 no better, 512 half as good).
PREFILL_CHUNK = 256


def _session_model(path: Path, drop: set[str], ort_body: bool, native: bool = False,
                   split_heads: bool = False) -> tuple[bytes, HeadsSplit | None]:
    """The model at `path` as the session runs it, serialized: without outputs `drop` (and the
    nodes only they needed); with `split_heads`, the Medusa heads cut out into a model of their own
    (`ort_medusa.split_heads`, returned beside it; None when there are none to cut); and with
    `ort_body` the op's nodes rewritten for ONNX Runtime's
    CPU (`apar_rt.backends.ort_attention.rewrite`, its decode body on the native op with
    `native`), a quantized engine's MatMulNBits multiplying in int8 (`_int8_compute`), the
    rotary embeddings fused (`apar_rt.backends.ort_rotary.fuse_rotary`) and each
    residual add fused with the RMSNorm after it (`apar_rt.backends.ort_norms.fuse_skip_rms_norm`).

    External weights stay where they are (not loaded): the session reads them from the folder.
    """
    import onnx

    from apar_rt.backends.ort_attention import rewrite
    from apar_rt.backends.ort_norms import fuse_skip_rms_norm
    from apar_rt.backends.ort_rotary import fuse_rotary

    model = onnx.load(str(path), load_external_data=False)
    if drop:
        drop_outputs(model.graph, drop)
    split = None
    if split_heads:   # the heads read hidden states of the model's dtype, which the KV pools have
        dtype = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name == step_io.k_cache_name(0))
        split = split_medusa_heads(model, step_io.MEDUSA_LOGITS, dtype)
    if ort_body:   # in this order: all read the main graph, which the rewrite turns into one If
        _drop_noop_output_casts(model.graph)
        _int8_compute(model.graph)
        if split is not None:
            _drop_noop_output_casts(split.heads.graph)
            _int8_compute(split.heads.graph)
        fuse_rotary(model)
        fuse_skip_rms_norm(model)
        rewrite(model, native)
    return model.SerializeToString(), split


def _int8_compute(g) -> int:
    """Set accuracy level 4 on the MatMulNBits nodes of `g` (a quantized engine's linear layers)
    that have none, for onnxruntime's CPU: it then multiplies in int8, quantizing each call's
    activations per block, as onnxruntime-genai's CPU models do. At level 0 it dequantizes the
    weights to float32 on every call: the demo's int8 engine took 1,587 us a batch-1 decode step
    against 451 in float32 (int4: 346). Returns how many."""
    from onnx import helper

    changed = 0
    for n in g.node:
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft":
            level = next((a for a in n.attribute if a.name == "accuracy_level"), None)
            if level is None:
                n.attribute.append(helper.make_attribute("accuracy_level", 4))
            elif level.i == 0:
                level.i = 4
            else:
                continue
            changed += 1
    return changed


def _drop_noop_output_casts(g) -> int:
    """Let the node before a graph output's Cast write the output itself where the Cast is to the
    type the value already has (the exporter's `.float()` on float32 logits and Medusa logits):
    onnxruntime keeps a node that makes a graph output, so each such Cast copied its output every
    step. A value's type is known only where `_known_types` can prove it. Returns how many."""
    outputs = {o.name for o in g.output}
    dropped = 0
    while True:
        producer, uses = producers_and_uses(g.node)   # a value an If branch reads counts as a use
        types = _known_types(g)
        for cast in g.node:
            if cast.op_type != "Cast" or cast.output[0] not in outputs:
                continue
            src, x = producer.get(cast.input[0]), cast.input[0]
            to = cast_to(cast)
            if src is not None and types.get(x) == to and uses[x] == 1 and x not in outputs:
                src.output[list(src.output).index(x)] = cast.output[0]
                g.node.remove(cast)
                dropped += 1
                break
        else:
            return dropped


# ops whose output has their first input's element type
_SAME_TYPE = {"Unsqueeze", "Squeeze", "Reshape", "Transpose", "Concat", "Identity", "Flatten", "Slice", "Add",
              "Mul", "Sub", "Div"}


def _known_types(g) -> dict[str, int]:
    """Element types of the values of `g` that follow from its initializers alone: a MatMul or
    Gemm has its weight's type, a Cast its target, and `_SAME_TYPE` ops their first input's."""
    types = {t.name: t.data_type for t in g.initializer}
    for n in g.node:   # nodes are in topological order
        if n.op_type == "Cast":
            types[n.output[0]] = cast_to(n)
        elif n.op_type in ("MatMul", "Gemm"):
            known = {types[i] for i in n.input[:2] if i in types}
            if len(known) == 1:
                types[n.output[0]] = known.pop()
        elif n.op_type in _SAME_TYPE and n.input and n.input[0] in types:
            types[n.output[0]] = types[n.input[0]]
    return types


def _session_options(threads: int | None, external_folder: Path | None = None):
    """Options of the backend's sessions (the step's, the Medusa heads'): full graph
    optimisation, `threads` intra-op threads (None: onnxruntime's default), and where external
    weights lie when the model is handed over serialized."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if external_folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
    return so


def _address(buf) -> int:
    """The address of the first element of a numpy array or torch tensor."""
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()


class IOBindingCalls:
    """A session's IOBinding calls (bind by pointer, run), made cheaply: the device is made once,
    and the calls go to the pybind objects where onnxruntime's Python wrapper exposes them
    (`_iobinding`, the session's `_sess`), skipping the wrapper's per-call device lookup and its
    bookkeeping for WebGPU graph capture, which a CPU or CUDA session does not use (about 1.6
    against 5.5 us a bind on this project's CI machine). Where the wrapper does not expose them,
    the public calls."""

    def __init__(self, session, device_type: str, device_id: int) -> None:
        self.session = session
        self.io = session.io_binding()
        self._where = (device_type, device_id)
        self._raw = getattr(self.io, "_iobinding", None)
        self._raw_session = getattr(session, "_sess", None)
        self._run_options = ort.RunOptions()
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            self._device = OrtDevice.make(device_type, device_id)._get_c_device()
        except (ImportError, AttributeError):
            self._raw = None

    def run(self) -> None:
        """Run the session on the bound inputs and outputs."""
        if self._raw is not None and self._raw_session is not None:
            self._raw_session.run_with_iobinding(self._raw, self._run_options)
        else:
            self.session.run_with_iobinding(self.io)

    def bind_input(self, name: str, dtype, shape: tuple, ptr: int) -> None:
        if self._raw is not None:
            self._raw.bind_input(name, self._device, dtype, shape, ptr)
        else:
            self.io.bind_input(name, *self._where, dtype, shape, ptr)

    def bind_output(self, name: str, dtype, shape: tuple, ptr: int) -> None:
        if self._raw is not None:
            self._raw.bind_output(name, self._device, dtype, shape, ptr)
        else:
            self.io.bind_output(name, *self._where, dtype, shape, ptr)


class OnnxRuntimeBackend(Backend):
    """Runs `model.onnx` of an engine folder built by `apar-rt build`.

    Args:
        engine_dir: the engine folder (its manifest is verified, sha256 included).
        dtype: "auto" or the engine's dtype (anything else is a ValueError).
        device: "cpu", "cuda[:i]" or None (CUDA when onnxruntime and torch both have it).
        threads: intra-op threads (None: onnxruntime's default).
        check_hashes: verify the sha256 of every engine file on load.
        medusa_dir: given by the engine when Medusa is asked for; the heads are inside the graph, so
            this only checks that the engine was built with them. Without it, the heads are cut
            from the graph on load, so that they cost nothing. With it, on the CPU, they are cut
            out into a session of their own (`ort_medusa`), which `medusa_topk` runs on the rows
            it is asked for only (a drafting thread's last accepted node), not on every row, for
            the heads the tree reads (`prepare_drafting`), ranking their logits in the graph.
        int8_drafting: that session holds a float32 engine's heads as int8 weights
            (`ort_medusa.int8_weights`); drafts only propose, so greedy output is the same. False:
            the heads as they are in the engine.
        huge_pages: on the CPU, once the pool is allocated, back the session's weights and the pool
            with transparent huge pages where Linux allows it (`huge_pages.collapse_new`): a
            memory-bound decode step then misses the TLB far less.
        native_ops: on the CPU, run a float32 engine's decode and small steps on the native op
            library (`ort_native`: each layer's attention reads the KV pool in place) when it is
            built; False: the standard-op bodies everywhere. `self.native_ops` is the library used.
    """

    name = "onnxruntime"

    def __init__(self, engine_dir: str, *, dtype: str | None = "auto", device: str | None = None,
                 threads: int | None = None, check_hashes: bool = True,
                 medusa_dir: str | None = None, huge_pages: bool = True, native_ops: bool = True,
                 int8_drafting: bool = True) -> None:
        self.engine_dir = Path(engine_dir)
        self.manifest, self.num_medusa_heads = load_engine_folder(engine_dir, self.name, check_hashes=check_hashes,
                                                                  medusa_dir=medusa_dir)
        m = self.manifest
        _check_dtype(dtype, m.dtype)
        if m.dtype not in ("float32", "float16"):
            raise BackendUnavailable(f"the onnxruntime backend runs float32 or float16 engines, "
                                     f"not {m.dtype}")
        self._dev_type, self._dev_id = _device(device)
        self.device = "cpu" if self._dev_type == "cpu" else f"cuda:{self._dev_id}"
        # the memory the session and the pool will add, moved to huge pages once the pool exists
        self.huge_pages = BackgroundCollapse() if huge_pages and self._dev_type == "cpu" else None
        self.dtype = _NUMPY[m.dtype]      # numpy dtype of the pools and the new K/V
        cfg = m.model_config
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_kv_heads = int(cfg["num_key_value_heads"])
        self.head_dim = int(cfg["head_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        self.buckets = sorted(m.batch_buckets)
        self._max_batch = self.buckets[-1] if self.buckets else float("inf")

        so = _session_options(threads)
        if self._dev_type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self._dev_id}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        model_path = self.engine_dir / m.onnx.get("file", ONNX_NAME)
        model = str(model_path)
        drop = set()
        if self.num_medusa_heads and medusa_dir is None:
            # Built with heads but run without Medusa: drop the heads from the graph (onnxruntime
            # computes every output whether it is fetched or not).
            drop.add(step_io.MEDUSA_LOGITS)
            self.num_medusa_heads = 0
        # On the CPU the op runs as the graph of `ort_attention.rewrite` (head-major pools; a decode
        # step's index from the host, `_step_feeds`); the CUDA execution provider keeps the engine
        # file's standard-op body.
        ort_body = self._dev_type == "cpu"
        self.preferred_prefill_chunk = PREFILL_CHUNK if ort_body else 0
        # that graph takes the pools head-major (ort_attention.POOL_LAYOUT), [Hkv, slots, D]
        self._head_major = ort_body
        lib = ort_native.library() if native_ops and ort_body and m.dtype == "float32" else None
        self.native_ops = lib
        if lib is not None:
            try:
                so.register_custom_ops_library(str(lib))
            except Exception as e:   # onnxruntime raises its own exception types
                raise BackendUnavailable(
                    f"cannot load the native op library {lib}: {e}; rebuild it (python -m apar_rt.backends."
                    f"ort_native) or run without it ({ort_native.ENV_VAR}=off)") from None
        split_heads = bool(self.num_medusa_heads) and self._dev_type == "cpu"
        heads = None
        if drop or ort_body or split_heads:
            model, heads = _session_model(model_path, drop, ort_body, native=lib is not None, split_heads=split_heads)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(model_path.parent))
        # the Medusa heads apart (CPU): their model, and the sessions made from it on first use
        # (`_heads_session`; the engine asks for drafting's at its start, `prepare_drafting`)
        self._heads = None if heads is None else heads.heads
        self._heads_options = (threads, model_path.parent, providers)
        self._int8_drafting = int8_drafting and m.dtype == "float32"
        self._logits_session = None       # the heads' logits (`medusa_logits`), made on first use
        self._rank: tuple | None = None   # (head count, drafting's session for it)
        try:
            self.session = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailable(f"onnxruntime cannot load {self.engine_dir / ONNX_NAME}: {e}") from None
        self._heads_input = None if heads is None else heads.hidden   # the step's output the heads read
        if split_heads and heads is None:
            import logging

            logging.getLogger(__name__).warning(
                "%s: the Medusa heads read more than the final hidden states; they stay in the step graph "
                "and run on every logits row", model_path)
        want = (step_io.input_names(self.num_layers) + (list(DECODE_INPUTS) if ort_body else [])
                + ([SLOT_INPUT] if ort_body and lib is not None else []))
        self._hidden_size = int(cfg["hidden_size"])   # of the heads' input, which has the pools' dtype
        got = [i.name for i in self.session.get_inputs()]
        if got != want:
            raise BackendUnavailable(f"{self.engine_dir / ONNX_NAME} has inputs {got}, expected {want}")
        self._feed_types = {i.name: _INPUT_TYPES.get(i.type) for i in self.session.get_inputs()}
        odd = {i.name: i.type for i in self.session.get_inputs() if self._feed_types[i.name] is None}
        if odd:
            raise BackendUnavailable(f"{self.engine_dir / ONNX_NAME} has inputs of types this backend does not "
                                     f"feed: {odd}")
        self._direct_binds = True         # IOBindingCalls bind through onnxruntime's pybind objects
        self._io = IOBindingCalls(self.session, self._dev_type, self._dev_id)
        # one IOBinding per step shape (tokens, logits rows, sequences), the most recent
        # `max_bindings` kept: a step whose shape came before finds its inputs and outputs bound
        # already (Medusa trees, forks and finished threads change a batch-1 step's shape every few
        # steps; forks, finished threads and admissions change an in-flight batch's)
        self.max_bindings = _BINDINGS
        self._ios: dict = {None: [self._io, {}, None]}   # shape -> [IOBindingCalls, its bindings, pool generation]
        self._shape = None                # the shape whose IOBinding is self._io
        self.block_size = m.block_size
        self.k_caches: list = []          # per layer, the pool as [blocks, block_size, Hkv, D]: numpy views
                                          # (CPU; strided where the pools are head-major) or torch views (CUDA)
        self.v_caches: list = []
        self._bufs: dict = {}             # backend-owned input/output buffers, by name (see _buffer)
        self._addrs: dict = {}            # buffer name -> the address of its first element
        self._bound: dict = self._ios[None][1]   # name -> (buffer generation, shape) bound in self._io (see _bind)
        self._gens: dict = {}             # buffer name -> generation of its current allocation
        self._staged: dict = {}           # input name -> (shape, its bound view, the array) as last staged
        self._next_gen = 0
        self._outputs_key = None          # (tokens, logits rows) that _bind_outputs bound last
        self._ran = False                 # a forward ran: its new K/V are in self._new_kv (commit_kv)
        self._native_step = False         # the last step ran the native op's body, which stored its K/V
        self._medusa = None               # the last forward's Medusa logits (heads in the step graph)
        self._hidden = None               # the last forward's hidden states at its logits rows (heads apart)

    # ---- the pool ------------------------------------------------------------------------

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        if block_size != self.manifest.block_size:
            raise ValueError(f"block_size {block_size} differs from the engine's block size "
                             f"{self.manifest.block_size} (fixed at build time)")
        if self.manifest.max_num_blocks and num_blocks > self.manifest.max_num_blocks:
            raise ValueError(f"num_blocks {num_blocks} exceeds the engine's max_num_blocks "
                             f"{self.manifest.max_num_blocks}")
        # One tensor holds every layer's K and V pools, so one indexed write stores a step's K/V.
        L, H, D, slots = self.num_layers, self.num_kv_heads, self.head_dim, num_blocks * block_size
        shape = (2, L, H, slots, D) if self._head_major else (2, L, num_blocks, block_size, H, D)
        if self._dev_type == "cpu":
            # written, not just mapped: the pool is resident from the start (as a GPU pool is), so a
            # pool that does not fit fails here and not mid-run, and RSS is what the memory plan says
            self._kv = np.empty(shape, self.dtype)
            self._kv.fill(0)
        else:
            import torch

            self._kv = torch.zeros(shape, dtype=_torch_dtype(self.dtype), device=self.device)
        if self._head_major:
            # views in the op's layout: blocks [2, L, blocks, block_size, Hkv, D], slots [2, L, slots, Hkv, D]
            self._kv_blocks = self._kv.reshape(2, L, H, num_blocks, block_size, D).transpose(0, 1, 3, 4, 2, 5)
            self._kv_slots = self._kv.swapaxes(2, 3)
        else:
            self._kv_blocks = self._kv
            self._kv_slots = self._kv.reshape(2, L, slots, H, D)     # a view: the pool is contiguous
        self.k_caches, self.v_caches = list(self._kv_blocks[0]), list(self._kv_blocks[1])
        self._new_generation("kv_pool")
        self._bind_pools()
        if self.huge_pages is not None:
            self.huge_pages.start([(_address(self._kv), self._kv.nbytes)])

    def _bind_pools(self) -> None:
        """Bind every layer's pools (what the graph takes: [Hkv, slots, D] or [blocks, ...] views of
        self._kv) in the current IOBinding."""
        entry = self._ios[self._shape]
        if entry[2] == self._gens["kv_pool"]:
            return
        for i, (k, v) in enumerate(zip(self._kv[0], self._kv[1])):
            self._bind(step_io.k_cache_name(i), _address(k), self.dtype, tuple(k.shape), input=True, base="kv_pool")
            self._bind(step_io.v_cache_name(i), _address(v), self.dtype, tuple(v.shape), input=True, base="kv_pool")
        entry[2] = self._gens["kv_pool"]

    def _use_binding(self, shape: tuple) -> bool:
        """Make the IOBinding of step shape `shape` the current one: a new one (the pools then
        bound) while fewer than `max_bindings` exist, else the least recently used one, whose bindings
        `_bind` then changes where they differ (as one IOBinding would be rebound step by step, so
        that a load whose shapes rarely recur costs no more). Returns whether it changed."""
        if shape == self._shape:
            return False
        entry = self._ios.pop(shape, None)
        if entry is None:
            if len(self._ios) >= self.max_bindings:
                entry = self._ios.pop(next(iter(self._ios)))
            else:
                io = IOBindingCalls(self.session, self._dev_type, self._dev_id)
                if not self._direct_binds:
                    io._raw = None
                entry = [io, {}, None]
        self._ios[shape] = entry   # (re)inserted last: the most recently used
        self._io, self._bound, self._shape = entry[0], entry[1], shape
        self._bind_pools()
        return True

    def kv_bytes_per_block(self) -> int:
        return (2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
                * np.dtype(self.dtype).itemsize)

    # ---- persistent buffers ------------------------------------------------------------------

    def _buffer(self, name: str, shape: tuple, dtype):
        """A buffer owned by the backend for `name`, at least `shape` (grown by doubling its first
        axis, plus a spare row: onnxruntime refuses the null pointer of an empty buffer). Numpy on
        the CPU, torch on CUDA. Valid until the next step that grows it."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] <= shape[0] or tuple(buf.shape[1:]) != tuple(shape[1:]):
            rows = max(2 * shape[0], 1 if buf is None else buf.shape[0]) + 1
            if self._dev_type == "cpu":
                buf = np.empty((rows, *shape[1:]), dtype)
            else:
                import torch

                buf = torch.empty((rows, *shape[1:]), dtype=_torch_dtype(dtype), device=self.device)
            self._bufs[name] = buf
            self._addrs[name] = _address(buf)
            self._new_generation(name)
        return buf[:shape[0]]

    def _new_generation(self, name: str) -> None:
        self._next_gen += 1
        self._gens[name] = self._next_gen

    def _bind(self, name: str, address: int, dtype, shape: tuple, *, input: bool, base: str | None = None) -> None:
        """Bind the memory at `address` (in a backend-owned numpy array or torch tensor) to input
        or output `name`, as `shape` of numpy `dtype`.

        onnxruntime keeps only the pointer: the memory must stay alive until the run returns, which
        is why only the pools and `_buffer` buffers, which the backend holds, are bound here.
        `address` lies in the buffer named `base` (default: `name`) at an offset that depends
        only on `shape`, so (the buffer's generation, shape) identifies the pointer: bindings
        persist across runs, and most steps rebind nothing."""
        key = (self._gens[base or name], shape)
        if self._bound.get(name) == key:
            return
        (self._io.bind_input if input else self._io.bind_output)(name, dtype, shape, address)
        self._bound[name] = key

    def _stage_inputs(self, feeds: step_io.StepFeeds, switched: bool) -> None:
        """Copy the step inputs into backend-owned buffers on the device (cast to the graph's
        types) and bind them. An input of the shape it had last step goes into the same view,
        which is bound already unless the step's IOBinding `switched` (its buffer only changes
        when a larger shape regrows it). A read-only array staged last step as it is now
        (`ort_attention`'s constant placeholders) is not copied again."""
        staged = self._staged
        cpu = self._dev_type == "cpu"
        for name, arr in feeds.arrays.items():
            last = staged.get(name)
            shape = arr.shape
            if last is not None and last[0] == shape:
                if switched:
                    self._bind(name, self._addrs[name], self._feed_types[name], shape, input=True)
                if last[2] is arr and not arr.flags.writeable:
                    continue
                buf = last[1]
            else:
                dtype = self._feed_types[name]
                buf = self._buffer(name, shape, dtype)
                self._bind(name, self._addrs[name], dtype, shape, input=True)
            staged[name] = (shape, buf, arr)
            if cpu:
                np.copyto(buf, arr)
            else:
                import torch

                buf.copy_(torch.from_numpy(arr), non_blocking=False)   # (casts to the buffer's type)

    def _bind_outputs(self, num_tokens: int, num_logits: int, switched: bool) -> None:
        """Bind the outputs to persistent buffers: logits (and the Medusa logits, or with the heads
        apart the hidden states they read), and the new K/V of all layers in one
        [2, layers, T, Hkv, D] block (so that one indexed write stores them)."""
        T, N, V, L = num_tokens, num_logits, self.vocab_size, self.num_layers
        if self._outputs_key == (T, N) and not switched:   # as last step: the same buffers, bound
            return
        logits = self._buffer("logits", (N, V), np.float32)
        medusa = (self._buffer(step_io.MEDUSA_LOGITS, (N, self.num_medusa_heads, V), np.float32)
                  if self.num_medusa_heads and self._heads is None else None)
        hidden = (self._buffer(self._heads_input, (N, self._hidden_size), self.dtype)
                  if self._heads is not None else None)
        # rows = tokens, so that the buffer grows along its first axis; [T, 2, L, Hkv, D]
        kv = self._buffer("new_kv", (T + 1, 2, L, self.num_kv_heads, self.head_dim), self.dtype)
        self._logits, self._medusa = logits, medusa
        self._hidden = None if hidden is None else hidden[:N]
        if hidden is not None:
            self._bind(self._heads_input, self._addrs[self._heads_input], self.dtype,
                       (N, self._hidden_size), input=False)
        self._bind("logits", self._addrs["logits"], np.float32, (N, V), input=False)
        if medusa is not None:
            self._bind(step_io.MEDUSA_LOGITS, self._addrs[step_io.MEDUSA_LOGITS], np.float32, tuple(medusa.shape),
                       input=False)
        # per-layer outputs must be contiguous: lay them out as [2, L, T+1, Hkv, D] in the same memory
        H, D = self.num_kv_heads, self.head_dim
        flat = kv.reshape(-1)[:2 * L * (T + 1) * H * D]
        self._new_kv = flat.reshape(2, L, T + 1, H, D)
        kv_shape = (T, H, D)
        start = self._addrs["new_kv"]                  # the view's first element is the buffer's
        kv_step, layer_step = self._new_kv.strides[:2]  # bytes from K to V, and from layer to layer
        for i in range(L):
            k_at = start + i * layer_step
            self._bind(step_io.new_k_name(i), k_at, self.dtype, kv_shape, input=False, base="new_kv")
            self._bind(step_io.new_v_name(i), k_at + kv_step, self.dtype, kv_shape, input=False, base="new_kv")
        self._outputs_key = (T, N)

    # ---- one step --------------------------------------------------------------------------

    def forward(self, step: StepInput):
        """Run one step. The returned logits (numpy on the CPU, a CPU torch tensor on CUDA; and
        `medusa_logits()`) are views of buffers that the next forward reuses: read them before
        calling forward again."""
        if not self.k_caches:
            raise RuntimeError("allocate_kv must be called before forward")
        cpu = self._dev_type == "cpu"
        if step.block_copies:
            src = [s for s, _ in step.block_copies]
            dst = [d for _, d in step.block_copies]
            if cpu:
                self._kv_blocks[:, :, dst] = self._kv_blocks[:, :, src]
            else:
                import torch

                src_t, dst_t = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
                self._kv[:, :, dst_t] = self._kv[:, :, src_t]
        feeds = self._step_feeds(step)
        switched = self._use_binding((feeds.num_tokens, feeds.num_logits, feeds.batch))
        self._stage_inputs(feeds, switched)
        self._bind_outputs(feeds.num_tokens, feeds.num_logits, switched)
        self._run()
        self._ran = True
        if not self._native_step:   # (the native op stored every layer's new K/V in the pools itself)
            slots = step.slot_mapping
            keep = slots >= 0
            if keep.all():
                self._write(None, slots)
            else:
                self._write(np.flatnonzero(keep), slots[keep])
        return self._logits if cpu else self._logits.cpu()

    def _step_feeds(self, step: StepInput) -> step_io.StepFeeds:
        """The session's feeds for `step`: its own arrays (the graph takes any batch, so a step is
        not padded to a batch bucket; the largest bucket bounds it), and on the CPU the decode
        index the rewritten graph takes from the host (`ort_attention.decode_feeds`).
        `_stage_inputs` copies them, cast to the graph's types."""
        B = int(step.block_tables.shape[0])
        if B > self._max_batch:
            step_io.pick_bucket(B, self.buckets)   # raises: the scheduler's budget is wrong
        a = {name: getattr(step, name) for name in step_io.STEP_INPUTS}
        feeds = step_io.StepFeeds(a, B, int(step.input_ids.shape[0]), int(step.logits_indices.shape[0]))
        self._native_step = False
        if self._head_major:
            native = self.native_ops is not None
            extra = decode_feeds(step.block_tables, step.context_lens, step.query_start, step.mask,
                                 self.block_size, native=native)
            a.update(extra)
            if native:
                a[SLOT_INPUT] = step.slot_mapping
                self._native_step = runs_native(extra)
        return feeds

    def _run(self) -> None:
        if self._dev_type != "cpu":
            import torch

            torch.cuda.current_stream(self.device).synchronize()
        self._io.run()

    def _write(self, idx, slots) -> None:
        """pool[slot] = new K/V[idx] for every layer at once (idx None: the first len(slots) rows)."""
        new = self._new_kv
        if self._dev_type == "cpu":
            if idx is None and len(slots) == 1:   # one token (a batch-1 decode): basic indexing
                self._kv_slots[:, :, int(slots[0])] = new[:, :, 0]
                return
            rows = new[:, :, :len(slots)] if idx is None else new[:, :, idx]
            self._kv_slots[:, :, slots] = rows
        else:
            import torch

            slots_t = torch.as_tensor(np.asarray(slots), device=self.device).long()
            rows = new[:, :, :len(slots)] if idx is None else new[:, :, torch.as_tensor(np.asarray(idx),
                                                                                      device=self.device).long()]
            self._kv_slots[:, :, slots_t] = rows

    def medusa_logits(self):
        if self._hidden is not None:
            return self._run_heads(self._hidden)
        if self._medusa is None:
            return super().medusa_logits()
        return self._medusa if self._dev_type == "cpu" else self._medusa.cpu()

    def medusa_logits_at(self, rows):
        if self._hidden is None:
            return super().medusa_logits_at(rows)
        return self._run_heads(self._hidden[np.asarray(rows, np.int64)])   # only the rows asked for

    def _run_heads(self, hidden: np.ndarray) -> np.ndarray:
        """The heads' logits [R, heads, vocab] for hidden states [R, hidden] (their own session,
        made on first use: drafting reads ranked ids instead, `medusa_topk`)."""
        if self._logits_session is None:
            self._logits_session = self._heads_session(self._heads)
        return self._logits_session.run([step_io.MEDUSA_LOGITS],
                                        {self._heads_input: np.ascontiguousarray(hidden)})[0]

    def prepare_drafting(self, heads: int) -> None:
        """With the heads apart, drafting's session computes the first `heads` heads only."""
        if self._heads is not None:
            self._rank_session(heads)

    def medusa_topk(self, rows, k: int, heads: int | None = None) -> np.ndarray:
        """With the heads apart, ranked in their session (`ort_medusa.rank_heads`): only the ids
        cross back."""
        if self._hidden is None:
            return super().medusa_topk(rows, k, heads)
        n = self.num_medusa_heads if heads is None else int(heads)
        hidden = np.ascontiguousarray(self._hidden[np.asarray(rows, np.int64)])
        k = np.array([min(int(k), self.vocab_size)], np.int64)
        return self._rank_session(n).run([RANK_OUTPUT], {self._heads_input: hidden, RANK_INPUT: k})[0]

    def _rank_session(self, heads: int):
        """Drafting's session for the first `heads` heads (`rank_heads`). One is kept: asking for
        another count replaces it, so that the heads' weights are loaded once."""
        if not 0 < heads <= self.num_medusa_heads:
            raise ValueError(f"drafting reads 1 to {self.num_medusa_heads} Medusa heads, not {heads}")
        if self._rank is None or self._rank[0] != heads:
            self._rank = None   # the old session goes before the new one loads the weights
            ranked = rank_heads(self._heads, heads, step_io.MEDUSA_LOGITS)
            if self._int8_drafting:
                ranked = int8_weights(ranked, str(self._heads_options[1]))
            self._rank = (heads, self._heads_session(ranked))
        return self._rank[1]

    def _heads_session(self, model):
        """A session of the heads' `model` (a ModelProto derived from the engine's heads)."""
        threads, folder, providers = self._heads_options
        try:
            return ort.InferenceSession(model.SerializeToString(), _session_options(threads, folder),
                                        providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendUnavailable(f"onnxruntime cannot load the Medusa heads of {self.engine_dir / ONNX_NAME}: "
                                     f"{e}") from None

    def commit_kv(self, token_indices, slots) -> None:
        """Write the last step's K/V of tokens `token_indices` to `slots` (draft trees). On the
        CPU, runs of consecutive tokens going to consecutive slots (a thread's accepted path down
        a chain, within a block) are copied as slices, which numpy does several times faster than
        an indexed write of the same rows."""
        if not self._ran:
            raise RuntimeError("commit_kv called before any forward")
        if self._dev_type == "cpu":
            runs = _consecutive_runs(list(token_indices), list(slots))
            if len(runs) <= _SLICED_RUNS:
                new, pool = self._new_kv, self._kv_slots
                for i, s, n in runs:
                    pool[:, :, s:s + n] = new[:, :, i:i + n]
                return
        self._write(np.asarray(token_indices, np.int64), np.asarray(slots, np.int64))


# IOBindings kept, one per step shape (OnnxRuntimeBackend._use_binding). 8 -> 64: demo APAR in
# flight, 44 held-out prompts, 12 alternating passes: +4.8% at concurrency 1, +2.4-3.6% at 8, ~0 at 32
_BINDINGS = 64


# commit_kv copies up to this many runs as slices (each about a quarter of an indexed write's
# time on the demo model), more with one indexed write
_SLICED_RUNS = 3


def _consecutive_runs(idx: list[int], slots: list[int]) -> list[tuple[int, int, int]]:
    """(first index, first slot, length) of each maximal run where both idx and slots go up by one."""
    runs = []
    i, n = 0, len(idx)
    while i < n:
        j = i + 1
        while j < n and idx[j] == idx[j - 1] + 1 and slots[j] == slots[j - 1] + 1:
            j += 1
        runs.append((idx[i], slots[i], j - i))
        i = j
    return runs
