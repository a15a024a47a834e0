"""Qwen3-Omni thinker (HF `Qwen3OmniMoeThinkerForConditionalGeneration`): a Qwen3-MoE text decoder with
interleaved MRoPE, fed by a vision encoder (`Qwen3OmniMoeVisionEncoder`, with DeepStack features) and an audio
encoder (`Qwen3OmniAudioEncoder`), each followed by its projector to the text hidden size.

The encoders take packed inputs (all images, or all audio clips, of a batch concatenated along one axis, as HF
does) and a *static* description of the packing: `grid_thw` (temporal, height, width in patches per image or
video) or the frames per clip. Output shapes depend on these, so they are Python ints or concrete arrays read
on the host, never traced values; under `eqx.filter_jit` pass them as tuples or close over them. Likewise the
MRoPE positions (`get_rope_index`, HF's semantics) depend on where the placeholders are: the thinker computes
them from concrete token ids; under `jit` a caller computes them beforehand and passes `position_ids`.

Encoder attention is non-causal within static segments (each frame of each image; each `n_window_infer` window
of each clip): segments of equal length are gathered into one batch for the kernel dispatch of
`layers/attention.py`, so no `[tokens, tokens]` mask is built. All layer stacks are stacked and scanned.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Real, Shaped

from eqx_models.config import Qwen3OmniAudioConfig, Qwen3OmniThinkerConfig, Qwen3OmniVisionConfig
from eqx_models.layers.attention import AttentionMask, cudnn_attention, dot_product_attention, select_kernel
from eqx_models.layers.conv import Conv2d
from eqx_models.layers.embeddings import (
    PositionalEmbedding,
    Qwen3OmniMoeVisionPosEmbedInterpolate,
    Qwen3OmniMoeVisionRotaryEmbedding,
    apply_rotary,
)
from eqx_models.layers.linear import Linear
from eqx_models.layers.mlp import MLP, get_activation
from eqx_models.layers.moe import router_aux_loss
from eqx_models.layers.norms import LayerNorm
from eqx_models.models.qwen3 import Qwen3MoeForCausalLM, init_kv_caches
from eqx_models.models.transformer import PromptInputs, Transformer, TransformerOutput, remat, stack_layers

GridTHW = Sequence[Sequence[int]] | Int[np.ndarray, "images 3"] | Int[Array, "images 3"]
FeatureLens = Sequence[int] | Int[np.ndarray, " clips"] | Int[Array, " clips"]
HostInts = Sequence[int] | Sequence[Sequence[int]] | Shaped[np.ndarray, "..."] | Shaped[Array, "..."]
Seconds = Sequence[float] | Real[np.ndarray, " videos"] | Real[Array, " videos"]

_CHUNK_FRAMES = 100  # 2 * n_window; n_window is fixed at 50 (see Qwen3OmniAudioConfig)
_TOKENS_PER_CHUNK = 13  # HF's hard-coded output length of a full chunk

# ----------------------------------------------------------------------------------------------------------
# Static inputs and segment attention: host-side packing layouts, attention within static segments


def _concrete(value: object, name: str) -> np.ndarray:
    """`value` as a host array; a traced value is refused because shapes or MRoPE positions depend on it."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(
            f"{name} must be static (Python numbers or a concrete array): output shapes or MRoPE positions "
            f"depend on it, so it cannot be traced; under jit pass it as a tuple or close over it (and pass "
            f"position_ids computed by get_rope_index)"
        ) from None


def _static_ints(value: object, name: str) -> np.ndarray:
    """`_concrete(value)` as int64, refusing non-integer values."""
    array = _concrete(value, name)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def segment_attention(
    query: Float[Array, "seq heads head_dim"],
    key: Float[Array, "seq heads head_dim"],
    value: Float[Array, "seq heads head_dim"],
    segment_lengths: Sequence[int],
    *,
    scale: float,
    kernel: str = "auto",
) -> Float[Array, "seq heads head_dim"]:
    """Non-causal attention within consecutive static segments of the packed sequence (HF's `cu_seqlens`).

    Segments of the same length are batched together (a reshape when they are adjacent, a gather otherwise),
    attended without any mask through `select_kernel` (`kernel`: auto / dot_product / cudnn), and put back in
    order.
    """
    seq, heads, head_dim = query.shape
    if sum(segment_lengths) != seq or min(segment_lengths, default=1) <= 0:
        raise ValueError(f"segment lengths {list(segment_lengths)} must be positive and sum to seq = {seq}")
    starts = np.cumsum([0, *segment_lengths[:-1]])
    groups: dict[int, list[int]] = {}
    for start, length in zip(starts.tolist(), segment_lengths, strict=True):
        groups.setdefault(length, []).append(start)

    def attend(q: Array, k: Array, v: Array) -> Array:
        mask = AttentionMask.build(jnp.ones(q.shape[:2], jnp.int32), attention_type="full", segmented=False)
        chosen = select_kernel(kernel, dtype=q.dtype, head_dim=head_dim, mask=mask)
        if chosen == "cudnn":
            return cudnn_attention(q, k, v, mask, scale=scale)
        return dot_product_attention(q, k, v, mask, scale=scale)[0]

    def is_run(rows: np.ndarray) -> bool:
        return bool(np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)))

    def take(x: Array, rows: np.ndarray, count: int, length: int) -> Array:
        x = x[int(rows[0]) : int(rows[0]) + rows.size] if is_run(rows) else x[rows.astype(np.int32)]
        return x.reshape(count, length, heads, head_dim)

    pieces, group_rows = [], []
    for length, group_starts in groups.items():
        rows = (np.asarray(group_starts)[:, None] + np.arange(length)[None]).reshape(-1)
        count = len(group_starts)
        q, k, v = (take(x, rows, count, length) for x in (query, key, value))
        pieces.append(attend(q, k, v).reshape(count * length, heads, head_dim))
        group_rows.append(rows)
    if len(pieces) == 1:
        return pieces[0]
    if all(is_run(rows) for rows in group_rows):  # each group one run: concatenate the runs in order
        return jnp.concatenate([pieces[i] for i in np.argsort([rows[0] for rows in group_rows])], axis=0)
    inverse = np.argsort(np.concatenate(group_rows)).astype(np.int32)
    return jnp.concatenate(pieces, axis=0)[inverse]


def _scan_layers(
    stacked: eqx.Module, x: Array, start: int, stop: int, policy: str, *args: object
) -> Array:
    """Applies layers `start..stop-1` of a stacked module with one `lax.scan` (`layer(x, *args)`)."""
    if stop <= start:
        return x
    dynamic, static = eqx.partition(stacked, eqx.is_array)
    sliced = jax.tree.map(lambda leaf: leaf[start:stop], dynamic)

    def step(h: Array, params: eqx.Module) -> tuple[Array, None]:
        return eqx.combine(params, static)(h, *args), None

    return jax.lax.scan(remat(step, policy), x, sliced)[0]


# ----------------------------------------------------------------------------------------------------------
# Vision encoder: patch embedding, ViT blocks with 2-D rotary, DeepStack mergers, final merger


