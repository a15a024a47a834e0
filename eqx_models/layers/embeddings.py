"""Token embeddings and every positional embedding of MaxText's `embeddings.py`, under the same class names.

Rotary layouts: "half-split" (NeoX, HF's `rotate_half`) pairs dim `i` with `i + d/2`; "interleaved" (GPT-J,
Meta's original) pairs `2i` with `2i + 1`. `half_to_interleaved` / `interleaved_to_half` convert between them.

Frequencies are pure functions of static hyper-parameters: they are computed in NumPy float32 in the same
order of operations as HF transformers (so `inv_freq` is within 1 ulp of HF's, mostly equal), folded into the
graph as constants, and never appear as trainable leaves. Angles, cos and sin are float32; cos/sin are cast to the
activation dtype before the rotation, as HF does, except in the vision rotaries, which rotate in float32 and round
once, as HF's do.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, Real, Shaped

from eqx_models.layers.linear import scaled_normal

# ----------------------------------------------------------------------------------------------------------
# Layout helpers and the shared rotation


def _host_min_max(what: str, ids: Any) -> tuple[int, int] | None:
    """`(min, max)` of concrete integer ids read on the host (so a concrete array closed over by a jitted function
    counts); None for traced ones, empty ones and arrays spread over other hosts, which cannot be read here."""
    if not hasattr(ids, "dtype"):
        raise TypeError(f"{what} must be an integer array (JAX or NumPy), got {type(ids).__name__}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{what} must be integers, got dtype {ids.dtype}")
    if isinstance(ids, jax.core.Tracer) or not ids.size:
        return None
    if isinstance(ids, jax.Array) and not ids.is_fully_addressable:
        return None
    host = np.asarray(ids)
    return int(host.min()), int(host.max())


def check_token_ids(ids: Any, num_embeddings: int) -> None:
    """Concrete ids outside `[0, num_embeddings)` raise; ids that cannot be read here are not checked (`Embed`
    gives them NaN rows)."""
    bounds = _host_min_max("token ids", ids)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= num_embeddings):
        raise ValueError(f"token ids must lie in [0, {num_embeddings}), got range [{bounds[0]}, {bounds[1]}]")


def check_segment_ids(segment_ids: Any) -> None:
    """Concrete negative segment ids raise (0 is padding, 1.. a document); ids that cannot be read here are not
    checked, and a negative one acts as padding in the loss."""
    bounds = _host_min_max("segment_ids", segment_ids)
    if bounds is not None and bounds[0] < 0:
        raise ValueError(f"segment_ids must be >= 0 (0 = padding, 1.. = document), got {bounds[0]}")


def rotate_half(x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
    """`[x1, x2] -> [-x2, x1]` (half-split layout)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_interleaved(x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
    """`[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]` (interleaved layout)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def half_to_interleaved(x: Shaped[Array, "*batch dim"]) -> Shaped[Array, "*batch dim"]:
    """`[a0..a(n-1), b0..b(n-1)] -> [a0, b0, a1, b1, ...]`."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.stack([a, b], axis=-1).reshape(x.shape)


def interleaved_to_half(x: Shaped[Array, "*batch dim"]) -> Shaped[Array, "*batch dim"]:
    """`[a0, b0, a1, b1, ...] -> [a0..a(n-1), b0..b(n-1)]`."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.concatenate([pairs[..., 0], pairs[..., 1]], axis=-1)


def apply_rotary(
    x: Float[Array, "*batch dim"], cos: Float[Array, "*#batch dim"], sin: Float[Array, "*#batch dim"], *,
    interleaved: bool = False,
) -> Float[Array, "*batch dim"]:
    """`x * cos + rotate(x) * sin` in `x.dtype`; `cos`/`sin` are already laid out like `x` (angle per dim)."""
    rotate = rotate_interleaved if interleaved else rotate_half
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return x * cos + rotate(x) * sin


def _duplicate(angles: Float[Array, "*batch half"], interleaved: bool) -> Float[Array, "*batch dim"]:
    """One angle per pair -> one angle per dim, in the given layout."""
    if interleaved:
        return jnp.repeat(angles, 2, axis=-1)
    return jnp.concatenate([angles, angles], axis=-1)


def _default_positions(positions: Array | None, batch: int, seq: int) -> Array:
    if positions is None:
        return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if positions.shape != (batch, seq):
        raise ValueError(f"positions {positions.shape} must be (batch, seq) = {(batch, seq)}")
    return positions


def _check_rank4(name: str, x: Array, dims: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} expects [batch, seq, heads, head_dim], got shape {x.shape}")
    if x.shape[-1] != dims:
        raise ValueError(f"{name} was built for head_dim {dims}, got input head_dim {x.shape[-1]} ({x.shape})")


def _check_even(name: str, what: str, value: int) -> None:
    if value <= 0 or value % 2:
        raise ValueError(f"{name}: {what} must be a positive even number, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Frequencies (NumPy float32, HF's order of operations)


def default_inv_freq(dim: int, theta: float, min_timescale: float = 1.0) -> np.ndarray:
    """`1 / (min * (theta / min) ** (arange(0, dim, 2) / dim))`, shape `(dim // 2,)`, float32 like HF."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # pow in float64 then rounded: correctly rounded, unlike NumPy's float32 pow on AVX-512 machines.
    power = np.power(np.float64(theta / min_timescale), exponent.astype(np.float64)).astype(np.float32)
    if min_timescale != 1.0:
        power = np.float32(min_timescale) * power
    return (np.float32(1.0) / power).astype(np.float32)


def llama3_inv_freq(
    inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float, original_max: int
) -> np.ndarray:
    """Llama-3.1 frequency scaling (HF `_compute_llama3_parameters`)."""
    inv_freq = inv_freq.astype(np.float32)
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    # torch evaluates `scalar / tensor` as `reciprocal(tensor) * scalar`; the same order keeps HF's bits.
    wavelen = (np.float32(1.0) / inv_freq) * np.float32(2 * math.pi)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = (((np.float32(1.0) / wavelen) * np.float32(original_max) - np.float32(low_freq_factor))
              / np.float32(high_freq_factor - low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor `0.1 * mscale * ln(scale) + 1` (1 when `scale <= 1`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    dim: int, theta: float, factor: float, original_max: int, beta_fast: float = 32.0, beta_slow: float = 1.0,
    truncate: bool = True,
) -> np.ndarray:
    """YaRN-blended frequencies (HF `_compute_yarn_parameters`, MaxText `YarnRotaryEmbedding`)."""
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor).astype(np.float32)


def _angles(positions: Real[Array, "*batch"], inv_freq: np.ndarray) -> Float[Array, "*batch half"]:
    return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Token embedding


class Embed(eqx.Module):
    """Token embedding table `(vocab, embed)` with `attend` for tied output logits.

    Lookup is a gather, or a one-hot matmul when `use_iota_embed` (faster on some GPUs). Out-of-range ids
    raise a ValueError when the ids are concrete; under `jit` they return NaN rows so they cannot pass silently.
    """

    embedding: Float[Array, "vocab embed"]
    num_embeddings: int = eqx.field(static=True)
    num_features: int = eqx.field(static=True)
    use_iota_embed: bool = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        num_embeddings: int,
        num_features: int,
        *,
        use_iota_embed: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        if num_embeddings <= 0 or num_features <= 0:
            raise ValueError(f"Embed needs positive sizes, got ({num_embeddings}, {num_features})")
        self.num_embeddings, self.num_features = num_embeddings, num_features
        self.use_iota_embed, self.dtype = use_iota_embed, jnp.dtype(dtype)
        # MaxText's default_embed_init: variance scaling 1.0, fan_in = embed.
        shape, std = (num_embeddings, num_features), 1.0 / math.sqrt(num_features)
        self.embedding = scaled_normal(key, shape, jnp.dtype(param_dtype), std, False)

    def __call__(self, ids: Shaped[Array, "*batch"]) -> Float[Array, "*batch embed"]:
        """Integer ids of any shape -> `[..., embed]` in `dtype`. The rows are gathered in `param_dtype` and then
        cast, so the gradient's scatter-add sums a token's occurrences in `param_dtype`: in bf16 the sum of a
        frequent token's ~1,000 contributions stalls (half its value lost)."""
        check_token_ids(ids, self.num_embeddings)
        if self.use_iota_embed:
            ids = ids.astype(jnp.int32)  # a narrow dtype (uint16 ids, vocab 65,536) would wrap the iota
            one_hot = (ids[..., None] == jnp.arange(self.num_embeddings, dtype=jnp.int32)).astype(self.dtype)
            in_range = (ids >= 0) & (ids < self.num_embeddings)
            return jnp.where(in_range[..., None], one_hot @ self.embedding.astype(self.dtype),
                             jnp.array(jnp.nan, self.dtype))
        rows = self.embedding.at[ids].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
        return rows.astype(self.dtype)

    def attend(self, x: Float[Array, "*batch embed"]) -> Float[Array, "*batch vocab"]:
        """Tied logits `x @ embedding.T` in `dtype`, returned as float32: a bf16 model's logits are rounded to bf16
        as HF's tied `lm_head` and MaxText's default give them, and the backward's two vocab-sized matmuls stay in
        bf16 (float32 logits would make them float32 matmuls)."""
        if x.shape[-1] != self.num_features:
            raise ValueError(f"Embed.attend expects last dim {self.num_features}, got shape {x.shape}")
        logits = jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))
        return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# 1-D rotary embeddings


