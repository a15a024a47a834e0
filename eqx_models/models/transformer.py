"""The generic decoder stack: token embedding -> scanned layers -> final norm -> logits.

Layers are stored stacked: the layer kinds are grouped into the shortest repeating pattern (period `p`); position
`b` of the pattern is one module whose every leaf has a leading axis of `num_layers / p` repeats, and one
`jax.lax.scan` applies the pattern that many times, so compile time stays flat in depth. A homogeneous model has
`p = 1`; Qwen3-Next's `[linear, linear, linear, full]` has `p = 4`.

A decoder layer is any module called as
`layer(x, positions=, segment_ids=, cache=, key=, inference=) -> (x, cache, stats)`, where `stats` is an
additive pytree (e.g. MoE router statistics) or None.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray, Real

from eqx_models.layers.embeddings import Embed, check_segment_ids
from eqx_models.layers.linear import Linear
from eqx_models.layers.norms import RMSNorm

_SAVED_NAMES = {
    "minimal": ("query_proj", "key_proj", "value_proj", "qkv_proj", "out_proj", "mlpwi", "mlpwo"),
    "minimal_with_context": ("query_proj", "key_proj", "value_proj", "qkv_proj", "out_proj", "mlpwi", "mlpwo",
                             "context"),
    "save_dot_except_mlp": ("query_proj", "key_proj", "value_proj", "qkv_proj", "out_proj"),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj", "qkv_proj"),
}


def remat(fn: Callable, policy: str) -> Callable:
    """`fn` under `jax.checkpoint` with a named policy: `none` (no remat: keep every activation), `full` (keep
    only the layer inputs), or one that also keeps the named projections (`minimal`, `minimal_with_context`,
    `save_dot_except_mlp`, `save_qkv_proj`, as in MaxText)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy in _SAVED_NAMES:
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES[policy]))
    raise ValueError(f"unknown remat policy {policy!r}; choose none, full or one of {sorted(_SAVED_NAMES)}")


def repeating_pattern(kinds: Sequence[Hashable]) -> int:
    """The shortest period `p` dividing `len(kinds)` with `kinds[i] == kinds[i % p]`."""
    n = len(kinds)
    for period in range(1, n + 1):
        if n % period == 0 and all(kinds[i] == kinds[i % period] for i in range(n)):
            return period
    raise AssertionError("unreachable")


def stack_layers(make_layer: Callable[[int, PRNGKeyArray], eqx.Module], kinds: Sequence[Hashable], *,
                 key: PRNGKeyArray) -> tuple[eqx.Module, ...]:
    """One stacked module per pattern position: layer `r * p + b` is slice `r` of block `b`, initialised with its
    own key."""
    period = repeating_pattern(kinds)
    repeats = len(kinds) // period
    keys = jax.random.split(key, len(kinds)).reshape(repeats, period)
    # jitted (a fresh function each time, so no cache keeps the closure): eager init would compile every
    # initialiser op separately, seconds even for tiny models
    return tuple(eqx.filter_jit(lambda k, b=b: _stacked(make_layer, b, k))(keys[:, b]) for b in range(period))


def _stacked(make_layer: Callable[[int, PRNGKeyArray], eqx.Module], kind: int,
             keys: Key[Array, " repeats"]) -> eqx.Module:
    """`make_layer(kind, k)` for each of `keys`, stacked. Built one layer at a time (`lax.map`), so the
    initialisers' temporaries (random bits, float32 draws of bf16 weights) exist for one layer, not for the whole
    stack: a vmapped build of a 1.8B-parameter MoE stack ran out of 23 GB of host memory."""
    shapes = eqx.filter_eval_shape(make_layer, kind, keys[0])
    static = eqx.filter(shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct), inverse=True)
    stacked = jax.lax.map(lambda k: eqx.filter(make_layer(kind, k), eqx.is_array), keys)
    return eqx.combine(stacked, static)


def _add_layer_residual(
    h: Float[Array, "batch seq embed"], residuals: Float[Array, "depth batch seq embed"], layer: Int[Array, ""]
) -> Float[Array, "batch seq embed"]:
    """`h + residuals[layer]` if `layer < depth`, else `h` (`layer` is traced inside the layer scan)."""
    depth = residuals.shape[0]
    residual = jax.lax.dynamic_index_in_dim(residuals, jnp.minimum(layer, depth - 1), keepdims=False)
    return h + jnp.where(layer < depth, residual, jnp.zeros_like(residual)).astype(h.dtype)