class Qwen3OmniMoeVisionPatchEmbed(eqx.Module):
    """HF's `Conv3d(kernel = stride = (T, P, P))` on one `(C, T, P, P)` pixel row: one matmul with bias."""

    proj: Linear
    patch_dim: int = eqx.field(static=True)

    def __init__(self, cfg: Qwen3OmniVisionConfig, *, key: PRNGKeyArray):
        self.patch_dim = cfg.patch_dim
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=True, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, key=key)

    def __call__(self, pixel_values: Float[Array, "patches patch_dim"]) -> Float[Array, "patches embed"]:
        if pixel_values.shape[-1] != self.patch_dim:
            raise ValueError(
                f"pixel_values rows must be flattened (channels, temporal_patch, patch, patch) = "
                f"{self.patch_dim} values, got shape {pixel_values.shape}"
            )
        return self.proj(pixel_values)


class Qwen3OmniMoeVisionAttention(eqx.Module):
    """Fused-qkv attention with biases, 2-D rotary on q/k in float32, non-causal within each segment."""

    qkv: Linear  # embed -> (3, heads, head_dim): [q | k | v], as HF's fused rows
    proj: Linear  # (heads, head_dim) -> embed
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    attention_kernel: str = eqx.field(static=True)

    def __init__(self, cfg: Qwen3OmniVisionConfig, *, key: PRNGKeyArray):
        k_qkv, k_proj = jax.random.split(key)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attention_kernel = cfg.attention_kernel
        common = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.qkv = Linear(cfg.hidden_size, (3, cfg.num_heads, cfg.head_dim), key=k_qkv, **common)
        self.proj = Linear((cfg.num_heads, cfg.head_dim), cfg.hidden_size, key=k_proj, **common)

    def __call__(
        self,
        x: Float[Array, "patches embed"],
        cos: Float[Array, "patches head_dim"],
        sin: Float[Array, "patches head_dim"],
        segments: tuple[int, ...],
    ) -> Float[Array, "patches embed"]:
        qkv = checkpoint_name(self.qkv(x), "qkv_proj")
        query, key, value = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # HF rotates in float32 and casts back (apply_rotary_pos_emb_vision)
        cos, sin = cos[:, None], sin[:, None]
        query = apply_rotary(query.astype(jnp.float32), cos, sin).astype(query.dtype)
        key = apply_rotary(key.astype(jnp.float32), cos, sin).astype(key.dtype)
        out = segment_attention(query, key, value, segments, scale=self.head_dim**-0.5,
                                kernel=self.attention_kernel)
        return checkpoint_name(self.proj(checkpoint_name(out, "context")), "out_proj")


class Qwen3OmniMoeVisionMLP(MLP):
    """`linear_fc2(act(linear_fc1(x)))` with biases (tanh-GELU in Qwen3-Omni): the generic one-activation
    `MLP` (`wi` = `linear_fc1`, `wo` = `linear_fc2`)."""

    def __init__(self, cfg: Qwen3OmniVisionConfig, *, key: PRNGKeyArray):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, activations=(cfg.hidden_act,), use_bias=True,
                         dtype=cfg.dtype, param_dtype=cfg.param_dtype, key=key)


