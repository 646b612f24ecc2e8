"""`apar::tree_paged_attention`: the one attention op, and its pure-torch reference.

The reference function's docstring is THE contract. The ONNX local function, the Triton GPU
kernel (`apar_rt.kernels.tree_attention`, registered here for CUDA tensors) and the TensorRT
plugin (which launches that same kernel) all compute this same function. On the CPU the op runs
`split_attention`: sequences with one new token through `decode_attention`, draft trees and
prefill chunks through `group_attention` in groups of similar length; both are torch's fused
attention over each sequence's gathered blocks. The reference is the oracle they are tested
against (and runs a step without tokens).
"""

from __future__ import annotations

import torch

OP_NAME = "apar::tree_paged_attention"


def tree_paged_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of a packed, ragged step over a paged KV cache and a per-sequence tree mask.

    A step holds the new tokens of B sequences, concatenated into T tokens. Sequence b owns
    tokens query_start[b] : query_start[b+1] (its "new tokens"); they may be a prefill chunk,
    one decode token, or a draft tree.

    Args:
        q: [T, Hq, D] queries, RoPE applied.
        k, v: [T, Hkv, D] the new tokens' keys (RoPE applied) and values. Hq % Hkv == 0;
            query head h reads kv head h // (Hq // Hkv).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] the layer's KV pool. Block 0 is the
            null block: it pads tables and its contents are never visible. Entries no query sees
            (block 0, stale slots of freed blocks) must be finite: backends zero-initialise their
            pools. (This reference also tolerates non-finite ones; the ONNX function and plugins
            may rely on finiteness, as a 0 probability times NaN is NaN.)
        block_tables: [B, max_blocks] int32. Cached position p of sequence b lives at
            (block_tables[b, p // block_size], p % block_size).
        context_lens: [B] int32. Sequence b's first context_lens[b] positions are cached, and
            every new token of b sees all of them. Needs context_lens[b] <= max_blocks * block_size.
        query_start: [B+1] int32, non-decreasing, query_start[0] == 0, query_start[B] == T.
        mask: [T, max_q] bool, max_q >= the most new tokens of any sequence. For token t of
            sequence b, mask[t, j] says whether t sees new token query_start[b] + j of its own
            sequence. Entries with j >= that sequence's token count are ignored. Causal for a
            prefill chunk, ancestor-or-self for a draft tree, a single 1 for a decode token.
            Every token must see itself.
        scale: softmax scale, usually D ** -0.5.

    Returns:
        [T, Hq, D] in q's dtype: for each token, softmax(scale * q.K^T) V over the cached
        positions of its sequence and the new tokens it sees. Softmax runs in float32.

    The op reads the pool and never writes it: the caller writes k and v to their slots.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    B, max_blocks = block_tables.shape
    block_size = k_cache.shape[1]
    max_q = mask.shape[1]
    group = Hq // Hkv
    L = max_blocks * block_size
    dev = q.device

    # Padded per-sequence views of the new tokens: [B, max_q].
    q_start = query_start[:-1].long()
    q_len = (query_start[1:] - query_start[:-1]).long()
    j = torch.arange(max_q, device=dev)
    new_idx = (q_start[:, None] + j[None, :]).clamp(max=max(T - 1, 0))         # [B, max_q]
    new_valid = j[None, :] < q_len[:, None]                                     # [B, max_q]

    # Keys and values each sequence can see: cached positions, then its new tokens.
    # Slots no query may see (past context_len, padding, the null block) are zeroed before
    # the matmuls: masking the scores alone lets NaN/inf garbage leak through 0 * NaN.
    ctx_vis = torch.arange(L, device=dev)[None, :] < context_lens.long()[:, None]   # [B, L]
    key_ok = torch.cat([ctx_vis, new_valid], dim=1)[:, :, None, None]           # [B, L+max_q, 1, 1]
    tables = block_tables.long()
    kc = k_cache[tables].reshape(B, L, Hkv, D)
    vc = v_cache[tables].reshape(B, L, Hkv, D)
    keys = torch.cat([kc, k[new_idx]], dim=1).float()                        # [B, L+max_q, Hkv, D]
    vals = torch.cat([vc, v[new_idx]], dim=1).float()
    keys = torch.where(key_ok, keys, 0.0)
    vals = torch.where(key_ok, vals, 0.0)

    # Visibility for each padded query row.
    new_vis = mask[new_idx] & new_valid[:, None, :]                             # [B, max_q, max_q]
    vis = torch.cat([ctx_vis[:, None, :].expand(B, max_q, L), new_vis], dim=2)  # [B, max_q, L+max_q]

    qp = q[new_idx].float().view(B, max_q, Hkv, group, D)                       # head h = kv * group + g
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qp, keys) * scale
    scores = scores.masked_fill(~vis[:, None, None, :, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vals).reshape(B, max_q, Hq, D)

    # Scatter the valid padded rows back to packed order.
    t = torch.arange(T, device=dev)
    seq = (query_start[1:].long()[None, :] <= t[:, None]).sum(dim=1)            # [T]
    pos_in_seq = t - q_start[seq]
    return out[seq, pos_in_seq].to(q.dtype)


SHORT_QUERIES = 16   # split_attention: sequences with 2..16 new tokens (draft trees) form one group


def _blocks_for(context_lens: torch.Tensor, block_size: int) -> int:
    """Block-table columns that hold the longest of these contexts."""
    return -(-int(context_lens.max()) // block_size) if context_lens.numel() else 0


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[S, columns * block_size, Hkv, D]: each row's blocks of a pool, in order (a copy)."""
    return cache.index_select(0, tables.long().flatten()).view(tables.shape[0], -1, *cache.shape[2:])


def _attend_gathered(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, key_ok: torch.Tensor,
                     vis: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch's fused attention over gathered keys: q [S, Q, Hq, D]; keys and vals [S, K, Hkv, D],
    fresh copies, zeroed here where key_ok [S, K] is False (so garbage in them, even NaN, cannot
    leak, as in the reference); vis [S, Q, K] the query-key visibility. Float32; [S, Q, Hq, D]."""
    hidden = ~key_ok[:, :, None, None]
    keys.masked_fill_(hidden, 0)
    vals.masked_fill_(hidden, 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), keys.transpose(1, 2).float(), vals.transpose(1, 2).float(),
        attn_mask=vis[:, None], scale=scale, enable_gqa=q.shape[2] != keys.shape[2])
    return out.transpose(1, 2)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`tree_paged_attention_reference` for a decode step: each sequence has at most one new token
    (sequences without one, a bucket's padding rows, are skipped).

    Token t's keys are one gather of its sequence's blocks per pool, plus one more block whose
    first slot holds t's own key; slots t does not see are zeroed (so garbage in them, even
    NaN, cannot leak, as in the reference), and torch's scaled_dot_product_attention runs in
    float32 over them. No padding to the longest query and no per-row copies: on the CPU about
    10x the reference's speed at 64 decodes of 176 tokens (demo shape), 3x at 32 of 512.
    """
    T = q.shape[0]
    bs = k_cache.shape[1]
    tables, ctx = block_tables, context_lens
    if T != block_tables.shape[0]:
        seq = torch.nonzero(query_start[1:] - query_start[:-1]).flatten()
        tables, ctx = block_tables[seq], context_lens[seq]
    tables = tables[:, :_blocks_for(ctx, bs)]     # the columns these contexts reach, not the step's widest
    L = tables.shape[1] * bs
    tables = torch.cat([tables, tables.new_zeros(T, 1)], dim=1)   # one more block: slot L takes t's key
    keys, vals = _gather(k_cache, tables), _gather(v_cache, tables)
    keys[:, L] = k
    vals[:, L] = v
    vis = torch.arange(L + bs, device=q.device)[None, :] < ctx.long()[:, None]   # [T, L + bs]
    vis[:, L] = mask[:, 0]
    return _attend_gathered(q[:, None], keys, vals, vis, vis[:, None], scale)[:, 0].to(q.dtype)


def group_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`tree_paged_attention_reference` for a step whose sequences all have new tokens (prefill
    chunks, draft trees), as the CPU runs it: each sequence's blocks gathered once per pool, its new
    keys appended (padded to the step's most new tokens), slots no query sees zeroed, and torch's
    scaled_dot_product_attention in float32 with the context and tree mask as its boolean mask."""
    T = q.shape[0]
    bs = k_cache.shape[1]
    S = block_tables.shape[0]
    starts = query_start[:-1].long()
    n = (query_start[1:] - query_start[:-1]).long()
    max_q = int(n.max())
    tables = block_tables[:, :_blocks_for(context_lens, bs)]
    L = tables.shape[1] * bs
    j = torch.arange(max_q, device=q.device)
    new_idx = (starts[:, None] + j[None, :]).clamp(max=T - 1)                   # [S, max_q]
    valid = j[None, :] < n[:, None]                                             # [S, max_q]
    keys = torch.cat([_gather(k_cache, tables), k[new_idx]], dim=1)          # [S, L + max_q, Hkv, D]
    vals = torch.cat([_gather(v_cache, tables), v[new_idx]], dim=1)
    ctx_vis = torch.arange(L, device=q.device)[None, :] < context_lens.long()[:, None]          # [S, L]
    new_vis = mask[new_idx][:, :, :max_q] & valid[:, None, :]                  # [S, max_q, max_q]
    vis = torch.cat([ctx_vis[:, None, :].expand(S, max_q, L), new_vis], dim=2)  # [S, max_q, L + max_q]
    vis |= ~valid[:, :, None] & (torch.arange(L + max_q, device=q.device) == 0)   # padded rows: one key, discarded
    out = _attend_gathered(q[new_idx], keys, vals, torch.cat([ctx_vis, valid], dim=1), vis, scale)
    return out[valid].to(q.dtype)                                               # [T, Hq, D], packed order


@torch.library.custom_op(OP_NAME, mutates_args=())
def tree_paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """The registered op; see `tree_paged_attention_reference` for the contract."""
    return tree_paged_attention_reference(q, k, v, k_cache, v_cache, block_tables,
                                          context_lens, query_start, mask, scale)


@tree_paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale):
    return torch.empty_like(q)


def gpu_kernels():
    """The Triton kernel module, or a RuntimeError that says what to install."""
    try:
        from apar_rt.kernels import tree_attention
    except ImportError as e:
        raise RuntimeError(f"apar::tree_paged_attention on CUDA needs the Triton kernel language ({e}); "
                           f"install it with `pip install triton` (PyTorch's CUDA wheels ship a matching one)"
                           ) from None
    return tree_attention


def split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`tree_paged_attention_reference` for any step, as the CPU runs it, in groups that are not
    padded to each other's queries: the sequences with one new token through `decode_attention`;
    the others (draft trees, prefill chunks) through `group_attention`, one call per group of
    2..SHORT_QUERIES, 17..32, 33..64, ... new tokens, each group with only the block-table and
    mask columns it uses. A mixed step then costs about what its parts cost apart (32 decodes and
    a 980-token chunk: 1.1x; with 16 draft trees and two chunks besides: 1.2x)."""
    q_len = query_start[1:] - query_start[:-1]
    if bool((q_len <= 1).all()):
        return decode_attention(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale)
    starts = query_start[:-1].long()
    out = torch.empty_like(q)
    one = torch.nonzero(q_len == 1).flatten()
    if one.numel():
        t = starts[one]
        out[t] = decode_attention(q[t], k[t], v[t], k_cache, v_cache, block_tables[one], context_lens[one],
                                  torch.arange(one.numel() + 1, dtype=query_start.dtype, device=q.device),
                                  mask[t], scale)
    # groups of multi-token sequences that pad to at most twice each other's queries: 2..16
    # (draft trees), 17..32, 33..64, ... (prefill chunks)
    size = torch.clamp(q_len, min=SHORT_QUERIES).float().log2().ceil()
    size[q_len <= 1] = -1
    for g in torch.unique(size[size >= 0]).tolist():
        seqs = torch.nonzero(size == g).flatten()
        # the group's tokens, in packed order, and its own query_start
        n = q_len[seqs].long()
        rows = torch.arange(int(n.sum()), device=q.device) + torch.repeat_interleave(
            starts[seqs] - torch.cumsum(n, 0) + n, n)
        qs = torch.cat([n.new_zeros(1), torch.cumsum(n, 0)]).to(query_start.dtype)
        # the mask columns the group's queries use (group_attention trims the table itself)
        out[rows] = group_attention(q[rows], k[rows], v[rows], k_cache, v_cache, block_tables[seqs],
                                    context_lens[seqs], qs, mask[rows, :int(n.max())], scale)
    return out


@tree_paged_attention.register_kernel("cpu")
def _(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale):
    if q.shape[0] == 0:
        return tree_paged_attention_reference(q, k, v, k_cache, v_cache, block_tables, context_lens,
                                              query_start, mask, scale)
    return split_attention(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale)


@tree_paged_attention.register_kernel("cuda")
def _(q, k, v, k_cache, v_cache, block_tables, context_lens, query_start, mask, scale):
    return gpu_kernels().tree_paged_attention(q, k, v, k_cache, v_cache, block_tables, context_lens,
                                              query_start, mask, scale)