class RotaryEmbedding(eqx.Module):
    """RoPE over the full head dim: `x[b, s, n, :]` rotated by `positions[b, s] * inv_freq`.

    `inv_freq_i = 1 / (min_timescale * (max_timescale / min_timescale) ** (2i / embedding_dims))`, divided by
    `rope_linear_scaling_factor` (HF "linear" scaling). Half-split layout by default (MaxText, HF);
    `interleaved=True` gives the pairwise layout of Modular MAX's `RotaryEmbedding`, whose `freqs_cis` table and
    `compute_scale` are provided too.
    """

    embedding_dims: int = eqx.field(static=True)
    min_timescale: float = eqx.field(static=True, converter=float, default=1.0)
    max_timescale: float = eqx.field(static=True, converter=float, default=10_000.0)
    rope_linear_scaling_factor: float = eqx.field(static=True, converter=float, default=1.0)
    interleaved: bool = eqx.field(static=True, default=False)
    max_seq_len: int = eqx.field(static=True, default=4096)

    def __check_init__(self):
        _check_even(type(self).__name__, "embedding_dims", self.embedding_dims)
        if self.rope_linear_scaling_factor <= 0 or self.min_timescale <= 0 or self.max_timescale <= 0:
            raise ValueError(f"{type(self).__name__}: timescales and scaling factor must be positive")

    @property
    def inv_freq(self) -> np.ndarray:
        """`(embedding_dims // 2,)` float32 frequencies."""
        inv_freq = default_inv_freq(self.embedding_dims, self.max_timescale, self.min_timescale)
        if self.rope_linear_scaling_factor != 1.0:
            inv_freq = (inv_freq / np.float32(self.rope_linear_scaling_factor)).astype(np.float32)
        return inv_freq

    def cos_sin(
        self, positions: Real[Array, "*batch"]
    ) -> tuple[Float[Array, "*batch dim"], Float[Array, "*batch dim"]]:
        """Float32 `cos`, `sin` of the angles, one per dim in this embedding's layout."""
        angles = _duplicate(_angles(positions, self.inv_freq), self.interleaved)
        return jnp.cos(angles), jnp.sin(angles)

    def __call__(
        self, x: Float[Array, "batch seq heads head_dim"], positions: Real[Array, "batch seq"] | None = None
    ) -> Float[Array, "batch seq heads head_dim"]:
        """Rotates `x`; `positions` default to `arange(seq)` for every row."""
        _check_rank4(type(self).__name__, x, self.embedding_dims)
        positions = _default_positions(positions, x.shape[0], x.shape[1])
        cos, sin = self.cos_sin(positions)
        return apply_rotary(x, cos[:, :, None], sin[:, :, None], interleaved=self.interleaved)

    @property
    def freqs_cis(self) -> Float[Array, "positions dim"]:
        """MAX's table: row `p` holds `(cos, sin)` pairs of position `p` interleaved, for `2 * max_seq_len` rows."""
        angles = _angles(jnp.arange(2 * self.max_seq_len), self.inv_freq)
        return jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1).reshape(2 * self.max_seq_len, -1)

    def compute_scale(self, user_scale: float | None = None) -> float:
        """The attention softmax scale: `user_scale` if given, else `1 / sqrt(embedding_dims)` (MAX)."""
        return user_scale if user_scale is not None else 1.0 / math.sqrt(self.embedding_dims)