class Qwen3OmniMoeVisionBlock(eqx.Module):
    """Pre-LayerNorm (eps 1e-6) block: `x += attn(norm1(x)); x += mlp(norm2(x))`."""

    norm1: LayerNorm
    attn: Qwen3OmniMoeVisionAttention
    norm2: LayerNorm
    mlp: Qwen3OmniMoeVisionMLP

    def __init__(self, cfg: Qwen3OmniVisionConfig, *, key: PRNGKeyArray):
        k_attn, k_mlp = jax.random.split(key)
        norm = dict(eps=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm1, self.norm2 = LayerNorm(cfg.hidden_size, **norm), LayerNorm(cfg.hidden_size, **norm)
        self.attn = Qwen3OmniMoeVisionAttention(cfg, key=k_attn)
        self.mlp = Qwen3OmniMoeVisionMLP(cfg, key=k_mlp)

    def __call__(
        self,
        x: Float[Array, "patches embed"],
        cos: Float[Array, "patches head_dim"],
        sin: Float[Array, "patches head_dim"],
        segments: tuple[int, ...],
    ) -> Float[Array, "patches embed"]:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Qwen3OmniMoeVisionPatchMerger(eqx.Module):
    """Merges each `m x m` block of patches (`m*m` consecutive rows) into one token:
    `mlp_2(gelu_erf(mlp_0(shuffle(ln_q))))`. `use_postshuffle_norm=True` (the deepstack mergers) normalises
    the concatenated `embed * m*m` vector; `False` (the final merger) normalises each patch before
    concatenating."""

    ln_q: LayerNorm
    mlp_0: Linear
    mlp_2: Linear
    use_postshuffle_norm: bool = eqx.field(static=True)
    merged_size: int = eqx.field(static=True)

    def __init__(self, cfg: Qwen3OmniVisionConfig, *, use_postshuffle_norm: bool, key: PRNGKeyArray):
        k_0, k_2 = jax.random.split(key)
        self.use_postshuffle_norm = use_postshuffle_norm
        self.merged_size = cfg.hidden_size * cfg.spatial_merge_size**2
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        norm_size = self.merged_size if use_postshuffle_norm else cfg.hidden_size
        self.ln_q = LayerNorm(norm_size, eps=1e-6, **dtypes)
        self.mlp_0 = Linear(self.merged_size, self.merged_size, use_bias=True, key=k_0, **dtypes)
        self.mlp_2 = Linear(self.merged_size, cfg.out_hidden_size, use_bias=True, key=k_2, **dtypes)

    def __call__(self, x: Float[Array, "patches embed"]) -> Float[Array, "tokens out_hidden"]:
        if x.size % self.merged_size:
            blocks = self.merged_size // x.shape[1]
            raise ValueError(f"{x.shape[0]} patches do not form whole {blocks}-patch blocks")
        if self.use_postshuffle_norm:
            h = self.ln_q(x.reshape(-1, self.merged_size))
        else:
            h = self.ln_q(x).reshape(-1, self.merged_size)
        return self.mlp_2(get_activation("gelu")(self.mlp_0(h)))


class Qwen3OmniMoeVisionProjector(eqx.Module):
    """The projection of vision features to the text hidden size used by the thinker. In HF (and MaxText)
    this is the encoder's final patch merger (`visual.merger`, pre-shuffle norm): there is no other
    projection."""

    merger: Qwen3OmniMoeVisionPatchMerger

    def __init__(self, cfg: Qwen3OmniVisionConfig, *, key: PRNGKeyArray):
        self.merger = Qwen3OmniMoeVisionPatchMerger(cfg, use_postshuffle_norm=False, key=key)

    def __call__(self, x: Float[Array, "patches embed"]) -> Float[Array, "tokens out_hidden"]:
        return self.merger(x)


class Qwen3OmniMoeVisionEncoder(eqx.Module):
    """Qwen3-Omni ViT: patch embedding + interpolated learned positions, `depth` blocks (stacked, scanned)
    with 2-D rotary and per-frame attention, deepstack mergers after the blocks listed in
    `deepstack_visual_indexes`, and the final merger (`projector`).

    `pixel_values` are HF's packed patch rows (every image/video of the batch, rows in spatial-merge-block
    order `(t, h/m, w/m, m, m)`); `grid_thw` gives each one's static `(t, h, w)` in patches (videos: `t > 1`).
    """

    patch_embed: Qwen3OmniMoeVisionPatchEmbed
    pos_embed: Qwen3OmniMoeVisionPosEmbedInterpolate
    blocks: Qwen3OmniMoeVisionBlock  # stacked: every leaf has a leading `depth` axis
    deepstack_mergers: tuple[Qwen3OmniMoeVisionPatchMerger, ...]  # HF `merger_list`
    projector: Qwen3OmniMoeVisionProjector  # HF `merger`
    rotary: Qwen3OmniMoeVisionRotaryEmbedding  # no parameters
    config: Qwen3OmniVisionConfig = eqx.field(static=True)

    def __init__(self, config: Qwen3OmniVisionConfig, *, key: PRNGKeyArray):
        if not isinstance(config, Qwen3OmniVisionConfig):
            raise ValueError(
                f"Qwen3OmniMoeVisionEncoder needs a Qwen3OmniVisionConfig, got {type(config).__name__}"
            )
        cfg = self.config = config
        k_patch, k_pos, k_blocks, k_deep, k_proj = jax.random.split(key, 5)
        self.patch_embed = Qwen3OmniMoeVisionPatchEmbed(cfg, key=k_patch)
        self.pos_embed = Qwen3OmniMoeVisionPosEmbedInterpolate(
            cfg.num_position_embeddings, cfg.hidden_size, cfg.spatial_merge_size, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, key=k_pos,
        )
        self.rotary = Qwen3OmniMoeVisionRotaryEmbedding(
            cfg.hidden_size, cfg.num_heads, cfg.spatial_merge_size, cfg.rope_theta
        )
        self.blocks = stack_layers(lambda _, k: Qwen3OmniMoeVisionBlock(cfg, key=k), ["block"] * cfg.depth,
                                   key=k_blocks)[0]
        self.deepstack_mergers = tuple(
            Qwen3OmniMoeVisionPatchMerger(cfg, use_postshuffle_norm=True, key=k)
            for k in jax.random.split(k_deep, len(cfg.deepstack_visual_indexes))
        )
        self.projector = Qwen3OmniMoeVisionProjector(cfg, key=k_proj)

    def grid(self, grid_thw: GridTHW, name: str = "grid_thw") -> tuple[tuple[int, int, int], ...]:
        """`grid_thw` as validated static `(t, h, w)` tuples (`name` for the error messages)."""
        array = _static_ints(grid_thw, name)
        if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] == 0:
            raise ValueError(f"{name} must be (images, 3) rows of (t, h, w), got shape {array.shape}")
        m = self.config.spatial_merge_size
        for t, h, w in array.tolist():
            if min(t, h, w) <= 0 or h % m or w % m:
                raise ValueError(
                    f"grid (t={t}, h={h}, w={w}) must be positive with h and w multiples of "
                    f"spatial_merge_size {m}"
                )
        return tuple((int(t), int(h), int(w)) for t, h, w in array.tolist())

    def num_tokens(self, grid_thw: GridTHW) -> int:
        """Merged tokens (feature rows) the encoder emits for `grid_thw`: `sum(t * h * w) / merge**2`."""
        return sum(t * h * w for t, h, w in self.grid(grid_thw)) // self.config.spatial_merge_size**2

    def encode(
        self, pixel_values: Float[Array, "patches patch_dim"], grid_thw: GridTHW
    ) -> tuple[Float[Array, "patches embed"], tuple[Float[Array, "tokens out_hidden"], ...]]:
        """Last block's hidden states (HF `last_hidden_state`) and the deepstack features, in block order."""
        cfg, grid = self.config, self.grid(grid_thw)
        total = sum(t * h * w for t, h, w in grid)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != total:
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}, but grid_thw {list(grid)} needs "
                f"sum(t*h*w) = {total} rows"
            )
        x = self.patch_embed(pixel_values)
        pos = jnp.concatenate([self.pos_embed(t, h, w) for t, h, w in grid], axis=0)
        x = x + pos.astype(x.dtype)
        cos_sin = [self.rotary.compute_cos_sin(t, h, w) for t, h, w in grid]
        cos = jnp.concatenate([c for c, _ in cos_sin], axis=0)
        sin = jnp.concatenate([s for _, s in cos_sin], axis=0)
        segments = tuple(h * w for t, h, w in grid for _ in range(t))  # one segment per frame (HF cu_seqlens)

        deepstack, done = [], 0
        for layer in sorted(cfg.deepstack_visual_indexes):
            x = _scan_layers(self.blocks, x, done, layer + 1, cfg.remat_policy, cos, sin, segments)
            done = layer + 1
            deepstack.append(self.deepstack_mergers[cfg.deepstack_visual_indexes.index(layer)](x))
        x = _scan_layers(self.blocks, x, done, cfg.depth, cfg.remat_policy, cos, sin, segments)
        return x, tuple(deepstack)

    def __call__(
        self, pixel_values: Float[Array, "patches patch_dim"], grid_thw: GridTHW
    ) -> tuple[Float[Array, "tokens out_hidden"], tuple[Float[Array, "tokens out_hidden"], ...]]:
        """`(features, deepstack_features)`: one `out_hidden_size` row per merged `m x m` patch block (HF
        `pooler_output` and `deepstack_features`)."""
        hidden, deepstack = self.encode(pixel_values, grid_thw)
        return self.projector(hidden), deepstack


# ----------------------------------------------------------------------------------------------------------
# Audio encoder: 100-frame chunks, three stride-2 convs, windowed Whisper-style layers, projector


def audio_output_lengths(
    feature_lens: int | Sequence[int] | Int[np.ndarray, "*clips"] | Int[Array, "*clips"],
) -> int | tuple[int, ...] | Int[np.ndarray, "*clips"] | Int[Array, "*clips"]:
    """Tokens the audio encoder emits per clip of `feature_lens` frames (HF's
    `_get_feat_extract_output_lengths`): 13 per full 100-frame chunk plus three stride-2 convs' worth of the
    remainder. Works on ints, tuples and (traced) int arrays."""

    def formula(n):
        rest = (n % _CHUNK_FRAMES - 1) // 2 + 1
        return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (n // _CHUNK_FRAMES) * _TOKENS_PER_CHUNK

    if isinstance(feature_lens, (int, np.integer)):
        return int(formula(int(feature_lens)))
    if isinstance(feature_lens, (list, tuple)):
        return tuple(int(formula(int(n))) for n in feature_lens)
    return formula(feature_lens)


def _conv_length(n: int) -> int:
    """Length after three Conv(k3, s2, p1)."""
    for _ in range(3):
        n = (n - 1) // 2 + 1
    return n


class Qwen3OmniAudioAttention(eqx.Module):
    """Multi-head attention with biases on q/k/v/out, no positions, non-causal within each window."""

    query: Linear
    key: Linear
    value: Linear
    out: Linear
    head_dim: int = eqx.field(static=True)
    attention_kernel: str = eqx.field(static=True)

    def __init__(self, cfg: Qwen3OmniAudioConfig, *, key: PRNGKeyArray):
        k_q, k_k, k_v, k_o = jax.random.split(key, 4)
        heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim
        self.attention_kernel = cfg.attention_kernel
        common = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.query = Linear(cfg.d_model, (heads, cfg.head_dim), key=k_q, **common)
        self.key = Linear(cfg.d_model, (heads, cfg.head_dim), key=k_k, **common)
        self.value = Linear(cfg.d_model, (heads, cfg.head_dim), key=k_v, **common)
        self.out = Linear((heads, cfg.head_dim), cfg.d_model, key=k_o, **common)

    def __call__(
        self, x: Float[Array, "tokens embed"], segments: tuple[int, ...]
    ) -> Float[Array, "tokens embed"]:
        query = checkpoint_name(self.query(x), "query_proj")
        key = checkpoint_name(self.key(x), "key_proj")
        value = checkpoint_name(self.value(x), "value_proj")
        out = segment_attention(query, key, value, segments, scale=self.head_dim**-0.5,
                                kernel=self.attention_kernel)
        return checkpoint_name(self.out(checkpoint_name(out, "context")), "out_proj")


class Qwen3OmniAudioEncoderLayer(eqx.Module):
    """Pre-LayerNorm (eps 1e-5) Whisper-style layer: `x += attn(norm(x)); x += fc2(act(fc1(norm(x))))`."""

    input_layer_norm: LayerNorm  # HF self_attn_layer_norm
    self_attention: Qwen3OmniAudioAttention  # HF self_attn
    post_attention_layer_norm: LayerNorm  # HF final_layer_norm
    mlp: MLP  # HF fc1 / fc2

    def __init__(self, cfg: Qwen3OmniAudioConfig, *, key: PRNGKeyArray):
        k_attn, k_mlp = jax.random.split(key)
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, **dtypes)
        self.self_attention = Qwen3OmniAudioAttention(cfg, key=k_attn)
        self.post_attention_layer_norm = LayerNorm(cfg.d_model, eps=1e-5, **dtypes)
        self.mlp = MLP(cfg.d_model, cfg.encoder_ffn_dim, activations=(cfg.activation_function,),
                       use_bias=True, key=k_mlp, **dtypes)

    def __call__(
        self, x: Float[Array, "tokens embed"], segments: tuple[int, ...]
    ) -> Float[Array, "tokens embed"]:
        x = x + self.self_attention(self.input_layer_norm(x), segments)
        return x + self.mlp(self.post_attention_layer_norm(x))


