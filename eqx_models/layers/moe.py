"""Routed mixture of experts: router, two compute paths, and the load-balancing statistics.

Routing follows HF Qwen3-MoE by default (`softmax_topk`: softmax over all experts in float32, then top-k, then
optional renormalisation); `topk_softmax` is MaxText's default (top-k of the logits, softmax over the chosen).

Compute paths (`impl`):
- `"sorted"`: the (token, choice) pairs are sorted by expert, gathered into per-expert buffers of `capacity` rows,
  multiplied by the expert weights with one batched einsum per projection, and scattered back. No one-hot
  dispatch tensor and no `ragged_dot` (which falls back to a very slow dense path on current GPU and CPU stacks).
- `"grouped"`: the pairs are sorted by expert into blocks of `block` rows, each expert's run padded to whole
  blocks, and every block is multiplied by its own expert's weights (gathered per block). Work grows with
  `tokens * top_k`, not with `tokens * experts`, so this is the dropless path; a batch-1 decode step touches
  about `top_k` experts instead of all of them.
- `"grouped_pallas"`: `"grouped"` with both projections as a Pallas Triton grouped matmul
  (`eqx_models.layers.grouped_matmul`) that reads each tile's expert weights in place instead of copying them per
  block. Interpreted off GPU; blocks under 16 rows on GPU (a few tokens) keep the XLA form. Not yet measured on
  a GPU, so `"auto"` does not pick it.
- `"dense"`: GShard dispatch/combine one-hot einsums `[tokens, experts, capacity]`.
- `"auto"` (default): `"sorted"` with a capacity. Dropless, it checks at run time (`lax.cond`) whether every
  expert's load fits buffers of `fast_capacity_factor` times the mean load: if so the sorted path runs with
  those buffers (dense batched matmuls, no per-block weight copies; balanced routing), else the grouped path.
  Both give the same result. Where the sorted buffers would hold more rows, or read more expert weights, than
  the grouped blocks (a few tokens: a decode step) it is always grouped.
`capacity_factor=None` is dropless (capacity = number of tokens); otherwise each expert keeps
`ceil(tokens * top_k / experts * capacity_factor)` rows and later (token, choice) pairs over capacity are
dropped, in token order, identically in every path. Tokens are all those of the call (every leading dim):
MaxText's dense path counts capacity per sequence instead, `max(ceil(seq * top_k / experts) * factor, factor)`.

The sorted and dense paths fill per-expert buffers `[experts, capacity, embed]` and hand them to one expert
function (`RoutedMoE.forward(..., expert_fn=)`); expert parallelism (`eqx_models.partitioning.expert_parallel`)
swaps in an all-to-all exchange around the local experts there, so the layer itself holds no sharding code. A
call with `expert_fn` uses the sorted buffers whatever `impl` says.
"""

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from eqx_models.layers.grouped_matmul import grouped_matmul, grouped_matmul_tiles_fit
from eqx_models.layers.linear import Linear, scaled_normal
from eqx_models.layers.mlp import get_activation


class RouterStats(NamedTuple):
    """Additive routing statistics; sum them over layers, then `load_balancing_loss`."""

    expert_counts: Float[Array, " experts"]  # top-k assignments per expert over valid tokens
    expert_probs: Float[Array, " experts"]  # sum over valid tokens of softmax(router logits)
    num_tokens: Float[Array, ""]


def load_balancing_loss(stats: RouterStats, num_experts: int) -> Float[Array, ""]:
    """Switch-style auxiliary loss `E * sum_e (count_e / N) * (prob_e / N)`, N = tokens summed over layers
    (HF `load_balancing_loss_func`)."""
    n = jnp.maximum(stats.num_tokens, 1.0)
    return num_experts * jnp.sum((stats.expert_counts / n) * (stats.expert_probs / n))


def router_aux_loss(stats: object) -> Float[Array, ""]:
    """`load_balancing_loss` of every `RouterStats` in a pytree (a model's per-layer statistics) summed; 0 when
    there are none (dense models)."""
    router = [s for s in jax.tree.leaves(stats, is_leaf=lambda s: isinstance(s, RouterStats))
              if isinstance(s, RouterStats)]
    if not router:
        return jnp.zeros((), jnp.float32)
    total = jax.tree.map(lambda *xs: sum(xs), *router)
    return load_balancing_loss(total, total.expert_counts.shape[-1])