class PartialRotaryEmbedding(eqx.Module):
    """RoPE on the first `int(head_dim * partial_rotary_factor)` dims; the rest pass through bit-identical.

    Frequencies use the rotary dim as denominator (HF Qwen3-Next, MaxText). Layout `[rotated | unrotated]`.
    """

    embedding_dims: int = eqx.field(static=True)
    partial_rotary_factor: float = eqx.field(static=True, converter=float, default=0.25)
    min_timescale: float = eqx.field(static=True, converter=float, default=1.0)
    max_timescale: float = eqx.field(static=True, converter=float, default=10_000.0)

    def __check_init__(self):
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        _check_even("PartialRotaryEmbedding", "rotary dim int(head_dim * partial_rotary_factor)", self.rotary_dim)

    @property
    def rotary_dim(self) -> int:
        return int(self.embedding_dims * self.partial_rotary_factor)

    @property
    def rotary(self) -> RotaryEmbedding:
        return RotaryEmbedding(self.rotary_dim, self.min_timescale, self.max_timescale)

    def __call__(
        self, x: Float[Array, "batch seq heads head_dim"], positions: Real[Array, "batch seq"] | None = None
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("PartialRotaryEmbedding", x, self.embedding_dims)
        rotated = self.rotary(x[..., : self.rotary_dim], positions)
        return jnp.concatenate([rotated, x[..., self.rotary_dim :]], axis=-1)


class Gemma4PartialRotaryEmbedding(eqx.Module):
    """Gemma-4 partial RoPE: half-split over the full head dim with frequencies `1/theta^(2i/head_dim)` for the
    first `rotary_dim / 2` pairs and zero (timescale +inf) for the rest, so the memory layout is
    `[rot half 1 | unrot half 1 | rot half 2 | unrot half 2]` and unrotated dims pass through unchanged.
    This is HF's "proportional" rope type. The defaults are MaxText's (theta 1e4); Gemma-4's full-attention layers
    use factor 0.25 and theta 1e6.
    """

    embedding_dims: int = eqx.field(static=True)
    partial_rotary_factor: float = eqx.field(static=True, converter=float, default=0.25)
    min_timescale: float = eqx.field(static=True, converter=float, default=1.0)
    max_timescale: float = eqx.field(static=True, converter=float, default=10_000.0)

    def __check_init__(self):
        _check_even("Gemma4PartialRotaryEmbedding", "embedding_dims", self.embedding_dims)
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        _check_even("Gemma4PartialRotaryEmbedding", "rotary dim", self.rotary_dim)

    @property
    def rotary_dim(self) -> int:
        return int(self.embedding_dims * self.partial_rotary_factor)

    @property
    def inv_freq(self) -> np.ndarray:
        rotated = default_inv_freq(self.embedding_dims, self.max_timescale, self.min_timescale)
        rotated = rotated[: self.rotary_dim // 2]
        zeros = np.zeros(self.embedding_dims // 2 - self.rotary_dim // 2, np.float32)
        return np.concatenate([rotated, zeros])

    def __call__(
        self, x: Float[Array, "batch seq heads head_dim"], positions: Real[Array, "batch seq"] | None = None
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("Gemma4PartialRotaryEmbedding", x, self.embedding_dims)
        positions = _default_positions(positions, x.shape[0], x.shape[1])
        angles = _duplicate(_angles(positions, self.inv_freq), interleaved=False)[:, :, None]
        return apply_rotary(x, jnp.cos(angles), jnp.sin(angles))


class LLaMARotaryEmbedding(eqx.Module):
    """Meta's original RoPE: interleaved pairs, with Llama-3.1 frequency scaling when `use_scale`.

    HF applies the same frequencies in the half-split layout (its checkpoints' q/k rows are permuted):
    `LLaMARotaryEmbedding(x) == half_to_interleaved(hf_rope(interleaved_to_half(x)))`; `interleaved=False`
    rotates half-split pairs as HF does (rope type `llama3` in an HF Qwen3 config).
    """

    embedding_dims: int = eqx.field(static=True)
    min_timescale: float = eqx.field(static=True, converter=float, default=1.0)
    max_timescale: float = eqx.field(static=True, converter=float, default=10_000.0)
    use_scale: bool = eqx.field(static=True, default=True)
    scale_factor: float = eqx.field(static=True, converter=float, default=8.0)
    low_freq_factor: float = eqx.field(static=True, converter=float, default=1.0)
    high_freq_factor: float = eqx.field(static=True, converter=float, default=4.0)
    old_context_len: int = eqx.field(static=True, default=8192)
    interleaved: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        _check_even("LLaMARotaryEmbedding", "embedding_dims", self.embedding_dims)
        if self.use_scale and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"LLaMARotaryEmbedding needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor}, {self.low_freq_factor}"
            )

    @property
    def inv_freq(self) -> np.ndarray:
        inv_freq = default_inv_freq(self.embedding_dims, self.max_timescale, self.min_timescale)
        if not self.use_scale:
            return inv_freq
        return llama3_inv_freq(
            inv_freq, self.scale_factor, self.low_freq_factor, self.high_freq_factor, self.old_context_len
        )

    def __call__(
        self, x: Float[Array, "batch seq heads head_dim"], positions: Real[Array, "batch seq"] | None = None
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("LLaMARotaryEmbedding", x, self.embedding_dims)
        positions = _default_positions(positions, x.shape[0], x.shape[1])
        angles = _duplicate(_angles(positions, self.inv_freq), self.interleaved)[:, :, None]
        return apply_rotary(x, jnp.cos(angles), jnp.sin(angles), interleaved=self.interleaved)


class YarnRotaryEmbedding(eqx.Module):
    """YaRN RoPE (DeepSeek-V3): frequencies blended between interpolation and extrapolation.

    `interleave=True` reads `x` as interleaved pairs and returns the half-split layout (HF
    `apply_rotary_pos_emb_interleave`; q.k is unchanged because q and k are treated alike); `pairwise=True`
    keeps the interleaved layout on output; `interleave=False` reads and writes half-split.
    cos/sin are multiplied by the attention factor: `explicit_attention_factor` when given (HF's
    `attention_factor`), else `mscale(f, mscale) / mscale(f, mscale_all_dim)` when `mscale_all_dim` is given
    (HF's DeepSeek form), `0.1 ln(f) + 1` when `attention_scaling` alone, else 1.
    """

    embedding_dims: int = eqx.field(static=True)
    max_position_embeddings: int = eqx.field(static=True, default=16384)
    original_max_position_embeddings: int = eqx.field(static=True, default=4096)
    beta_fast: float = eqx.field(static=True, converter=float, default=32.0)
    beta_slow: float = eqx.field(static=True, converter=float, default=1.0)
    rope_theta: float = eqx.field(static=True, converter=float, default=10_000.0)
    rope_factor: float = eqx.field(static=True, converter=float, default=40.0)
    interleave: bool = eqx.field(static=True, default=True)
    truncate: bool = eqx.field(static=True, default=True)
    attention_scaling: bool = eqx.field(static=True, default=False)
    pairwise: bool = eqx.field(static=True, default=False)
    mscale: float = eqx.field(static=True, converter=float, default=1.0)
    mscale_all_dim: float | None = eqx.field(static=True, default=None)
    explicit_attention_factor: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _check_even("YarnRotaryEmbedding", "embedding_dims", self.embedding_dims)
        if self.pairwise and not self.interleave:
            raise ValueError("YarnRotaryEmbedding: pairwise=True requires interleave=True")
        if self.rope_factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError("YarnRotaryEmbedding: rope_factor and original_max_position_embeddings must be > 0")

    @property
    def inv_freq(self) -> np.ndarray:
        return yarn_inv_freq(
            self.embedding_dims, self.rope_theta, self.rope_factor, self.original_max_position_embeddings,
            self.beta_fast, self.beta_slow, self.truncate,
        )

    @property
    def attention_factor(self) -> float:
        if self.explicit_attention_factor is not None:
            return float(self.explicit_attention_factor)
        if self.mscale_all_dim is not None:
            return yarn_get_mscale(self.rope_factor, self.mscale) / yarn_get_mscale(
                self.rope_factor, self.mscale_all_dim
            )
        return yarn_get_mscale(self.rope_factor) if self.attention_scaling else 1.0

    def __call__(
        self, x: Float[Array, "batch seq heads head_dim"], positions: Real[Array, "batch seq"] | None = None
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("YarnRotaryEmbedding", x, self.embedding_dims)
        positions = _default_positions(positions, x.shape[0], x.shape[1])
        angles = _duplicate(_angles(positions, self.inv_freq), interleaved=False)[:, :, None]
        factor = np.float32(self.attention_factor)
        cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
        y = apply_rotary(interleaved_to_half(x) if self.interleave else x, cos, sin)
        return half_to_interleaved(y) if self.pairwise else y


class DeepSeekV4RotaryEmbedding(eqx.Module):
    """DeepSeek-V4 partial RoPE: interleaved pairs on the trailing `int(head_dim * partial_rotary_factor)` dims
    (the leading "nope" dims pass through); `reverse=True` applies the inverse rotation (HF's `-sin` on the
    attention output). As in HF, cos/sin are rounded to `x.dtype` and the rotation is computed in float32."""

    embedding_dims: int = eqx.field(static=True)
    partial_rotary_factor: float = eqx.field(static=True, converter=float, default=64 / 512)
    rope_theta: float = eqx.field(static=True, converter=float, default=10_000.0)

    def __check_init__(self):
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        _check_even("DeepSeekV4RotaryEmbedding", "rotary dim", self.rotary_dim)

    @property
    def rotary_dim(self) -> int:
        return int(self.embedding_dims * self.partial_rotary_factor)

    def __call__(
        self,
        x: Float[Array, "batch seq heads head_dim"],
        positions: Real[Array, "batch seq"] | None = None,
        *,
        reverse: bool = False,
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("DeepSeekV4RotaryEmbedding", x, self.embedding_dims)
        positions = _default_positions(positions, x.shape[0], x.shape[1])
        inv_freq = default_inv_freq(self.rotary_dim, self.rope_theta)
        angles = _duplicate(_angles(positions, inv_freq), interleaved=True)[:, :, None]
        cos = jnp.cos(angles).astype(x.dtype).astype(jnp.float32)
        sin = jnp.sin(angles).astype(x.dtype).astype(jnp.float32)
        nope, rope = x[..., : -self.rotary_dim], x[..., -self.rotary_dim :]
        rotated = apply_rotary(rope.astype(jnp.float32), cos, -sin if reverse else sin, interleaved=True)
        return jnp.concatenate([nope, rotated.astype(x.dtype)], axis=-1)


class Qwen3OmniMoeThinkerTextRotaryEmbedding(eqx.Module):
    """Interleaved multimodal RoPE (Qwen3-VL / Qwen3-Omni thinker text model).

    `positions` are `[batch, seq, 3]` (temporal, height, width) or `[batch, seq]` (broadcast to all three:
    plain 1-D RoPE). Frequency `i` takes its angle from axis H if `i % 3 == 1 and i < 3 * mrope_section[1]`, from
    W if `i % 3 == 2 and i < 3 * mrope_section[2]`, else from T. Half-split rotation on the first `rotary_dim`
    dims (frequencies over `rotary_dim`), the rest pass through; cos/sin are scaled by `attention_scaling`.
    HF passes positions as `[3, batch, seq]`: transpose with `jnp.moveaxis(p, 0, -1)`.
    """

    embedding_dims: int = eqx.field(static=True)
    min_timescale: float = eqx.field(static=True, converter=float, default=1.0)
    max_timescale: float = eqx.field(static=True, converter=float, default=1_000_000.0)
    mrope_section: tuple[int, int, int] = eqx.field(static=True, default=(24, 20, 20), converter=tuple)
    partial_rotary_factor: float = eqx.field(static=True, converter=float, default=1.0)
    attention_scaling: float = eqx.field(static=True, converter=float, default=1.0)

    def __check_init__(self):
        name = "Qwen3OmniMoeThinkerTextRotaryEmbedding"
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        _check_even(name, "rotary dim int(head_dim * partial_rotary_factor)", self.rotary_dim)
        if len(self.mrope_section) != 3 or any(not isinstance(s, int) or s < 0 for s in self.mrope_section):
            raise ValueError(f"{name}: mrope_section must be 3 non-negative ints, got {self.mrope_section}")
        if sum(self.mrope_section) != self.rotary_dim // 2:
            raise ValueError(
                f"{name}: mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, "
                f"but must sum to rotary_dim / 2 = {self.rotary_dim // 2}"
            )

    @property
    def rotary_dim(self) -> int:
        return int(self.embedding_dims * self.partial_rotary_factor)

    @property
    def axis_of_frequency(self) -> np.ndarray:
        """`(rotary_dim // 2,)` ints in {0: T, 1: H, 2: W}."""
        axis = np.zeros(self.rotary_dim // 2, np.int32)
        axis[1 : 3 * self.mrope_section[1] : 3] = 1
        axis[2 : 3 * self.mrope_section[2] : 3] = 2
        return axis

    def cos_sin(
        self, positions: Real[Array, "batch seq 3"]
    ) -> tuple[Float[Array, "batch seq dim"], Float[Array, "batch seq dim"]]:
        inv_freq = default_inv_freq(self.rotary_dim, self.max_timescale, self.min_timescale)
        per_axis = _angles(positions, inv_freq)  # [batch, seq, 3, rotary_dim // 2]
        axis = jnp.asarray(self.axis_of_frequency)[None, None, None, :]
        angles = jnp.take_along_axis(per_axis, jnp.broadcast_to(axis, per_axis.shape[:2] + (1,) + axis.shape[3:]),
                                     axis=2)[:, :, 0]
        angles = _duplicate(angles, interleaved=False)
        scale = np.float32(self.attention_scaling)
        return jnp.cos(angles) * scale, jnp.sin(angles) * scale

    def __call__(
        self,
        x: Float[Array, "batch seq heads head_dim"],
        positions: Real[Array, "batch seq 3"] | Real[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("Qwen3OmniMoeThinkerTextRotaryEmbedding", x, self.embedding_dims)
        if positions is None or positions.ndim == 2:
            positions = jnp.repeat(_default_positions(positions, x.shape[0], x.shape[1])[..., None], 3, axis=-1)
        elif positions.shape != (x.shape[0], x.shape[1], 3):
            raise ValueError(f"MRoPE positions must be [batch, seq] or [batch, seq, 3] for input {x.shape[:2]}, "
                             f"got {positions.shape}")
        cos, sin = self.cos_sin(positions)
        rotated = apply_rotary(x[..., : self.rotary_dim], cos[:, :, None], sin[:, :, None])
        return jnp.concatenate([rotated, x[..., self.rotary_dim :]], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Absolute and vision positional embeddings


class PositionalEmbedding(eqx.Module):
    """Sinusoidal positions (Whisper / Qwen3-Omni audio): `[sin(p * inv) | cos(p * inv)]`, float32,
    `inv_k = exp(-k * ln(max_wavelength) / (d/2 - 1))`.
    """

    embedding_dims: int = eqx.field(static=True)
    max_wavelength: float = eqx.field(static=True, converter=float, default=10_000.0)

    def __check_init__(self):
        _check_even("PositionalEmbedding", "embedding_dims", self.embedding_dims)

    @property
    def inv_timescales(self) -> np.ndarray:
        half = self.embedding_dims // 2
        increment = math.log(self.max_wavelength) / max(half - 1, 1)
        exponent = np.float32(-increment) * np.arange(half, dtype=np.float32)
        return np.exp(exponent.astype(np.float64)).astype(np.float32)

    def __call__(
        self, seq_len: int, position: Real[Array, " seq"] | Real[Array, "batch seq"] | None = None
    ) -> Float[Array, "seq embed"] | Float[Array, "batch seq embed"]:
        """`position` `(seq,)` -> `(seq, embed)`; `(batch, seq)` -> `(batch, seq, embed)`; None: `arange(seq_len)`."""
        if position is None:
            position = jnp.arange(seq_len)
        if position.ndim not in (1, 2):
            raise ValueError(f"PositionalEmbedding positions must be (seq,) or (batch, seq), got {position.shape}")
        scaled = _angles(position, self.inv_timescales)
        return jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=-1)


class LlamaVisionRotaryEmbedding(eqx.Module):
    """Llama-4 vision 2-D RoPE over `(image_size // patch_size)^2` patches plus a trailing CLS token.

    Pair `j < head_dim / 4` rotates by `(col + 1) * f_j`, pair `j >= head_dim / 4` by `(row + 1) * f_(j - head_dim/4)`
    with `f_k = 1 / theta^(2k / (head_dim / 2))`; the CLS token is not rotated. Interleaved layout.
    """

    image_size: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    num_attention_heads: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True, converter=float, default=10_000.0)

    def __check_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaVisionRotaryEmbedding: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"LlamaVisionRotaryEmbedding: head_dim {self.head_dim} must be a multiple of 4")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def angles(self) -> np.ndarray:
        """`(num_patches, head_dim // 2)` float32 angle per interleaved pair (CLS row last, all zeros)."""
        side = self.image_size // self.patch_size
        ids = np.arange(side * side)
        freq_dim = self.head_dim // 2
        rope_freq = default_inv_freq(freq_dim, self.rope_theta)[: freq_dim // 2]
        col = ((ids % side + 1).astype(np.float32)[:, None] * rope_freq).astype(np.float32)
        row = ((ids // side + 1).astype(np.float32)[:, None] * rope_freq).astype(np.float32)
        patches = np.concatenate([col, row], axis=-1)
        return np.concatenate([patches, np.zeros((1, self.head_dim // 2), np.float32)])

    def __call__(self, x: Float[Array, "batch seq heads head_dim"]) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("LlamaVisionRotaryEmbedding", x, self.head_dim)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"expected {self.num_patches} tokens (patches + CLS), got {x.shape[1]}")
        angles = _duplicate(jnp.asarray(self.angles()), interleaved=True)[None, :, None]
        return apply_rotary(x.astype(jnp.float32), jnp.cos(angles), jnp.sin(angles), interleaved=True).astype(x.dtype)


def generate_block_coords(
    grid_thw: Int[Array, "batch 3"], max_patches: int, merge_size: int
) -> tuple[Int[Array, "batch patches"], Int[Array, "batch patches"], Shaped[Array, "batch patches"]]:
    """Row and column (in patches) of every token of each example's `(t, h, w)` grid in spatial-merge-block
    order `(t, h/m, w/m, m, m)`, padded to `max_patches`; returns `(row, col, valid)` with 0 at padding."""
    index = jnp.arange(max_patches)[None, :]
    t, h, w = (grid_thw[:, i : i + 1] for i in range(3))
    s = index % jnp.maximum(h * w, 1)
    m = merge_size
    intra_col = s % m
    intra_row = (s // m) % m
    blocks_per_row = jnp.maximum(w // m, 1)
    block_col = (s // (m * m)) % blocks_per_row
    block_row = s // (blocks_per_row * m * m)
    valid = index < t * h * w
    row = jnp.where(valid, block_row * m + intra_row, 0)
    col = jnp.where(valid, block_col * m + intra_col, 0)
    return row, col, valid


def _check_grid(grid_thw: Array | np.ndarray, max_patches: int, merge_size: int) -> None:
    """Per-example grids, when concrete: positive, h and w multiples of the merge size, inside `max_patches`."""
    if isinstance(grid_thw, jax.core.Tracer):
        return
    for t, h, w in np.asarray(grid_thw).tolist():
        if min(t, h, w) <= 0 or h % merge_size or w % merge_size or t * h * w > max_patches:
            raise ValueError(
                f"grid (t={t}, h={h}, w={w}) must be positive with h and w multiples of the spatial merge size "
                f"{merge_size}, within the static {max_patches} patches"
            )


def _static_grid(num_frames: int, height: int, width: int, merge_size: int) -> Int[Array, "1 3"]:
    grid = np.array([[num_frames, height, width]], np.int32)
    _check_grid(grid, num_frames * height * width, merge_size)
    return jnp.asarray(grid)


class Qwen3OmniMoeVisionRotaryEmbedding(eqx.Module):
    """2-D RoPE of the Qwen3-Omni vision encoder, half-split over the full head dim, applied in float32.

    Each patch at (row, col) gets angles `[row * f | col * f]` duplicated, `f_k = 1 / theta^(2k / (head_dim/2))`
    (`head_dim / 4` frequencies); tokens are in 2x2 spatial-merge-block order. With `grid_thw` (`[batch, 3]`,
    per-example grids inside the static padded length `num_frames * height * width`), padded tokens are left
    untouched (cos 1, sin 0).
    """

    hidden_size: int = eqx.field(static=True)
    num_attention_heads: int = eqx.field(static=True)
    spatial_merge_size: int = eqx.field(static=True, default=2)
    rope_theta: float = eqx.field(static=True, converter=float, default=10_000.0)

    def __check_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Qwen3OmniMoeVisionRotaryEmbedding: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(f"Qwen3OmniMoeVisionRotaryEmbedding: head_dim {self.head_dim} must be a multiple of 4")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def inv_freq(self) -> np.ndarray:
        return default_inv_freq(self.head_dim // 2, self.rope_theta)

    def _cos_sin(self, row: Array, col: Array, valid: Array) -> tuple[Array, Array]:
        angles = jnp.concatenate([_angles(row, self.inv_freq), _angles(col, self.inv_freq)], axis=-1)
        angles = _duplicate(angles, interleaved=False)
        cos = jnp.where(valid[..., None], jnp.cos(angles), 1.0)
        sin = jnp.where(valid[..., None], jnp.sin(angles), 0.0)
        return cos, sin

    def compute_cos_sin(
        self, num_frames: int, height: int, width: int
    ) -> tuple[Float[Array, "patches head_dim"], Float[Array, "patches head_dim"]]:
        """Float32 cos/sin `(num_frames * height * width, head_dim)` for one static grid (in patches)."""
        grid = _static_grid(num_frames, height, width, self.spatial_merge_size)
        row, col, valid = generate_block_coords(grid, num_frames * height * width, self.spatial_merge_size)
        cos, sin = self._cos_sin(row, col, valid)
        return cos[0], sin[0]

    def __call__(
        self,
        x: Float[Array, "batch seq heads head_dim"],
        num_frames: int,
        height: int,
        width: int,
        grid_thw: Int[Array, "batch 3"] | None = None,
    ) -> Float[Array, "batch seq heads head_dim"]:
        _check_rank4("Qwen3OmniMoeVisionRotaryEmbedding", x, self.head_dim)
        if x.shape[1] != num_frames * height * width:
            raise ValueError(
                f"sequence length {x.shape[1]} != num_frames * height * width = {num_frames * height * width}"
            )
        if grid_thw is None:
            cos, sin = self.compute_cos_sin(num_frames, height, width)
            cos, sin = cos[None, :, None], sin[None, :, None]
        else:
            if grid_thw.shape != (x.shape[0], 3):
                raise ValueError(f"grid_thw must be [batch, 3] = {(x.shape[0], 3)}, got {grid_thw.shape}")
            _check_grid(grid_thw, x.shape[1], self.spatial_merge_size)
            row, col, valid = generate_block_coords(grid_thw, x.shape[1], self.spatial_merge_size)
            cos, sin = self._cos_sin(row, col, valid)
            cos, sin = cos[:, :, None], sin[:, :, None]
        x32 = x.astype(jnp.float32)
        return apply_rotary(x32, cos, sin).astype(x.dtype)


def _divisor(size: Array, shape: tuple[int, ...]) -> Array:
    """`max(size - 1, 1)` broadcast to `shape`, behind a barrier: XLA would otherwise turn the division into a
    multiply by the reciprocal, one ulp away from HF's `index * (side - 1) / (size - 1)`."""
    return jax.lax.optimization_barrier(jnp.broadcast_to(jnp.maximum(size - 1, 1).astype(jnp.float32), shape))


class Qwen3OmniMoeVisionPosEmbedInterpolate(eqx.Module):
    """Learned `side x side` position table, bilinearly resampled (align_corners) to each image's grid.

    Output rows are in spatial-merge-block order and repeated for every frame. With `grid_thw` (`[batch, 3]`
    per-example grids inside the static padded length), padded rows are zero.
    """

    pos_embed: Float[Array, "num_positions hidden"]
    num_position_embeddings: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    spatial_merge_size: int = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        num_position_embeddings: int,
        hidden_size: int,
        spatial_merge_size: int = 2,
        *,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        side = math.isqrt(num_position_embeddings)
        if side * side != num_position_embeddings or side < 1:
            raise ValueError(f"num_position_embeddings must be a perfect square, got {num_position_embeddings}")
        self.num_position_embeddings, self.hidden_size = num_position_embeddings, hidden_size
        self.spatial_merge_size, self.dtype = spatial_merge_size, jnp.dtype(dtype)
        self.pos_embed = scaled_normal(key, (num_position_embeddings, hidden_size), jnp.dtype(param_dtype), 1.0, False)

    @property
    def side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    def __call__(
        self, num_frames: int, height: int, width: int, grid_thw: Int[Array, "batch 3"] | None = None
    ) -> Float[Array, "patches hidden"] | Float[Array, "batch patches hidden"]:
        """`(T*H*W, hidden)` for a static grid, or `(batch, T*H*W, hidden)` for per-example `grid_thw`."""
        static = grid_thw is None
        if static:
            grid_thw = _static_grid(num_frames, height, width, self.spatial_merge_size)
        elif grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be [batch, 3], got {grid_thw.shape}")
        else:
            _check_grid(grid_thw, num_frames * height * width, self.spatial_merge_size)
        row, col, valid = generate_block_coords(grid_thw, num_frames * height * width, self.spatial_merge_size)
        side = self.side
        h, w = grid_thw[:, 1:2], grid_thw[:, 2:3]
        y = (row * (side - 1)).astype(jnp.float32) / _divisor(h, row.shape)
        x = (col * (side - 1)).astype(jnp.float32) / _divisor(w, col.shape)
        y_floor, x_floor = jnp.floor(y), jnp.floor(x)
        dy, dx = (y - y_floor)[..., None], (x - x_floor)[..., None]
        y0, x0 = y_floor.astype(jnp.int32), x_floor.astype(jnp.int32)
        y1, x1 = jnp.minimum(y0 + 1, side - 1), jnp.minimum(x0 + 1, side - 1)
        table = self.pos_embed.astype(jnp.float32)

        def tap(r: Array, c: Array) -> Array:
            return table[r * side + c]

        out = (tap(y0, x0) * ((1 - dy) * (1 - dx)) + tap(y0, x1) * ((1 - dy) * dx)
               + tap(y1, x0) * (dy * (1 - dx)) + tap(y1, x1) * (dy * dx))
        out = jnp.where(valid[..., None], out, 0.0).astype(self.dtype)
        return out[0] if static else out