class Qwen3OmniAudioProjector(eqx.Module):
    """`proj2(act(proj1(x)))` to the text hidden size (`output_dim`). In HF these are the last layers of the
    audio encoder (`audio_tower.proj1/proj2`); MaxText calls them the projector, and so do we."""

    proj1: Linear
    proj2: Linear
    activation: str = eqx.field(static=True)

    def __init__(self, cfg: Qwen3OmniAudioConfig, *, key: PRNGKeyArray):
        k_1, k_2 = jax.random.split(key)
        common = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.proj1 = Linear(cfg.d_model, cfg.d_model, key=k_1, **common)
        self.proj2 = Linear(cfg.d_model, cfg.output_dim, key=k_2, **common)
        self.activation = cfg.activation_function

    def __call__(self, x: Float[Array, "*batch embed"]) -> Float[Array, "*batch d_out"]:
        return self.proj2(get_activation(self.activation)(self.proj1(x)))


class _AudioPlan(NamedTuple):
    """Static layout of one batch of clips: chunks, the valid rows after the convs, attention windows."""

    chunk_index: np.ndarray  # (chunks, max_chunk) frame of each chunk slot; `frames` (a zero row) pads
    valid_rows: np.ndarray  # rows of the flattened (chunks * conv_len) that are kept
    windows: tuple[int, ...]