class TransformerOutput(NamedTuple):
    hidden: Float[Array, "batch seq embed"]  # after the final norm
    cache: Any  # per-block stacked caches, or None
    stats: Any  # per-block layer statistics summed over layers, or None
    mtp_hidden: tuple[Float[Array, "batch seq embed"], ...] = ()  # final-normed, depth 1..K (training only)


class PromptInputs(NamedTuple):
    """What a model with extra inputs (the Omni thinker) gives `generate` to prefill its `Transformer` with."""

    inputs_embeds: Float[Array, "batch seq embed"] | None
    layer_residuals: Float[Array, "depth batch seq embed"] | None
    positions: Real[Array, "batch seq 3"] | Real[Array, "batch seq"]


def roll_and_mask_by_segment(
    values: Int[Array, "batch seq"], valid: Bool[Array, "batch seq"], segment_ids: Int[Array, "batch seq"]
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """Shifts `values` left by one token; a position stays valid only if it was and its successor belongs to
    the same (non-padding) segment, so predictions never cross packed-sequence boundaries."""
    rolled = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    same = jnp.concatenate([same, jnp.zeros((same.shape[0], 1), bool)], axis=1)
    rolled_valid = jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], axis=1)
    return rolled, rolled_valid & same


class MultiTokenPrediction(eqx.Module):
    """MaxText / DeepSeek-V3 multi-token prediction: depth `k` combines the embedding of token `t + k` with the
    previous depth's hidden state at `t`, `h_k = layer_k(W_k [norm(e_(t+k)); norm(h_(k-1))])`, and is read out
    by the shared final norm and head to predict token `t + k + 1`. Each depth's layer runs at the positions of
    `t` (MaxText shifts positions only for a positional embedding, which these models lack). Training-only:
    logits are unchanged."""

    embedding_norms: tuple[RMSNorm, ...]
    hidden_norms: tuple[RMSNorm, ...]
    projections: tuple[Linear, ...]
    layers: tuple[eqx.Module, ...]

    def __call__(
        self,
        hidden: Float[Array, "batch seq embed"],
        input_ids: Int[Array, "batch seq"],
        positions: Array,
        segment_ids: Int[Array, "batch seq"],
        embed: Embed,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
    ) -> tuple[Float[Array, "batch seq embed"], ...]:
        """Pre-norm hidden states of depths 1..K."""
        outputs = []
        ids, valid = input_ids, segment_ids > 0
        keys = [None] * len(self.layers) if key is None else list(jax.random.split(key, len(self.layers)))
        for emb_norm, hid_norm, projection, layer, layer_key in zip(
            self.embedding_norms, self.hidden_norms, self.projections, self.layers, keys
        ):
            ids, valid = roll_and_mask_by_segment(ids, valid, segment_ids)
            combined = jnp.concatenate([emb_norm(embed(ids)), hid_norm(hidden)], axis=-1)
            hidden, _, _ = layer(projection(combined), positions=positions, segment_ids=segment_ids, cache=None,
                                 key=layer_key, inference=inference)
            outputs.append(hidden)
        return tuple(outputs)


def _unstack(leaves: list[Array]) -> list[list[Array]]:
    """Every stacked array split along its leading axis. On a single CPU device each layer is a view of the
    stacked array's memory (jax takes an aligned host buffer without a copy), so the unrolled layout costs
    neither time nor memory; elsewhere the layers are copied out in one compiled call (eager slicing dispatches
    once per layer and array: 0.7-1.0 s against 0.12-0.17 s for Qwen3-0.6B on CPU)."""
    if all(_on_one_cpu(leaf) for leaf in leaves):
        return [_host_views(leaf) for leaf in leaves]
    return _split(leaves)


@jax.jit
def _split(leaves: list[Array]) -> list[list[Array]]:
    return [list(leaf) for leaf in leaves]


def _on_one_cpu(x: Any) -> bool:
    return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) == 1
            and next(iter(x.sharding.device_set)).platform == "cpu")


