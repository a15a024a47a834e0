"""MaxText's attention layer: projections, q/k/v norms, rotary, masks, kernels, KV cache, output gate.

The mask is described once (`AttentionMask`: token indices, segment ids, bidirectional blocks and the static
attention type) and every kernel reads it: the reference einsum path materialises it, the cuDNN path maps it to
`is_causal` / a local window / a padding mask. Which kernel runs is decided by `select_kernel`, visible to callers
and tests; the reference path supports everything and is used on CPU and for cached decoding.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Real

from eqx_models.layers.embeddings import RotaryEmbedding
from eqx_models.layers.kv_cache import KVCache
from eqx_models.layers.linear import Linear, is_a
from eqx_models.layers.mlp import get_activation
from eqx_models.layers.norms import L2Norm, RMSNorm

__all__ = [
    "Attention",
    "AttentionMask",
    "KVCache",
    "L2Norm",
    "dot_product_attention",
    "merge_attention",
    "select_kernel",
]

AttentionType = Literal["global", "local_sliding", "chunk", "full"]
Kernel = Literal["auto", "dot_product", "cudnn"]
_ATTENTION_TYPES = ("global", "local_sliding", "chunk", "full")
# MaxText's DEFAULT_MASK_VALUE: finite, so fully masked rows (padding queries) stay NaN-free.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Causal reference attention runs in query blocks of at least this many queries, at most this many blocks (which
# bounds the graph at long lengths).
_QUERY_BLOCK = 256
_MAX_QUERY_BLOCKS = 16


# ----------------------------------------------------------------------------------------------------------
# Masks


def _bidirectional_blocks(mask: Bool[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Id of the contiguous run of `True` each token belongs to, -1 outside runs."""
    previous = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
    run = jnp.cumsum(mask & ~previous, axis=-1)
    return jnp.where(mask, run, -1)