def route(
    logits: Float[Array, "tokens experts"],
    top_k: int,
    *,
    routing: str = "softmax_topk",
    norm_topk_prob: bool = False,
) -> tuple[Float[Array, "tokens top_k"], Int[Array, "tokens top_k"], Float[Array, "tokens experts"]]:
    """`(weights, expert ids, probabilities over all experts)`, all routing math in float32."""
    logits32 = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits32, axis=-1)
    if routing == "softmax_topk":
        weights, ids = jax.lax.top_k(probs, top_k)
        if norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    elif routing == "topk_softmax":
        top_logits, ids = jax.lax.top_k(logits32, top_k)
        weights = jax.nn.softmax(top_logits, axis=-1)
    else:
        raise ValueError(f"routing must be 'softmax_topk' or 'topk_softmax', got {routing!r}")
    return weights, ids, probs


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    if capacity_factor is None:
        return num_tokens
    return min(num_tokens, max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor)))


def expert_mlp(
    x: Float[Array, "experts capacity embed"],
    wi: Float[Array, "experts embed acts mlp"],
    wo: Float[Array, "experts mlp embed"],
    activations: tuple[str, ...],
    dtype: DTypeLike,
) -> Float[Array, "experts capacity embed"]:
    """Each expert's gated MLP `wo(prod act_i(x @ wi[..., i, :]))` on its buffer, one batched einsum per
    projection."""
    h = jnp.einsum("xce,xeam->xcam", x, wi.astype(dtype))
    return jnp.einsum("xcm,xme->xce", _gated(h, activations), wo.astype(dtype))


def _gated(h: Float[Array, "*rows acts mlp"], activations: tuple[str, ...]) -> Float[Array, "*rows mlp"]:
    """`prod_i act_i(h[..., i, :])`."""
    y = get_activation(activations[0])(h[..., 0, :])
    for i, name in enumerate(activations[1:], start=1):
        y = y * get_activation(name)(h[..., i, :])
    return y