def _host_views(stacked: Array) -> list[Array]:
    """`list(stacked)` without copying where jax allows it: `np.asarray` of a CPU array is its own memory, and
    `device_put` of an aligned view keeps that memory, holding `stacked`'s buffer (not donated while held)."""
    host = np.asarray(stacked)
    # the device, not the stacked sharding: on a one-device mesh its spec names the layer axis, which a layer lacks
    placement = next(iter(stacked.sharding.device_set)) if stacked.committed else None
    return [jax.device_put(layer, placement) for layer in host]


class Transformer(eqx.Module):
    """Decoder-only stack. `blocks[b]` holds pattern position `b` for every repeat (leading axis on each leaf).

    Logits are float32: `embed.attend` when `lm_head` is None (tied), else `lm_head`; an optional final
    soft cap `tanh(logits / cap) * cap` follows.
    """

    embed: Embed
    blocks: tuple[eqx.Module, ...]
    norm: eqx.Module
    lm_head: Linear | None
    mtp: MultiTokenPrediction | None
    remat_policy: str = eqx.field(static=True)
    final_logits_soft_cap: float | None = eqx.field(static=True)

    def __init__(self, embed: Embed, blocks: tuple[eqx.Module, ...], norm: eqx.Module, lm_head: Linear | None, *,
                 mtp: MultiTokenPrediction | None = None, remat_policy: str = "none",
                 final_logits_soft_cap: float | None = None):
        remat(lambda x: x, remat_policy)
        self.embed, self.blocks, self.norm, self.lm_head, self.mtp = embed, tuple(blocks), norm, lm_head, mtp
        self.remat_policy, self.final_logits_soft_cap = remat_policy, final_logits_soft_cap

    @property
    def unrolled(self) -> bool:
        """True for the layout of `unroll()`: `blocks[repeat][position]`, one module per layer."""
        return isinstance(self.blocks[0], tuple)

    @property
    def pattern(self) -> tuple[eqx.Module, ...]:
        """The modules of one pattern period (stacked or not; for their static structure)."""
        return self.blocks[0] if self.unrolled else self.blocks

    @property
    def num_repeats(self) -> int:
        return len(self.blocks) if self.unrolled else jax.tree.leaves(self.blocks[0])[0].shape[0]

    @property
    def num_layers(self) -> int:
        return self.num_repeats * len(self.pattern)

    def layer(self, index: int) -> eqx.Module:
        """Layer `index` as an unstacked module (for inspection and tests)."""
        repeat, position = divmod(index, len(self.pattern))
        if self.unrolled:
            return self.blocks[repeat][position]
        return jax.tree.map(lambda leaf: leaf[repeat] if eqx.is_array(leaf) else leaf, self.blocks[position])

    def unroll(self) -> "Transformer":
        """The same stack with every layer's parameters as separate arrays, applied by a Python loop instead of a
        scan. Batch-1 decoding is bound by reading the weights; inside a scan each step slices (copies) its
        layer out of the stacked arrays first, which halves the bandwidth on CPU, so `generate` decodes with
        this layout. On one CPU device the layers are views of the stacked arrays (no copy; while they live,
        the stacked arrays are not donated); elsewhere they are copies. Compile time grows with depth; the
        result is for inference (caches from the model's `init_cache` follow the layout)."""
        if self.unrolled:
            return self
        arrays, static = eqx.partition(self.blocks, eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        layers = _unstack(leaves)
        blocks = tuple(
            eqx.combine(jax.tree.unflatten(treedef, [layer[r] for layer in layers]), static)
            for r in range(self.num_repeats)
        )
        return eqx.tree_at(lambda t: t.blocks, self, blocks)

    def stacked(self) -> "Transformer":
        """The inverse of `unroll`: each pattern position's layers stacked along a leading axis again (a copy)."""
        if not self.unrolled:
            return self
        static = eqx.partition(self.blocks[0], eqx.is_array)[1]
        arrays = jax.tree.map(lambda *layers: jnp.stack(layers), *(eqx.filter(b, eqx.is_array) for b in self.blocks))
        return eqx.tree_at(lambda t: t.blocks, self, eqx.combine(arrays, static))

    def stack_cache(self, per_position: tuple) -> tuple:
        """Empty caches laid out for `forward`, from one cache per pattern position: stacked over the repeats
        (a leading axis, like the parameters), or one tuple per repeat when `unrolled`."""
        if self.unrolled:  # each layer its own buffers, so the caches can be donated
            return tuple(jax.tree.map(jnp.copy, per_position) for _ in range(self.num_repeats))
        repeats = self.num_repeats
        return tuple(jax.tree.map(lambda x: jnp.broadcast_to(x, (repeats,) + x.shape), c) for c in per_position)

    def forward(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        *,
        cache: Any = None,
        inputs_embeds: Float[Array, "batch seq embed"] | None = None,
        layer_residuals: Float[Array, "depth batch seq embed"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> TransformerOutput:
        """Hidden states after the final norm, the updated cache and the summed layer statistics; with an MTP
        block and `inference=False`, also the final-normed hidden states of each prediction depth.

        `layer_residuals[i]` is added to the hidden state after layer `i` for `i < depth` (Qwen3-VL / Omni
        DeepStack visual features, zero outside the visual positions)."""
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if input_ids.ndim != 2 or hidden.shape[:2] != input_ids.shape or not input_ids.shape[1]:
            raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got {input_ids.shape}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(f"segment_ids {segment_ids.shape} must match input_ids {input_ids.shape}")
        if segment_ids is not None:
            check_segment_ids(segment_ids)
        if layer_residuals is not None and layer_residuals.shape[1:] != hidden.shape:
            raise ValueError(f"layer_residuals {layer_residuals.shape} must be [depth, *{hidden.shape}]")
        if layer_residuals is not None and layer_residuals.shape[0] == 0:
            layer_residuals = None
        period, repeats = len(self.pattern), self.num_repeats
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)
        if self.unrolled:
            static = static[0]
        keys = None if key is None else jax.random.split(key, (repeats, period))
        repeat_index = None if layer_residuals is None else jnp.arange(repeats, dtype=jnp.int32)

        def step(h, xs):
            block_params, block_cache, block_keys, repeat = xs
            layers = eqx.combine(block_params, static)
            new_caches, stats = [], []
            for b, layer in enumerate(layers):
                layer_cache = None if block_cache is None else block_cache[b]
                layer_key = None if block_keys is None else block_keys[b]
                h, layer_cache, layer_stats = layer(
                    h, positions=positions, segment_ids=segment_ids, cache=layer_cache, key=layer_key,
                    inference=inference,
                )
                if layer_residuals is not None:
                    h = _add_layer_residual(h, layer_residuals, repeat * period + b)
                new_caches.append(layer_cache)
                stats.append(layer_stats)
            return h, (None if block_cache is None else tuple(new_caches), tuple(stats))

        if self.unrolled:
            outputs = []
            for r in range(repeats):
                xs = tuple(None if x is None else x[r] for x in (dynamic, cache, keys, repeat_index))
                hidden, output = remat(step, self.remat_policy)(hidden, xs)
                outputs.append(output)
            cache = None if cache is None else tuple(c for c, _ in outputs)
            stats = jax.tree.map(lambda *s: sum(s), *(s for _, s in outputs))
        else:
            hidden, (cache, stats) = jax.lax.scan(
                remat(step, self.remat_policy), hidden, (dynamic, cache, keys, repeat_index)
            )
            stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
        mtp_hidden = ()
        if self.mtp is not None and not inference:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            if segment_ids is None:
                segment_ids = jnp.ones_like(input_ids)
            mtp_key = None if key is None else jax.random.fold_in(key, 1)
            depths = self.mtp(hidden, input_ids, positions, segment_ids, self.embed, key=mtp_key, inference=inference)
            mtp_hidden = tuple(self.norm(h) for h in depths)
        return TransformerOutput(self.norm(hidden), cache, stats, mtp_hidden)

    def logits(self, hidden: Float[Array, "*batch embed"]) -> Float[Array, "*batch vocab"]:
        """Float32 logits of final-normed hidden states."""
        if self.lm_head is None:
            logits = self.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        if self.final_logits_soft_cap is not None:
            logits = jnp.tanh(logits / self.final_logits_soft_cap) * self.final_logits_soft_cap
        return logits

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        return self.logits(self.forward(input_ids, positions, segment_ids).hidden)