class AttentionMask(eqx.Module):
    """Which keys each query may see: built once from token indices and segment ids, read by every kernel.

    A query at stream index `i` of segment `s` sees a key at index `j` of segment `t` iff `t == s != 0` and
    the attention type allows `(i, j)`: `global` causal `j <= i`; `local_sliding` also `j > i - sliding_window`;
    `chunk` also `i // chunk_size == j // chunk_size` (indices counted from the row's first real token);
    `full` everything. Tokens of the same bidirectional
    block (a contiguous run of image tokens) also see each other. `segmented` is False when the caller gave no
    segment ids (every token is real and in one segment), so a kernel may drop the segment mask altogether.
    `cached` is True when the keys are a cache's slots rather than the queries' own tokens.
    """

    q_index: Int[Array, " q"]
    kv_index: Int[Array, " kv"]
    q_segment_ids: Int[Array, "batch q"]
    kv_segment_ids: Int[Array, "batch kv"]
    q_blocks: Int[Array, "batch q"] | None
    kv_blocks: Int[Array, "batch kv"] | None
    attention_type: str = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    segmented: bool = eqx.field(static=True, default=True)
    cached: bool = eqx.field(static=True, default=False)

    @classmethod
    def build(
        cls,
        segment_ids: Int[Array, "batch seq"],
        *,
        attention_type: str = "global",
        sliding_window: int | None = None,
        chunk_size: int | None = None,
        bidirectional_mask: Bool[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        start_index: Int[Array, ""] | int = 0,
        segmented: bool = True,
    ) -> "AttentionMask":
        """The mask for `seq` new tokens starting at `start_index`, against themselves or against `cache`
        (which must already hold them). Pass `segmented=False` only when `segment_ids` are all ones."""
        _check_attention_type(attention_type, sliding_window, chunk_size)
        seq = segment_ids.shape[1]
        q_index = start_index + jnp.arange(seq, dtype=jnp.int32)
        q_blocks = None if bidirectional_mask is None else _bidirectional_blocks(bidirectional_mask)
        if cache is None:
            kv_index, kv_segment_ids, kv_blocks = q_index, segment_ids, q_blocks
        else:
            kv_index = jnp.arange(cache.max_length, dtype=jnp.int32)
            kv_segment_ids = cache.segment_ids
            kv_blocks = None
            if q_blocks is not None:
                empty = jnp.full(cache.segment_ids.shape, -1, jnp.int32)
                kv_blocks = jax.lax.dynamic_update_slice(empty, q_blocks.astype(jnp.int32), (0, start_index))
        return cls(
            q_index, kv_index, segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
            q_blocks, kv_blocks, attention_type, sliding_window, chunk_size, segmented or cache is not None,
            cache is not None,
        )

    def dense(self, queries: slice = slice(None), keys: slice = slice(None)) -> Bool[Array, "batch q kv"]:
        """The boolean mask `[batch, q, kv]` (True = attend), or its block of rows `queries` and columns `keys`."""
        q, kv = self.q_index[queries, None], self.kv_index[None, keys]
        allowed = jnp.ones((q.shape[0], kv.shape[1]), bool) if self.attention_type == "full" else kv <= q
        if self.attention_type == "local_sliding":
            allowed = allowed & (kv > q - self.sliding_window)
        allowed = allowed[None]
        if self.attention_type == "chunk":
            # Chunks count from each row's first real token, so left padding does not move their boundaries.
            first = jnp.argmax(self.kv_segment_ids != 0, axis=-1)[:, None, None]
            allowed = allowed & ((q[None] - first) // self.chunk_size == (kv[None] - first) // self.chunk_size)
        if self.q_blocks is not None:
            q_blocks, kv_blocks = self.q_blocks[:, queries, None], self.kv_blocks[:, None, keys]
            allowed = allowed | ((q_blocks == kv_blocks) & (q_blocks >= 0))
        q_seg, kv_seg = self.q_segment_ids[:, queries, None], self.kv_segment_ids[:, None, keys]
        return allowed & (q_seg == kv_seg) & (kv_seg != 0)

    def causal_blocks(self) -> list[tuple[slice, slice]] | None:
        """Blocks of at least 256 queries (at most 16 blocks), each with the keys it can see: those before its
        end and, with a window or chunks, after its start minus their size. None where no block can skip keys:
        a cache's keys, `full` attention, bidirectional blocks, or fewer than 512 queries."""
        q_len = self.q_index.shape[0]
        count = min(_MAX_QUERY_BLOCKS, q_len // _QUERY_BLOCK)
        if self.cached or self.attention_type == "full" or self.q_blocks is not None or count < 2:
            return None
        reach = {"local_sliding": self.sliding_window, "chunk": self.chunk_size}.get(self.attention_type)
        bounds = [i * q_len // count for i in range(count + 1)]
        return [
            (slice(start, end), slice(0 if reach is None else max(0, start - reach + 1), end))
            for start, end in zip(bounds[:-1], bounds[1:])
        ]


def _check_attention_type(attention_type: str, sliding_window: int | None, chunk_size: int | None) -> None:
    if attention_type not in _ATTENTION_TYPES:
        raise ValueError(f"attention_type must be one of {_ATTENTION_TYPES}, got {attention_type!r}")
    for name, size, user in (("sliding_window", sliding_window, "local_sliding"), ("chunk_size", chunk_size, "chunk")):
        if attention_type == user and not (is_a(size, int) and size >= 1):
            raise ValueError(f"{user} attention needs {name} >= 1 (an int), got {size!r}")
        if attention_type != user and size is not None:
            raise ValueError(f"{name} applies to {user!r} attention only, not {attention_type!r} (got {size!r})")


# ----------------------------------------------------------------------------------------------------------
# Kernels


def dot_product_attention(
    query: Float[Array, "batch q heads head_dim"],
    key: Float[Array, "batch kv kv_heads head_dim"],
    value: Float[Array, "batch kv kv_heads head_dim"],
    mask: Bool[Array, "batch q kv"] | AttentionMask,
    *,
    scale: float,
    logits_soft_cap: float | None = None,
    sinks: Float[Array, " heads"] | None = None,
    float32_qk_product: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "batch q heads head_dim"], tuple[Float[Array, "batch q heads"], Float[Array, "batch q heads"]]]:
    """Reference attention (einsum, grouped-query), supporting every feature.

    Returns the normalised output and the softmax statistics `(max, sum)` of each query row (float32), so
    partial attentions over disjoint key sets can be combined with `merge_attention`. Logits, softmax and the
    statistics are float32; the probabilities are cast back to the value dtype before `probs @ v`, as HF does.

    `mask` is dense, or an `AttentionMask`, which causal attention over 512 or more of the queries' own tokens
    reads in query blocks (`AttentionMask.causal_blocks`, not with dropout, whose draw covers the whole score
    matrix): each block multiplies only the keys it can see, about half the work at length. On XLA's CPU backend
    a Qwen3-0.6B layer's attention goes from 19-21 to 9-10 ms at 512 tokens (the two blocks run side by side) and
    from 320 to 160 ms at 2048. Rows that see no key at all (padding queries) average the values of their
    block's keys instead of all values.
    """
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    lengths = (query.shape[1], key.shape[1])
    if not lengths[0]:
        raise ValueError(f"attention needs at least one query, got query shape {query.shape}")
    if isinstance(mask, AttentionMask) and (mask.q_index.shape[0], mask.kv_index.shape[0]) != lengths:
        raise ValueError(f"mask is for (queries, keys) = {(mask.q_index.shape[0], mask.kv_index.shape[0])}, "
                         f"attention has {lengths}")
    if not isinstance(mask, AttentionMask) and (mask.ndim != 3 or mask.shape[1:] != lengths
                                                or mask.shape[0] not in (1, query.shape[0])):
        raise ValueError(f"a dense mask must be [batch, queries, keys] = [{query.shape[0]}, {lengths[0]}, "
                         f"{lengths[1]}] (batch may be 1), got {list(mask.shape)}")
    if query.shape[1] != 1:
        key, value = jnp.moveaxis(key, 1, 2), jnp.moveaxis(value, 1, 2)
    options = dict(scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks, float32_qk_product=float32_qk_product)
    if isinstance(mask, AttentionMask):
        blocks = None if dropout_rate > 0.0 else mask.causal_blocks()
        if blocks is None:
            mask = mask.dense()
        else:
            parts = [
                _attend(query[:, queries], key[:, :, keys], value[:, :, keys], mask.dense(queries, keys), **options)
                for queries, keys in blocks
            ]
            out = jnp.concatenate([out for out, _ in parts], axis=1)
            return out, tuple(jnp.concatenate(stat, axis=1) for stat in zip(*(stats for _, stats in parts)))
    return _attend(query, key, value, mask, **options, dropout_rate=dropout_rate, dropout_key=dropout_key)


def _attend(
    query: Array,
    key: Array,
    value: Array,
    mask: Array,
    *,
    scale: float,
    logits_soft_cap: float | None,
    sinks: Array | None,
    float32_qk_product: bool,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """`dot_product_attention` on a dense mask. Keys and values come heads-major, `[batch, kv_heads, kv,
    head_dim]`, for several queries, so both matmuls read contiguous rows (XLA would otherwise lay the keys out
    `[head_dim, kv]`, a strided copy), and as stored, `[batch, kv, kv_heads, head_dim]`, for one query (a decode
    step reads the cache where it lies)."""
    batch, q_len, heads, head_dim = query.shape
    decode = q_len == 1
    kv_heads = key.shape[2] if decode else key.shape[1]
    groups = heads // kv_heads
    # Query head h = j * groups + g reads key/value head j (HF's repeat_kv, i.e. repeat_interleave).
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    k = key
    if float32_qk_product:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    # One query per row (a decode step): multiply-and-reduce in float32, rounded like the matmul's output, reads
    # the cache where it lies; XLA's batched matmul would first copy the whole cache into a heads-major order.
    if decode:
        logits = jnp.sum(q[:, 0, None].astype(jnp.float32) * k[:, :, :, None].astype(jnp.float32), axis=-1)
        logits = jnp.moveaxis(logits.astype(q.dtype), 1, -1)[:, :, :, None]
    else:
        # a key/value head's query groups as one block of rows, so each head is one [groups * q, kv] matmul:
        # XLA's CPU matmul batched over (kv_heads, groups) ran 2.6x slower
        rows = jnp.moveaxis(q, 1, 3).reshape(batch, kv_heads, groups * q_len, head_dim)
        logits = jnp.einsum("bkrd,bksd->bkrs", rows, k).reshape(batch, kv_heads, groups, q_len, -1)
    logits = logits.astype(jnp.float32) * scale
    if logits_soft_cap is not None:
        logits = jnp.tanh(logits / logits_soft_cap) * logits_soft_cap
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    exps = jnp.exp(logits - row_max)
    row_sum = jnp.sum(exps, axis=-1, keepdims=True)
    if sinks is not None:
        row_sum = row_sum + jnp.exp(sink - row_max)
    probs = exps / row_sum
    if dropout_rate > 0.0:
        if dropout_key is None:
            raise ValueError("attention dropout needs a key (pass key=..., or inference=True)")
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    if decode:
        p = jnp.moveaxis(probs[:, :, :, 0].astype(value.dtype), -1, 1)[..., None].astype(jnp.float32)
        out = jnp.sum(p * value[:, :, :, None].astype(jnp.float32), axis=1)[:, None].astype(value.dtype)
    else:
        rows = probs.astype(value.dtype).reshape(batch, kv_heads, groups * q_len, -1)
        out = jnp.einsum("bkrs,bksd->bkrd", rows, value).reshape(batch, kv_heads, groups, q_len, head_dim)
        out = jnp.moveaxis(out, 3, 1)
    to_rows = lambda s: jnp.moveaxis(s[..., 0], 3, 1).reshape(batch, q_len, heads)  # noqa: E731
    return out.reshape(batch, q_len, heads, head_dim), (to_rows(row_max), to_rows(row_sum))


def merge_attention(
    outputs: list[Float[Array, "batch q heads head_dim"]],
    stats: list[tuple[Float[Array, "batch q heads"], Float[Array, "batch q heads"]]],
) -> tuple[Float[Array, "batch q heads head_dim"], tuple[Float[Array, "batch q heads"], Float[Array, "batch q heads"]]]:
    """Combines attentions over disjoint key sets (flash-decoding style) from their `(max, sum)` statistics.
    Attention sinks are one more logit per row: give `sinks` to one of the partial attentions only."""
    global_max = stats[0][0]
    for row_max, _ in stats[1:]:
        global_max = jnp.maximum(global_max, row_max)
    weights = [row_sum * jnp.exp(row_max - global_max) for row_max, row_sum in stats]
    total = sum(weights)
    out = sum(o.astype(jnp.float32) * (w / total)[..., None] for o, w in zip(outputs, weights))
    return out.astype(outputs[0].dtype), (global_max, total)


def _cudnn_max_head_dim(backend: str) -> int:
    """cuDNN fused attention takes head_dim up to 256 from Hopper (compute capability 9.0) on, 128 before."""
    try:
        capability = jax.devices("gpu")[0].compute_capability if backend == "gpu" else "9.0"
    except RuntimeError:  # asked about a GPU where there is none (tests): Hopper's limit
        capability = "9.0"
    return 256 if tuple(int(part) for part in capability.split(".")[:2]) >= (9, 0) else 128


def select_kernel(
    requested: str,
    *,
    dtype: DTypeLike,
    head_dim: int,
    mask: AttentionMask,
    logits_soft_cap: float | None = None,
    sinks: bool = False,
    dropout: bool = False,
    float32_qk_product: bool = False,
    backend: str | None = None,
) -> Literal["dot_product", "cudnn"]:
    """The kernel that runs: `requested` unless "auto", which picks cuDNN fused attention on GPU when every
    feature in use is one it supports (bf16/fp16, head_dim a multiple of 8 up to 256 from Hopper on, else 128, no
    cache, causal / sliding / full mask without bidirectional blocks or chunking, even lengths with segment ids
    (cuDNN's bias gradient needs them), no soft cap, sinks, dropout or fp32 qk product), and the reference path
    otherwise."""
    backend = backend or jax.default_backend()
    max_head_dim = _cudnn_max_head_dim(backend)
    supported = (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= max_head_dim
        and not mask.cached
        and not (mask.segmented and (mask.q_index.shape[0] % 2 or mask.kv_index.shape[0] % 2))
        and mask.attention_type in ("global", "local_sliding", "full")
        and mask.q_blocks is None
        and logits_soft_cap is None
        and not sinks
        and not dropout
        and not float32_qk_product
    )
    if requested == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention_kernel='cudnn' needs a GPU backend, this one is {backend!r}")
        if not supported:
            raise ValueError(
                "attention_kernel='cudnn' cannot run this configuration (needs bf16/fp16, head_dim % 8 == 0 and "
                f"<= {max_head_dim}, no KV cache, causal/sliding/full mask, even lengths with "
                "segment ids, no soft cap, sinks, dropout or bidirectional blocks)"
            )
        return "cudnn"
    if requested == "dot_product":
        return "dot_product"
    return "cudnn" if backend == "gpu" and supported else "dot_product"


def cudnn_attention(
    query: Float[Array, "batch q heads head_dim"],
    key: Float[Array, "batch kv kv_heads head_dim"],
    value: Float[Array, "batch kv kv_heads head_dim"],
    mask: AttentionMask,
    *,
    scale: float,
) -> Float[Array, "batch q heads head_dim"]:
    """cuDNN fused attention via `jax.nn.dot_product_attention`: causality and the window are cuDNN's own masks;
    segment ids (packing, padding), when the caller gave any, become a boolean mask, which cuDNN reads as a dense
    `[batch, 1, q, kv]` bias, so unsegmented batches skip it."""
    window = None
    if mask.attention_type == "local_sliding":
        window = (mask.sliding_window - 1, 0)
    segments = None
    if mask.segmented:
        q_seg, kv_seg = mask.q_segment_ids[:, None, :, None], mask.kv_segment_ids[:, None, None, :]
        segments = (q_seg == kv_seg) & (kv_seg != 0)
    with jax.named_scope("cudnn_attention"):
        return jax.nn.dot_product_attention(
            query, key, value, mask=segments, scale=scale, is_causal=mask.attention_type != "full",
            local_window_size=window, implementation="cudnn",
        )


# ----------------------------------------------------------------------------------------------------------
# The layer


class Attention(eqx.Module):
    """Multi-head attention with MaxText's knobs (MHA / GQA / MQA, any head_dim).

    Projections are separate (`query`, `key`, `value`), fused (`fused_qkv`: one `qkv` projection to
    `(q_heads + 2 kv_heads, head_dim)`) or shared (`share_kv_projections`: values are the key projection).
    Order of operations: project -> q/k RMSNorm per head (`use_qk_norm`; `qk_norm_scale_offset=1` gives the
    zero-centred `1+w` form) and optional v-norm -> RoPE (`rotary`, any embedding module; `None` for NoPE, where
    Llama-4 temperature tuning can apply) -> scale-less `L2Norm` of q/k (`use_l2_qk_norm`, Llama-4) -> q scaled by
    `query_pre_attn_scalar` (then the softmax scale is 1, else `head_dim**-0.5`) -> attention (masks, soft cap,
    sinks, dropout) -> optional Qwen3-Next output gate (`output_gate`: the query projection emits
    `[query | gate]` per head, and the output is multiplied by `sigmoid(gate)`) -> output projection.
    """

    query: Linear | None
    key: Linear | None
    value: Linear | None
    qkv: Linear | None
    out: Linear
    query_norm: RMSNorm | None
    key_norm: RMSNorm | None
    value_norm: RMSNorm | None
    rotary: eqx.Module | None
    sinks: Float[Array, " heads"] | None
    num_query_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    attention_type: str = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    share_kv_projections: bool = eqx.field(static=True)
    output_gate: bool = eqx.field(static=True)
    use_l2_qk_norm: bool = eqx.field(static=True)
    query_pre_attn_scalar: float | None = eqx.field(static=True)
    logits_soft_cap: float | None = eqx.field(static=True)
    float32_qk_product: bool = eqx.field(static=True)
    temperature_tuning: bool = eqx.field(static=True)
    temperature_tuning_scale: float = eqx.field(static=True)
    temperature_tuning_floor_scale: float = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    attention_kernel: str = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        embed_dim: int,
        num_query_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rotary: eqx.Module | None | Literal["default"] = "default",
        rope_theta: float = 10_000.0,
        attention_type: str = "global",
        sliding_window: int | None = None,
        chunk_size: int | None = None,
        use_bias: bool = False,
        use_out_bias: bool | None = None,
        fused_qkv: bool = False,
        share_kv_projections: bool = False,
        use_qk_norm: bool = False,
        qk_norm_scale_offset: float = 0.0,
        use_v_norm: bool = False,
        norm_eps: float = 1e-6,
        use_l2_qk_norm: bool = False,
        output_gate: bool = False,
        query_pre_attn_scalar: float | None = None,
        logits_soft_cap: float | None = None,
        attention_sinks: bool = False,
        float32_qk_product: bool = False,
        temperature_tuning: bool = False,
        temperature_tuning_scale: float = 0.1,
        temperature_tuning_floor_scale: float = 8192.0,
        dropout_rate: float = 0.0,
        attention_kernel: str = "auto",
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        if min(embed_dim, num_query_heads, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"Attention sizes must be positive, got embed_dim={embed_dim}, num_query_heads={num_query_heads}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        if num_query_heads % num_kv_heads:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        _check_attention_type(attention_type, sliding_window, chunk_size)
        if fused_qkv and (share_kv_projections or output_gate):
            raise ValueError("fused_qkv cannot be combined with share_kv_projections or output_gate")
        if attention_kernel not in ("auto", "dot_product", "cudnn"):
            raise ValueError(f"attention_kernel must be 'auto', 'dot_product' or 'cudnn', got {attention_kernel!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
        if rotary == "default":
            rotary = RotaryEmbedding(head_dim, max_timescale=rope_theta)
        rotary_dims = getattr(rotary, "embedding_dims", head_dim)
        if rotary is not None and rotary_dims != head_dim:
            raise ValueError(f"rotary embedding is built for head_dim {rotary_dims}, attention head_dim is {head_dim}")

        self.num_query_heads, self.num_kv_heads, self.head_dim = num_query_heads, num_kv_heads, head_dim
        self.attention_type, self.sliding_window, self.chunk_size = attention_type, sliding_window, chunk_size
        self.share_kv_projections, self.output_gate = share_kv_projections, output_gate
        self.use_l2_qk_norm, self.query_pre_attn_scalar = use_l2_qk_norm, query_pre_attn_scalar
        self.logits_soft_cap, self.float32_qk_product = logits_soft_cap, float32_qk_product
        self.temperature_tuning = temperature_tuning
        self.temperature_tuning_scale = temperature_tuning_scale
        self.temperature_tuning_floor_scale = temperature_tuning_floor_scale
        self.dropout_rate, self.attention_kernel, self.dtype = dropout_rate, attention_kernel, jnp.dtype(dtype)
        self.rotary = rotary

        k_q, k_k, k_v, k_o = jax.random.split(key, 4)
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        if fused_qkv:
            self.qkv = Linear(embed_dim, (num_query_heads + 2 * num_kv_heads, head_dim), key=k_q, **common)
            self.query = self.key = self.value = None
        else:
            self.qkv = None
            query_dim = 2 * head_dim if output_gate else head_dim
            self.query = Linear(embed_dim, (num_query_heads, query_dim), key=k_q, **common)
            kv_shape = (num_kv_heads, head_dim)
            self.key = Linear(embed_dim, kv_shape, key=k_k, **common)
            self.value = None if share_kv_projections else Linear(embed_dim, kv_shape, key=k_v, **common)
        out_common = dict(common, use_bias=use_bias if use_out_bias is None else use_out_bias)
        self.out = Linear((num_query_heads, head_dim), embed_dim, key=k_o, **out_common)

        norm = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.query_norm = RMSNorm(head_dim, scale_offset=qk_norm_scale_offset, **norm) if use_qk_norm else None
        self.key_norm = RMSNorm(head_dim, scale_offset=qk_norm_scale_offset, **norm) if use_qk_norm else None
        self.value_norm = RMSNorm(head_dim, **norm) if use_v_norm else None
        self.sinks = jnp.zeros((num_query_heads,), param_dtype) if attention_sinks else None

    def project(
        self, x: Float[Array, "batch seq embed"]
    ) -> tuple[Float[Array, "batch seq heads head_dim"], Float[Array, "batch seq kv_heads head_dim"],
               Float[Array, "batch seq kv_heads head_dim"], Float[Array, "batch seq heads head_dim"] | None]:
        """`(query, key, value, gate)` straight out of the projections (gate only with `output_gate`)."""
        if self.qkv is not None:
            qkv = checkpoint_name(self.qkv(x), "qkv_proj")
            nq, nkv = self.num_query_heads, self.num_kv_heads
            return qkv[:, :, :nq], qkv[:, :, nq : nq + nkv], qkv[:, :, nq + nkv :], None
        query, gate = checkpoint_name(self.query(x), "query_proj"), None
        if self.output_gate:
            query, gate = query[..., : self.head_dim], query[..., self.head_dim :]
        key = checkpoint_name(self.key(x), "key_proj")
        value = key if self.value is None else checkpoint_name(self.value(x), "value_proj")
        return query, key, value, gate

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        bidirectional_mask: Bool[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq embed"], KVCache | None]:
        """`x` -> `(y, cache)`.

        `positions` (rotary positions; `[batch, seq, 3]` for MRoPE) default to the tokens' stream indices.
        `segment_ids` (0 = padding) default to all ones. With a `cache`, the new keys/values are appended to
        it and the queries attend over everything it holds; the updated cache is returned. `key` drives
        attention dropout when `dropout_rate > 0` and not `inference`.
        """
        batch, seq, _ = x.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end_index
        segmented = segment_ids is not None
        if segment_ids is None:
            segment_ids = jnp.ones((batch, seq), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        for name, value in (("positions", positions), ("segment_ids", segment_ids),
                            ("bidirectional_mask", bidirectional_mask)):
            if value is not None and value.shape[:2] != (batch, seq):
                raise ValueError(f"{name} {value.shape} do not match input (batch, seq) = {(batch, seq)}")
        if cache is not None and cache.key.shape[2:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"cache holds (kv_heads, head_dim) = {cache.key.shape[2:]}, layer has "
                f"{(self.num_kv_heads, self.head_dim)}"
            )

        query, key_, value, gate = self.project(x)
        if self.query_norm is not None:
            query, key_ = self.query_norm(query), self.key_norm(key_)
        if self.value_norm is not None:
            value = self.value_norm(value)
        if self.rotary is not None:
            query, key_ = self.rotary(query, positions), self.rotary(key_, positions)
            if self.use_l2_qk_norm:
                query, key_ = L2Norm()(query), L2Norm()(key_)
        elif self.temperature_tuning:
            text_positions = positions if positions.ndim == 2 else positions[..., 0]
            floor = jnp.floor((text_positions.astype(jnp.float32) + 1.0) / self.temperature_tuning_floor_scale)
            scales = jnp.log(floor + 1.0) * self.temperature_tuning_scale + 1.0
            query = query * scales[:, :, None, None].astype(query.dtype)
        scale = 1.0
        if self.query_pre_attn_scalar is not None:
            query = query * self.query_pre_attn_scalar
        else:
            scale = 1.0 / math.sqrt(self.head_dim)

        reads_cache = cache is not None and not cache.empty  # an empty cache adds nothing to the new keys
        if cache is not None:
            cache = cache.update(key_, value, segment_ids)
        if reads_cache:
            key_, value = cache.keys_values(self.dtype)
        mask = AttentionMask.build(
            segment_ids, attention_type=self.attention_type, sliding_window=self.sliding_window,
            chunk_size=self.chunk_size, bidirectional_mask=bidirectional_mask, cache=cache if reads_cache else None,
            start_index=start, segmented=segmented,
        )
        dropout = self.dropout_rate > 0.0 and not inference
        kernel = select_kernel(
            self.attention_kernel, dtype=self.dtype, head_dim=self.head_dim, mask=mask,
            logits_soft_cap=self.logits_soft_cap, sinks=self.sinks is not None, dropout=dropout,
            float32_qk_product=self.float32_qk_product,
        )
        if kernel == "cudnn":
            attended = cudnn_attention(query, key_, value, mask, scale=scale)
        else:
            attended, _ = dot_product_attention(
                query, key_, value, mask, scale=scale, logits_soft_cap=self.logits_soft_cap,
                sinks=self.sinks, float32_qk_product=self.float32_qk_product,
                dropout_rate=self.dropout_rate if dropout else 0.0, dropout_key=key,
            )
        attended = checkpoint_name(attended, "context")
        if gate is not None:
            attended = attended * get_activation("sigmoid")(gate)
        return checkpoint_name(self.out(attended), "out_proj"), cache