def _audio_plan(lens: Sequence[int], n_window_infer: int) -> _AudioPlan:
    frames = sum(lens)
    chunk_starts, chunk_lens, offset = [], [], 0
    for n in lens:  # 100-frame chunks, the last one shorter (HF chunk_and_pad_features)
        for start in range(0, n, _CHUNK_FRAMES):
            chunk_starts.append(offset + start)
            chunk_lens.append(min(_CHUNK_FRAMES, n - start))
        offset += n
    max_chunk = max(chunk_lens)
    slot = np.arange(max_chunk)[None]
    starts, lengths = np.asarray(chunk_starts)[:, None], np.asarray(chunk_lens)[:, None]
    chunk_index = np.where(slot < lengths, starts + slot, frames).astype(np.int32)
    conv_len = _conv_length(max_chunk)
    valid = [c * conv_len + j for c, n in enumerate(chunk_lens) for j in range(_conv_length(n))]
    # HF (get_audio_cu_seqlens): the window is the longest chunk's output length times n_window_infer // 100
    window = _conv_length(max_chunk) * (n_window_infer // _CHUNK_FRAMES)
    windows = []
    for tokens in audio_output_lengths(tuple(lens)):
        windows += [window] * (tokens // window) + ([tokens % window] if tokens % window else [])
    return _AudioPlan(chunk_index, np.asarray(valid, np.int32), tuple(windows))


class Qwen3OmniAudioEncoder(eqx.Module):
    """Qwen3-Omni audio tower: 100-frame chunks -> three stride-2 Conv2d + erf-GELU -> `conv_out` ->
    sinusoidal positions (restarting in every chunk) -> valid frames -> encoder layers (stacked, scanned;
    attention within `n_window_infer` windows of each clip) -> `ln_post` -> projector (`proj1`, act, `proj2`).

    `input_features` are all clips' log-mel frames concatenated on time; `feature_lens` gives each clip's
    static frame count. Output: `audio_output_lengths(feature_lens)` tokens per clip, clips in order.
    """

    conv2d1: Conv2d
    conv2d2: Conv2d
    conv2d3: Conv2d
    conv_out: Linear
    layers: Qwen3OmniAudioEncoderLayer  # stacked: every leaf has a leading `encoder_layers` axis
    ln_post: LayerNorm
    projector: Qwen3OmniAudioProjector
    positions: PositionalEmbedding  # no parameters
    config: Qwen3OmniAudioConfig = eqx.field(static=True)

    def __init__(self, config: Qwen3OmniAudioConfig, *, key: PRNGKeyArray):
        if not isinstance(config, Qwen3OmniAudioConfig):
            raise ValueError(
                f"Qwen3OmniAudioEncoder needs a Qwen3OmniAudioConfig, got {type(config).__name__}"
            )
        cfg = self.config = config
        keys = jax.random.split(key, 6)
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        hidden = cfg.downsample_hidden_size
        conv = dict(stride=2, padding=1, **dtypes)
        self.conv2d1 = Conv2d(1, hidden, 3, key=keys[0], **conv)
        self.conv2d2 = Conv2d(hidden, hidden, 3, key=keys[1], **conv)
        self.conv2d3 = Conv2d(hidden, hidden, 3, key=keys[2], **conv)
        self.conv_out = Linear(cfg.conv_out_features, cfg.d_model, key=keys[3], **dtypes)
        self.positions = PositionalEmbedding(cfg.d_model, max_wavelength=10_000.0)
        self.layers = stack_layers(lambda _, k: Qwen3OmniAudioEncoderLayer(cfg, key=k),
                                   ["layer"] * cfg.encoder_layers, key=keys[4])[0]
        self.ln_post = LayerNorm(cfg.d_model, eps=1e-5, **dtypes)
        self.projector = Qwen3OmniAudioProjector(cfg, key=keys[5])

    def feature_lens(self, feature_lens: FeatureLens) -> tuple[int, ...]:
        """`feature_lens` as validated static ints."""
        lens = _static_ints(feature_lens, "feature_lens")
        if lens.ndim != 1 or lens.size == 0 or (lens <= 0).any():
            raise ValueError(
                f"feature_lens must be a non-empty list of positive frame counts, got {lens.tolist()}"
            )
        return tuple(int(n) for n in lens)

    def encode(
        self, input_features: Float[Array, "mel frames"], feature_lens: FeatureLens
    ) -> Float[Array, "tokens embed"]:
        """Encoder states after `ln_post` (before the projector), `d_model` wide."""
        cfg, lens = self.config, self.feature_lens(feature_lens)
        if input_features.ndim != 2 or input_features.shape[0] != cfg.num_mel_bins:
            raise ValueError(
                f"input_features must be (num_mel_bins={cfg.num_mel_bins}, frames), got shape "
                f"{input_features.shape}"
            )
        if sum(lens) != input_features.shape[1]:
            raise ValueError(
                f"feature_lens {list(lens)} sum to {sum(lens)}, but input_features has "
                f"{input_features.shape[1]} frames"
            )
        plan = _audio_plan(lens, cfg.n_window_infer)
        frames = input_features.T.astype(cfg.dtype)
        # an extra zero row (index `frames`) pads the short chunks
        frames = jnp.concatenate([frames, jnp.zeros_like(frames[:1])], axis=0)
        x = jnp.swapaxes(frames[plan.chunk_index], 1, 2)[..., None]  # (chunks, mel, time, 1): NHWC, H = mel
        for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
            x = get_activation("gelu")(conv(x))
        chunks, mel_out, time_out, channels = x.shape
        # HF flattens (channels, mel) with channels major: feature = c * mel_out + f
        x = self.conv_out(jnp.transpose(x, (0, 2, 3, 1)).reshape(chunks, time_out, channels * mel_out))
        x = x + self.positions(time_out).astype(x.dtype)  # positions restart at 0 in every chunk
        x = x.reshape(chunks * time_out, -1)[plan.valid_rows]
        x = _scan_layers(self.layers, x, 0, cfg.encoder_layers, cfg.remat_policy, plan.windows)
        return self.ln_post(x)

    def __call__(
        self, input_features: Float[Array, "mel frames"], feature_lens: FeatureLens
    ) -> Float[Array, "tokens d_out"]:
        return self.projector(self.encode(input_features, feature_lens))


# ----------------------------------------------------------------------------------------------------------
# MRoPE position ids: HF `get_rope_index` on the host, from concrete ids, grids and audio lengths


def _vision_positions(
    start: np.float32, t_index: np.ndarray, grid_h: int, grid_w: int, merge: int
) -> Float[np.ndarray, "3 tokens"]:
    """`(3, t * h/m * w/m)` positions of one image/video block: (t_index, row, column) + start."""
    rows, cols = grid_h // merge, grid_w // merge
    t = np.repeat(t_index.astype(np.float32), rows * cols)
    h = np.tile(np.repeat(np.arange(rows, dtype=np.float32), cols), len(t_index))
    w = np.tile(np.arange(cols, dtype=np.float32), len(t_index) * rows)
    return np.stack([t, h, w]) + np.float32(start)


def _run(length: int, start: np.float32) -> np.ndarray:
    """`(3, length)` text-like positions `start, start + 1, ...` on all three axes."""
    return np.broadcast_to(np.arange(length, dtype=np.float32) + np.float32(start), (3, length))


def get_rope_index(
    config: Qwen3OmniThinkerConfig,
    input_ids: HostInts,
    image_grid_thw: GridTHW | None = None,
    video_grid_thw: GridTHW | None = None,
    attention_mask: HostInts | None = None,
    use_audio_in_video: bool = False,
    audio_seqlens: FeatureLens | None = None,
    second_per_grids: Seconds | None = None,
) -> tuple[Float[np.ndarray, "batch seq 3"], Float[np.ndarray, "batch 1"]]:
    """MRoPE position ids `[batch, seq, 3]` (temporal, height, width; HF's layout is `[3, batch, seq]`) and
    the per-row `rope_deltas` (`max position + 1 - number of real tokens`), with HF's semantics (transformers
    5.23 `Qwen3OmniMoeThinkerModel.get_rope_index`), as float32 NumPy arrays.

    Text advances all three axes by one. Each `<vision_start><image/video tokens><vision_end>` block gets
    `(t * position_id_per_seconds [* second_per_grid for videos], row, column)` over the merged grid, offset
    by the next free position; audio blocks (`<audio_start> ... <audio_end>`, `audio_seqlens` frames per
    clip) get 1-D positions; with `use_audio_in_video` a `<vision_start><audio_start>` block interleaves the
    video's and the audio's positions by temporal position. Left padding (`attention_mask` 0) is skipped and
    its positions are 0. Without any image or video grid every position is `cumsum(mask) - 1` (1 on padding),
    as HF does. `attention_mask=None` means no padding.
    """
    ids = _concrete(input_ids, "input_ids").astype(np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool)
    if attention_mask is not None:
        mask = _concrete(attention_mask, "attention_mask") == 1
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
    if image_grid_thw is None and video_grid_thw is None:
        text = np.cumsum(mask, axis=-1).astype(np.float32) - 1
        text[~mask] = 1
        deltas = text.max(axis=-1, keepdims=True) + 1 - mask.sum(axis=-1, keepdims=True)
        return np.repeat(text[..., None], 3, axis=-1), deltas.astype(np.float32)

    def table(value: object, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray | None:
        return None if value is None else _concrete(value, name).astype(dtype).reshape(shape)

    cfg = config
    merge = cfg.vision_config.spatial_merge_size
    images = table(image_grid_thw, "image_grid_thw", np.int64, (-1, 3))
    videos = table(video_grid_thw, "video_grid_thw", np.int64, (-1, 3))
    seconds = table(second_per_grids, "second_per_grids", np.float32, (-1,))
    audio_lens = table(audio_seqlens, "audio_seqlens", np.int64, (-1,))
    if seconds is not None and not (np.isfinite(seconds).all() and (seconds > 0).all()):
        raise ValueError(f"second_per_grids (video_second_per_grid) must be positive and finite, got "
                         f"{seconds.tolist()}")
    vision_start, audio_start = cfg.vision_start_token_id, cfg.audio_start_token_id
    image_token, video_token, audio_token = cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id
    pps = np.float32(cfg.position_id_per_seconds)

    def take(values: np.ndarray | None, index: int, what: str) -> np.ndarray | np.generic:
        if values is None or index >= len(values):
            given = 0 if values is None else len(values)
            raise ValueError(f"the input_ids hold more {what} blocks than the {given} given")
        return values[index]

    def audio_length(index: int) -> int:
        return int(audio_output_lengths(int(take(audio_lens, index, "audio (audio_seqlens)"))))

    def video_t_index(index: int, grid_t: int) -> np.ndarray:
        if seconds is None:
            raise ValueError(
                "videos need second_per_grids (video_second_per_grid) for their temporal positions"
            )
        return np.arange(grid_t).astype(np.float32) * take(seconds, index, "video (second_per_grids)") * pps

    def find(tokens: list[int], token: int, start: int) -> int:
        try:
            return tokens.index(token, start)
        except ValueError:
            raise ValueError(
                f"expected token {token} at or after index {start} of a row's real tokens"
            ) from None

    positions = np.zeros((*ids.shape, 3), np.float32)
    deltas = np.zeros((ids.shape[0], 1), np.float32)
    image_idx = video_idx = audio_idx = 0
    for row in range(ids.shape[0]):
        tokens = ids[row][mask[row]].tolist()
        after_start = [tokens[k + 1] for k in range(len(tokens) - 1) if tokens[k] == vision_start]
        audio_nums = tokens.count(audio_start)
        image_nums = after_start.count(image_token)
        video_nums = after_start.count(audio_start if use_audio_in_video else video_token)
        blocks = image_nums + audio_nums + (0 if use_audio_in_video else video_nums)
        remain_images, remain_videos, remain_audios = image_nums, video_nums, audio_nums
        pieces: list[np.ndarray] = []
        st = 0
        for _ in range(blocks):
            st_idx = pieces[-1].max() + 1 if pieces else np.float32(0)
            if (image_token in tokens or video_token in tokens) and (remain_videos > 0 or remain_images > 0):
                ed_vision = find(tokens, vision_start, st)
            else:
                ed_vision = len(tokens) + 1
            if audio_token in tokens and remain_audios > 0:
                ed_audio = find(tokens, audio_start, st)
            else:
                ed_audio = len(tokens) + 1
            ed = min(ed_vision, ed_audio)
            text_len = ed - st
            if text_len:
                pieces.append(_run(text_len, st_idx))
                st_idx = st_idx + text_len
            audio_in_video = ed == ed_vision and ed_vision + 1 == ed_audio
            after = tokens[ed + 1] if ed + 1 < len(tokens) else None  # the token after <vision_start>
            bos = eos = 2 if audio_in_video else 1
            pieces.append(_run(bos, st_idx))
            st_idx = st_idx + bos
            if ed == ed_audio:
                length = audio_length(audio_idx)
                pieces.append(_run(length, st_idx))
                st += text_len + bos + length + eos
                audio_idx += 1
                remain_audios -= 1
            elif after == image_token:
                t, h, w = (int(x) for x in take(images, image_idx, "image (image_grid_thw)"))
                pieces.append(_vision_positions(st_idx, np.arange(t) * pps, h, w, merge))
                st += text_len + bos + t * h * w // merge**2 + eos
                image_idx += 1
                remain_images -= 1
            elif after == video_token:
                t, h, w = (int(x) for x in take(videos, video_idx, "video (video_grid_thw)"))
                pieces.append(_vision_positions(st_idx, video_t_index(video_idx, t), h, w, merge))
                st += text_len + bos + t * h * w // merge**2 + eos
                video_idx += 1
                remain_videos -= 1
            elif audio_in_video:
                length = audio_length(audio_idx)
                audio = _run(length, st_idx)
                t, h, w = (int(x) for x in take(videos, video_idx, "video (video_grid_thw)"))
                video = _vision_positions(st_idx, video_t_index(video_idx, t), h, w, merge)
                v = a = 0
                while v < video.shape[1] and a < audio.shape[1]:  # interleave by temporal position
                    if video[0, v] <= audio[0, a]:
                        pieces.append(video[:, v : v + 1])
                        v += 1
                    else:
                        pieces.append(audio[:, a : a + 1])
                        a += 1
                pieces += [video[:, v:], audio[:, a:]]
                st += text_len + bos + length + t * h * w // merge**2 + eos
                audio_idx += 1
                video_idx += 1
                remain_videos -= 1
                remain_audios -= 1
            st_idx = _last_max(pieces) + 1
            pieces.append(_run(eos, st_idx))
        if st < len(tokens):
            pieces.append(_run(len(tokens) - st, _last_max(pieces) + 1 if pieces else np.float32(0)))
        row_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.float32)
        if row_positions.shape[1] != len(tokens):
            raise ValueError(
                f"row {row}: the placeholder blocks imply {row_positions.shape[1]} positions but the row has "
                f"{len(tokens)} real tokens; check the grids / audio lengths against the placeholder counts"
            )
        positions[row, mask[row]] = row_positions.T
        deltas[row, 0] = row_positions.max() + 1 - len(tokens) if len(tokens) else 0
    for what, given, used in (("image_grid_thw", images, image_idx), ("video_grid_thw", videos, video_idx),
                              ("audio_seqlens", audio_lens, audio_idx)):
        if given is not None and used != len(given):
            raise ValueError(f"{what} holds {len(given)} entries, but the input_ids have {used} such blocks")
    return positions, deltas


def _last_max(pieces: list[np.ndarray]) -> np.float32:
    """HF's `llm_pos_ids_list[-1].max()`: the maximum of the last non-empty piece."""
    return next(p for p in reversed(pieces) if p.size).max()


# ----------------------------------------------------------------------------------------------------------
# Thinker: encoder outputs at their placeholders, DeepStack after the first text layers, logits


def _scatter_rows(
    base: Float[Array, "batch seq embed"], mask: Bool[Array, "batch seq"], rows: Float[Array, "rows embed"]
) -> Float[Array, "batch seq embed"]:
    """HF `masked_scatter`: the `i`-th `True` of `mask` (row-major) takes `rows[i]`; elsewhere `base`."""
    index = jnp.clip(jnp.cumsum(mask.reshape(-1).astype(jnp.int32)) - 1, 0, rows.shape[0] - 1)
    gathered = rows[index].reshape(base.shape).astype(base.dtype)
    return jnp.where(mask[..., None], gathered, base)


def _check_count(
    input_ids: Int[Array, "batch seq"], token: int, rows: Sequence[int], what: str, in_order: bool = True
) -> None:
    """Placeholder tokens vs the feature rows of each image / video / clip, when the ids are concrete (not checked
    under jit): in total and, `in_order`, each run of consecutive placeholders against its item's rows (features
    fill the placeholders in order, so a block of the wrong length takes rows of the next item)."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    placeholders = np.asarray(input_ids) == token
    tokens, features = int(placeholders.sum()), sum(rows)
    if tokens != features:
        raise ValueError(
            f"{what.capitalize()} features and {what} tokens do not match: {tokens} placeholder tokens (id "
            f"{token}) in input_ids, {features} feature rows from the encoder"
        )
    edges = np.diff(np.pad(placeholders.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    runs = (np.argwhere(edges == -1)[:, 1] - np.argwhere(edges == 1)[:, 1]).tolist()  # row-major, as rows fill
    if in_order and runs != list(rows):
        raise ValueError(
            f"the {what} placeholder blocks in input_ids hold {runs} tokens (id {token}), but the {what}s given "
            f"make {list(rows)} feature rows, in order"
        )


def _trained_fields(module: eqx.Module) -> list[str]:
    """The fields of `module` that hold parameters."""
    return [f.name for f in dataclasses.fields(module)
            if not f.metadata.get("static") and jax.tree.leaves(eqx.filter(getattr(module, f.name), eqx.is_array))]


class Qwen3OmniThinkerForConditionalGeneration(eqx.Module):
    """Qwen3-Omni thinker: `transformer` (the text decoder, a Qwen3-MoE `Transformer` with interleaved MRoPE
    and the LM head), `visual` (vision encoder with DeepStack mergers and final merger), `audio_tower` (audio
    encoder with its projector).

    `freeze_encoders` (static, from `config.freeze_encoders`, default True as MaxText) stops gradients between
    each encoder and its projector, DeepStack features included: the vision merger and the audio `proj1/proj2`
    stay trainable, the encoders' blocks receive zero gradients.
    """

    transformer: Transformer
    visual: Qwen3OmniMoeVisionEncoder
    audio_tower: Qwen3OmniAudioEncoder
    config: Qwen3OmniThinkerConfig = eqx.field(static=True)
    freeze_encoders: bool = eqx.field(static=True)

    def __init__(self, config: Qwen3OmniThinkerConfig, *, key: PRNGKeyArray):
        if not isinstance(config, Qwen3OmniThinkerConfig):
            raise ValueError(
                f"Qwen3OmniThinkerForConditionalGeneration needs a Qwen3OmniThinkerConfig, got "
                f"{type(config).__name__}"
            )
        k_text, k_vision, k_audio = jax.random.split(key, 3)
        self.config, self.freeze_encoders = config, config.freeze_encoders
        self.transformer = Qwen3MoeForCausalLM(config.text_config, key=k_text).transformer
        self.visual = Qwen3OmniMoeVisionEncoder(config.vision_config, key=k_vision)
        self.audio_tower = Qwen3OmniAudioEncoder(config.audio_config, key=k_audio)

    def get_rope_index(
        self,
        input_ids: HostInts,
        image_grid_thw: GridTHW | None = None,
        video_grid_thw: GridTHW | None = None,
        attention_mask: HostInts | None = None,
        use_audio_in_video: bool = False,
        audio_seqlens: FeatureLens | None = None,
        second_per_grids: Seconds | None = None,
    ) -> tuple[Float[np.ndarray, "batch seq 3"], Float[np.ndarray, "batch 1"]]:
        """`get_rope_index(self.config, ...)`."""
        return get_rope_index(self.config, input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              use_audio_in_video, audio_seqlens, second_per_grids)

    def frozen_parts(self, tree: "Qwen3OmniThinkerForConditionalGeneration") -> list:
        """The subtrees of `tree` (this model, or its gradients or optimizer updates) that training leaves as they
        are: with `freeze_encoders`, the encoders' parts before their projectors (`make_train_step` zeroes their
        updates, or weight decay would still shrink them)."""
        if not self.freeze_encoders:
            return []
        return [getattr(getattr(tree, encoder), name)
                for encoder in ("visual", "audio_tower") for name in _trained_fields(getattr(self, encoder))
                if name != "projector"]

    def _encoder_output(self, x: object) -> object:
        """`x` (a pytree of encoder states) behind `stop_gradient` when the encoders are frozen."""
        return jax.lax.stop_gradient(x) if self.freeze_encoders else x

    def _vision_inputs(
        self, input_ids: Int[Array, "batch seq"], *items: tuple[Array | None, GridTHW | None, int, str, bool]
    ) -> list[tuple[Float[Array, "_ patch_dim"], tuple[tuple[int, int, int], ...], int]]:
        """`(pixels, grid, placeholder token)` of each given `(pixels, grid, token, kind, blocks in order)`;
        counts checked."""
        given = []
        for pixels, grid, token, kind, in_order in items:
            if pixels is None:
                continue
            if grid is None:
                raise ValueError(f"{kind} pixels were given without their grid ({kind}_grid_thw)")
            if pixels.ndim != 2:
                raise ValueError(f"{kind} pixels must be [patches, patch_dim], got shape {pixels.shape}")
            grid = self.visual.grid(grid, f"{kind}_grid_thw")
            _check_count(input_ids, token, [self.visual.num_tokens([g]) for g in grid], kind, in_order)
            given.append((pixels, grid, token))
        return given

    def _audio_inputs(
        self,
        input_ids: Int[Array, "batch seq"],
        input_features: Float[Array, "audios mel frames"] | None,
        feature_attention_mask: HostInts | None,
        in_order: bool,
    ) -> Bool[np.ndarray, "audios frames"] | None:
        """The valid frames of each clip (host), placeholders counted (each block's too, `in_order`)."""
        if input_features is None:
            return None
        if input_features.ndim != 3:
            raise ValueError(f"input_features must be [audios, mel, frames], got shape {input_features.shape}")
        if feature_attention_mask is None:
            raise ValueError(
                "input_features need feature_attention_mask (audios, frames) marking the valid frames"
            )
        valid = _concrete(feature_attention_mask, "feature_attention_mask") == 1
        if valid.shape != (input_features.shape[0], input_features.shape[2]):
            raise ValueError(
                f"feature_attention_mask {valid.shape} must be (audios, frames) of input_features "
                f"{input_features.shape} (audios, mel, frames)"
            )
        empty = np.flatnonzero(~valid.any(axis=1)).tolist()
        if empty:
            raise ValueError(f"feature_attention_mask rows {empty} mark no valid frame: every clip needs one")
        rows = audio_output_lengths(tuple(int(n) for n in valid.sum(axis=1)))
        _check_count(input_ids, self.config.audio_token_id, rows, "audio", in_order)
        return valid

    def _merge_audio(
        self,
        input_ids: Int[Array, "batch seq"],
        embeds: Float[Array, "batch seq embed"],
        input_features: Float[Array, "audios mel frames"],
        valid: Bool[np.ndarray, "audios frames"],
    ) -> Float[Array, "batch seq embed"]:
        """`embeds` with the audio placeholders replaced by the projected features of the valid frames."""
        clip, frame = np.nonzero(valid)  # row-major: each clip's valid frames, clips in order (as HF)
        frames = jnp.swapaxes(input_features, 1, 2)[clip, frame].T
        lens = tuple(int(n) for n in valid.sum(axis=1))
        features = self.audio_tower.projector(self._encoder_output(self.audio_tower.encode(frames, lens)))
        return _scatter_rows(embeds, input_ids == self.config.audio_token_id, features)

    def _merge_vision(
        self,
        input_ids: Int[Array, "batch seq"],
        embeds: Float[Array, "batch seq embed"],
        vision: list[tuple[Float[Array, "_ patch_dim"], tuple[tuple[int, int, int], ...], int]],
    ) -> tuple[Float[Array, "batch seq embed"], Float[Array, "levels batch seq embed"] | None]:
        """`embeds` with the image / video placeholders replaced by the merged features, and the DeepStack
        features scattered to the same positions (zero elsewhere). Images and videos go through the encoder in
        one pass (attention is per frame, so this equals HF's separate passes)."""
        pixels = jnp.concatenate([p.astype(self.visual.config.dtype) for p, _, _ in vision], axis=0)
        hidden, levels = self._encoder_output(self.visual.encode(pixels, sum((g for _, g, _ in vision), ())))
        features = self.visual.projector(hidden)
        deepstack = [jnp.zeros_like(embeds) for _ in levels]
        start = 0
        for _, grid, token in vision:
            rows = slice(start, start + self.visual.num_tokens(grid))
            mask, start = input_ids == token, rows.stop
            embeds = _scatter_rows(embeds, mask, features[rows])
            deepstack = [_scatter_rows(d, mask, lv[rows]) for d, lv in zip(deepstack, levels, strict=True)]
        return embeds, (jnp.stack(deepstack) if deepstack else None)

    def _embed(
        self,
        input_ids: Int[Array, "batch seq"],
        pixel_values: Float[Array, "patches patch_dim"] | None,
        image_grid_thw: GridTHW | None,
        pixel_values_videos: Float[Array, "video_patches patch_dim"] | None,
        video_grid_thw: GridTHW | None,
        input_features: Float[Array, "audios mel frames"] | None,
        feature_attention_mask: HostInts | None,
        use_audio_in_video: bool,
    ) -> tuple[Float[Array, "batch seq embed"], Float[Array, "levels batch seq embed"] | None,
               Bool[np.ndarray, "audios frames"] | None]:
        """Token embeddings with the encoders' features at their placeholders, the DeepStack residuals, and the
        valid frames of each audio clip (host). Inputs and placeholder counts are checked before any encoder
        runs (block by block, except for the video and audio tokens that `use_audio_in_video` interleaves)."""
        cfg = self.config
        separate = not use_audio_in_video
        vision = self._vision_inputs(input_ids, (pixel_values, image_grid_thw, cfg.image_token_id, "image", True),
                                     (pixel_values_videos, video_grid_thw, cfg.video_token_id, "video", separate))
        audio_valid = self._audio_inputs(input_ids, input_features, feature_attention_mask, separate)
        embeds = self.transformer.embed(input_ids)
        if audio_valid is not None:
            embeds = self._merge_audio(input_ids, embeds, input_features, audio_valid)
        deepstack = None
        if vision:
            embeds, deepstack = self._merge_vision(input_ids, embeds, vision)
        return embeds, deepstack, audio_valid

    def forward(
        self,
        input_ids: Int[Array, "batch seq"],
        pixel_values: Float[Array, "patches patch_dim"] | None = None,
        image_grid_thw: GridTHW | None = None,
        pixel_values_videos: Float[Array, "video_patches patch_dim"] | None = None,
        video_grid_thw: GridTHW | None = None,
        input_features: Float[Array, "audios mel frames"] | None = None,
        feature_attention_mask: HostInts | None = None,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        position_ids: Real[Array, "batch seq 3"] | Real[Array, "batch seq"] | None = None,
        video_second_per_grid: Seconds | None = None,
        use_audio_in_video: bool = False,
        *,
        positions: Real[Array, "batch seq 3"] | Real[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> TransformerOutput:
        """Final-normed hidden states and MoE router statistics of the text decoder (see `__call__`)."""
        if positions is not None:
            if position_ids is not None:
                raise ValueError("give positions or position_ids (the same thing), not both")
            position_ids = positions
        for name, mask in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
            if mask is not None and mask.shape != input_ids.shape:
                raise ValueError(f"{name} {mask.shape} must match input_ids {input_ids.shape}")
        if attention_mask is not None and segment_ids is not None:
            raise ValueError("give attention_mask (HF: 1 = token, 0 = padding) or segment_ids (packing), not both")
        embeds, deepstack, audio_valid = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                     video_grid_thw, input_features, feature_attention_mask,
                                                     use_audio_in_video)
        if position_ids is None:
            if image_grid_thw is None and video_grid_thw is None:
                # HF's text / audio-only branch: cumsum(mask) - 1, padding at 1 (jittable)
                if attention_mask is not None:
                    real = attention_mask == 1
                    position_ids = jnp.where(real, jnp.cumsum(real.astype(jnp.int32), axis=-1) - 1, 1)
            else:
                if segment_ids is not None:
                    segments = _concrete(segment_ids, "segment_ids")
                    if segments.max(initial=0) > 1:
                        raise ValueError("packed rows (segment_ids > 1) with images or videos need position_ids")
                    attention_mask = (segments != 0).astype(np.int64)
                audio_lens = None if audio_valid is None else audio_valid.sum(axis=1)
                position_ids = jnp.asarray(get_rope_index(
                    self.config, input_ids, image_grid_thw, video_grid_thw, attention_mask, use_audio_in_video,
                    audio_lens, video_second_per_grid,
                )[0])
        if segment_ids is None and attention_mask is not None:
            segment_ids = (attention_mask != 0).astype(jnp.int32)
        return self.transformer.forward(input_ids, position_ids, segment_ids, inputs_embeds=embeds,
                                        layer_residuals=deepstack, key=key, inference=inference)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        pixel_values: Float[Array, "patches patch_dim"] | None = None,
        image_grid_thw: GridTHW | None = None,
        pixel_values_videos: Float[Array, "video_patches patch_dim"] | None = None,
        video_grid_thw: GridTHW | None = None,
        input_features: Float[Array, "audios mel frames"] | None = None,
        feature_attention_mask: HostInts | None = None,
        attention_mask: Shaped[Array, "batch seq"] | None = None,
        position_ids: Real[Array, "batch seq 3"] | Real[Array, "batch seq"] | None = None,
        video_second_per_grid: Seconds | None = None,
        use_audio_in_video: bool = False,
        *,
        positions: Real[Array, "batch seq 3"] | Real[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Float32 logits `[batch, seq, vocab]`; HF's argument names and layouts.

        `pixel_values` / `pixel_values_videos`: packed patch rows of all images / videos, with
        `image_grid_thw` / `video_grid_thw` `(t, h, w)` per item (static). `input_features`
        `(audios, mel, frames)` with `feature_attention_mask` `(audios, frames)` (static; 1 = valid frame).
        `attention_mask` (1 = token, 0 = padding; left padding, as the processor makes) masks attention too.
        `position_ids` `[batch, seq, 3]` (ours; HF's are `[3, batch, seq]`) or `[batch, seq]`; by default
        `get_rope_index` computes them (host, concrete ids), or `cumsum(mask) - 1` without images / videos.
        Unlike HF, which falls back to 1-D positions when `attention_mask` is None, None here means "no
        padding" and MRoPE positions are still used. Placeholder counts are checked against the encoders'
        outputs when `input_ids` are concrete (under `jit`, mismatches are not detected).

        `positions` / `segment_ids` are the names every model here takes: `positions` is `position_ids`;
        `segment_ids` (0 = padding, 1, 2, ... packed sequences) replace `attention_mask` and allow packing;
        text positions then default to the stream index, as for the other models (packed rows with images or
        videos need `positions`).
        """
        out = self.forward(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                           input_features, feature_attention_mask, attention_mask, position_ids,
                           video_second_per_grid, use_audio_in_video, positions=positions, segment_ids=segment_ids)
        return self.transformer.logits(out.hidden)

    def logits(self, hidden: Float[Array, "*batch embed"]) -> Float[Array, "*batch vocab"]:
        return self.transformer.logits(hidden)

    def init_cache(self, batch: int, max_length: int, *, quantized: bool = False, empty: bool = True) -> tuple:
        """Empty KV caches of the text decoder, laid out like its layers (`empty` as for `KVCache.init`)."""
        return init_kv_caches(self.transformer, self.config.text_config, batch, max_length, quantized=quantized,
                              empty=empty)

    def prompt_inputs(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: HostInts | None = None,
        *,
        pixel_values: Float[Array, "patches patch_dim"] | None = None,
        image_grid_thw: GridTHW | None = None,
        pixel_values_videos: Float[Array, "video_patches patch_dim"] | None = None,
        video_grid_thw: GridTHW | None = None,
        input_features: Float[Array, "audios mel frames"] | None = None,
        feature_attention_mask: HostInts | None = None,
        video_second_per_grid: Seconds | None = None,
        use_audio_in_video: bool = False,
    ) -> PromptInputs:
        """What `generate` prefills the text decoder with (host side: the ids must be concrete): the merged
        embeddings, the DeepStack residuals and the MRoPE positions of `get_rope_index`. Decoding goes on from
        the last token's positions, not from `real tokens + rope_deltas`: after an audio-in-video block the
        prompt's largest position can lie before its last token."""
        real = np.ones(np.shape(input_ids), bool) if attention_mask is None else _concrete(
            attention_mask, "attention_mask") != 0
        input_ids = jnp.where(real, input_ids, 0)  # padded slots may hold any id, as `generate` promises
        embeds, deepstack, audio_valid = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                     video_grid_thw, input_features, feature_attention_mask,
                                                     use_audio_in_video)
        positions, _ = get_rope_index(
            self.config, input_ids, image_grid_thw, video_grid_thw, real.astype(np.int64), use_audio_in_video,
            None if audio_valid is None else audio_valid.sum(axis=1), video_second_per_grid,
        )
        return PromptInputs(embeds, deepstack, jnp.asarray(positions))

    def aux_loss(self, stats: object) -> Float[Array, ""]:
        """HF's router load-balancing loss over the MoE layers of the text decoder."""
        return router_aux_loss(stats)