def group_block_size(pairs: int, num_experts: int) -> int:
    """Rows per block of the grouped path: a power of two near `pairs / (2 * experts)`, in [8, 512]. Padding
    costs up to `experts * block` rows of compute, the per-block weight copies `pairs / block` expert-weight
    reads; this balances the two."""
    return int(min(512, max(8, 2 ** math.floor(math.log2(max(1, pairs // (2 * num_experts)))))))


def group_blocks(pairs: int, num_experts: int, block: int) -> int:
    """Blocks of the grouped path: expert runs padded to whole blocks need at most `pairs // block` plus one per
    non-empty expert."""
    return pairs // block + min(num_experts, pairs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_blocks(weights: Array, block_expert: Int[Array, " blocks"], num_experts: int) -> Array:
    """`weights[block_expert]` (`block_expert` sorted); the weight gradient sums each expert's blocks in float32
    (a plain gather's transpose would add them in the compute dtype)."""
    return weights[block_expert]


def _take_blocks_fwd(weights, block_expert, num_experts):
    return weights[block_expert], block_expert


def _take_blocks_bwd(num_experts, block_expert, cotangent):
    summed = jax.ops.segment_sum(cotangent.astype(jnp.float32), block_expert, num_experts, indices_are_sorted=True)
    return summed.astype(cotangent.dtype), None


_take_blocks.defvjp(_take_blocks_fwd, _take_blocks_bwd)


def _slots(ids: Int[Array, "tokens top_k"], valid: Bool[Array, " tokens"], num_experts: int):
    """Position of each (token, choice) within its expert's queue, in token order; invalid tokens get -1."""
    one_hot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32) * valid[:, None, None].astype(jnp.int32)
    flat = one_hot.reshape(-1, num_experts)
    position = jnp.cumsum(flat, axis=0) - flat
    slot = jnp.sum(position * flat, axis=-1).reshape(ids.shape)
    return jnp.where(valid[:, None], slot, -1)


MOE_IMPLS = ("auto", "sorted", "grouped", "grouped_pallas", "dense")


class RoutedMoE(eqx.Module):
    """Top-k routed experts, each a gated MLP `wo(prod act_i(x @ wi[..., i, :]))`.

    `__call__(x, token_mask)` returns `(y, RouterStats)`; `token_mask` (False for padding) excludes tokens from
    the statistics and from expert capacity.
    """

    gate: Linear
    wi: Float[Array, "experts embed acts mlp"]
    wo: Float[Array, "experts mlp embed"]
    num_experts: int = eqx.field(static=True)
    num_experts_per_tok: int = eqx.field(static=True)
    norm_topk_prob: bool = eqx.field(static=True)
    routing: str = eqx.field(static=True)
    activations: tuple[str, ...] = eqx.field(static=True)
    impl: str = eqx.field(static=True)
    capacity_factor: float | None = eqx.field(static=True)
    fast_capacity_factor: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        embed_dim: int,
        mlp_dim: int,
        num_experts: int,
        num_experts_per_tok: int,
        *,
        norm_topk_prob: bool = False,
        routing: str = "softmax_topk",
        activations: tuple[str, ...] = ("silu", "linear"),
        impl: str = "auto",
        capacity_factor: float | None = None,
        fast_capacity_factor: float = 1.25,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        if not 0 < num_experts_per_tok <= num_experts:
            raise ValueError(f"need 0 < num_experts_per_tok ({num_experts_per_tok}) <= num_experts ({num_experts})")
        if impl not in MOE_IMPLS:
            raise ValueError(f"impl must be one of {MOE_IMPLS}, got {impl!r}")
        if routing not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"routing must be 'softmax_topk' or 'topk_softmax', got {routing!r}")
        if not activations:
            raise ValueError("RoutedMoE needs at least one activation")
        for name in activations:
            get_activation(name)
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.norm_topk_prob, self.routing, self.activations = norm_topk_prob, routing, tuple(activations)
        if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be positive and finite, or None (dropless), got {capacity_factor}")
        if not (math.isfinite(fast_capacity_factor) and fast_capacity_factor >= 1):
            raise ValueError(f"fast_capacity_factor must be finite and >= 1, got {fast_capacity_factor}")
        if impl == "auto" and capacity_factor is not None:
            impl = "sorted"
        self.impl, self.capacity_factor, self.dtype = impl, capacity_factor, jnp.dtype(dtype)
        self.fast_capacity_factor = float(fast_capacity_factor)
        k_gate, k_wi, k_wo = jax.random.split(key, 3)
        self.gate = Linear(embed_dim, num_experts, dtype=dtype, param_dtype=param_dtype, key=k_gate)
        wi_shape = (num_experts, embed_dim, len(self.activations), mlp_dim)
        self.wi = scaled_normal(k_wi, wi_shape, jnp.dtype(param_dtype), 1 / math.sqrt(embed_dim), True)
        wo_shape = (num_experts, mlp_dim, embed_dim)
        self.wo = scaled_normal(k_wo, wo_shape, jnp.dtype(param_dtype), 1 / math.sqrt(mlp_dim), True)

    def _expert_mlp(self, x: Float[Array, "experts capacity embed"]) -> Float[Array, "experts capacity embed"]:
        return expert_mlp(x, self.wi, self.wo, self.activations, self.dtype)

    def __call__(
        self, x: Float[Array, "*batch embed"], token_mask: Bool[Array, "*batch"] | None = None
    ) -> tuple[Float[Array, "*batch embed"], RouterStats]:
        return self.forward(x, token_mask)

    def forward(
        self,
        x: Float[Array, "*batch embed"],
        token_mask: Bool[Array, "*batch"] | None = None,
        *,
        expert_fn: Callable[[Array], Array] | None = None,
    ) -> tuple[Float[Array, "*batch embed"], RouterStats]:
        """`__call__` with the expert computation replaceable: `expert_fn` maps the filled per-expert buffers
        `[num_experts, capacity, embed]` (expert-major, zero rows where unused) to the expert outputs, same
        shape; the default runs every expert here (`expert_mlp` with `self.wi`, `self.wo`). Routing, capacity
        and the combine stay the same, so any `expert_fn` computing the same per-row function gives the same
        result."""
        impl = self.impl if expert_fn is None else ("dense" if self.impl == "dense" else "sorted")
        expert_fn = self._expert_mlp if expert_fn is None else expert_fn
        shape = x.shape
        if token_mask is not None and token_mask.shape != shape[:-1]:
            raise ValueError(f"token_mask has shape {token_mask.shape}; the tokens' is {shape[:-1]}")
        tokens = x.reshape(-1, shape[-1]).astype(self.dtype)
        if not tokens.shape[0]:  # the sorted and grouped buffers cannot be shaped from zero rows
            impl = "dense"
        # any nonzero entry is a real token (segment ids too), as `valid` feeds slot positions and counts
        valid = jnp.ones(tokens.shape[0], bool) if token_mask is None else token_mask.reshape(-1).astype(bool)
        weights, ids, probs = route(
            self.gate(tokens), self.num_experts_per_tok, routing=self.routing, norm_topk_prob=self.norm_topk_prob
        )
        capacity = expert_capacity(tokens.shape[0], self.num_experts_per_tok, self.num_experts, self.capacity_factor)
        slots = _slots(ids, valid, self.num_experts)
        kept = (slots >= 0) & (slots < capacity)
        weights = jnp.where(kept, weights, 0.0).astype(self.dtype)
        if impl == "dense":
            y = self._dense(tokens, ids, slots, kept, weights, capacity, expert_fn)
        elif impl in ("grouped", "grouped_pallas"):
            y = self._grouped(tokens, ids, kept, weights, pallas=impl == "grouped_pallas")
        elif impl == "auto":
            y = self._dropless(tokens, ids, slots, kept, weights)
        else:
            y = self._sorted(tokens, ids, slots, kept, weights, capacity, expert_fn)
        valid32 = valid.astype(jnp.float32)
        counts = jnp.sum(jax.nn.one_hot(ids, self.num_experts, dtype=jnp.float32) * valid32[:, None, None], axis=(0, 1))
        stats = RouterStats(counts, jnp.sum(probs * valid32[:, None], axis=0), jnp.sum(valid32))
        return y.reshape(shape).astype(self.dtype), stats

    def _dense(self, tokens, ids, slots, kept, weights, capacity, expert_fn):
        expert_one_hot = jax.nn.one_hot(ids, self.num_experts, dtype=self.dtype)
        slot_one_hot = jax.nn.one_hot(jnp.where(kept, slots, capacity), capacity, dtype=self.dtype)
        dispatch = jnp.einsum("tkx,tkc->txc", expert_one_hot, slot_one_hot)
        combine = jnp.einsum("tkx,tkc,tk->txc", expert_one_hot, slot_one_hot, weights)
        expert_in = jnp.einsum("txc,te->xce", dispatch, tokens)
        return jnp.einsum("txc,xce->te", combine, expert_fn(expert_in))

    def _sorted(self, tokens, ids, slots, kept, weights, capacity, expert_fn):
        num_tokens, top_k = ids.shape
        # Flat buffer row of each kept (token, choice); dropped pairs go to a scratch row past the end.
        row = jnp.where(kept, ids * capacity + slots, self.num_experts * capacity)
        token_of_pair = jnp.broadcast_to(jnp.arange(num_tokens)[:, None], ids.shape)
        source = jnp.full((self.num_experts * capacity + 1,), num_tokens, jnp.int32)
        source = source.at[row.reshape(-1)].set(token_of_pair.reshape(-1).astype(jnp.int32))[:-1]
        padded = jnp.concatenate([tokens, jnp.zeros((1, tokens.shape[1]), tokens.dtype)])
        expert_in = padded[source].reshape(self.num_experts, capacity, -1)
        expert_out = expert_fn(expert_in).reshape(self.num_experts * capacity, -1)
        expert_out = jnp.concatenate([expert_out, jnp.zeros((1, expert_out.shape[1]), expert_out.dtype)])
        gathered = expert_out[row]
        return jnp.einsum("tke,tk->te", gathered, weights)

    def _dropless(self, tokens, ids, slots, kept, weights):
        experts, pairs = self.num_experts, ids.size
        capacity = expert_capacity(ids.shape[0], ids.shape[1], experts, self.fast_capacity_factor)
        block = group_block_size(pairs, experts)
        blocks = group_blocks(pairs, experts, block)
        if experts > blocks or experts * capacity > blocks * block:
            return self._grouped(tokens, ids, kept, weights)
        # Differentiating a cond keeps the residuals of both branches (zeros for the one not taken); saving only
        # the matmul outputs keeps that small (no per-block weight copies), the gathers are redone backward.
        keep_dots = functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.checkpoint_dots)
        fast = keep_dots(lambda t, w: self._sorted(t, ids, slots, kept, w, capacity, self._expert_mlp))
        grouped = keep_dots(lambda t, w: self._grouped(t, ids, kept, w))
        fits = jnp.max(slots) < capacity  # every expert's load fits: nothing is dropped at this capacity
        return jax.lax.cond(fits, fast, grouped, tokens, weights)

    def _grouped(self, tokens, ids, kept, weights, pallas=False):
        num_tokens, top_k = ids.shape
        experts, pairs = self.num_experts, ids.size
        block = group_block_size(pairs, experts)
        blocks = group_blocks(pairs, experts, block)
        expert_of_pair = jnp.where(kept, ids, experts).reshape(-1)  # dropped pairs sort last, into bucket E
        counts = jnp.bincount(expert_of_pair, length=experts + 1)[:experts]
        padded = (counts + block - 1) // block * block
        padded_end = jnp.cumsum(padded)
        order = jnp.argsort(expert_of_pair, stable=True)
        sorted_expert = expert_of_pair[order]
        in_range = sorted_expert < experts
        expert = jnp.minimum(sorted_expert, experts - 1)
        rank = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[expert]
        row_of_sorted = jnp.where(in_range, padded_end[expert] - padded[expert] + rank, blocks * block)
        source = jnp.full((blocks * block + 1,), num_tokens, jnp.int32)
        source = source.at[row_of_sorted].set((order // top_k).astype(jnp.int32))[:-1]
        padded_tokens = jnp.concatenate([tokens, jnp.zeros((1, tokens.shape[1]), tokens.dtype)])
        expert_in = padded_tokens[source].reshape(blocks, block, -1)
        # Blocks past the last expert's run hold only zero rows; they reuse the last expert's weights.
        block_expert = jnp.searchsorted(padded_end, jnp.arange(blocks) * block, side="right")
        block_expert = jnp.minimum(block_expert, experts - 1)
        wi, wo = self.wi.astype(self.dtype), self.wo.astype(self.dtype)
        _, embed, acts, mlp = wi.shape
        tile = min(block, 128)
        if pallas and grouped_matmul_tiles_fit(tile, embed, acts * mlp) and grouped_matmul_tiles_fit(tile, mlp, embed):
            tile_expert = jnp.repeat(block_expert, block // tile).astype(jnp.int32)
            h = grouped_matmul(expert_in.reshape(-1, embed), wi.reshape(experts, embed, -1), tile_expert, tile)
            expert_out = grouped_matmul(_gated(h.reshape(-1, acts, mlp), self.activations), wo, tile_expert, tile)
        else:
            wi, wo = (_take_blocks(w, block_expert, experts) for w in (wi, wo))
            expert_out = expert_mlp(expert_in, wi, wo, self.activations, self.dtype).reshape(blocks * block, -1)
        expert_out = jnp.concatenate([expert_out, jnp.zeros((1, expert_out.shape[1]), expert_out.dtype)])
        row_of_pair = jnp.zeros((pairs,), jnp.int32).at[order].set(row_of_sorted.astype(jnp.int32))
        gathered = expert_out[row_of_pair.reshape(num_tokens, top_k)]
        return jnp.einsum("tke,tk->te", gathered, weights)
