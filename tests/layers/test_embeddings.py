"""`eqx_models.layers.embeddings`: float64 NumPy references written from the math, HF's Llama-4 vision RoPE,
MaxText's published snapshot values, hypothesis properties of every rotary variant, and bad-input errors."""

import inspect
from typing import Callable, NamedTuple

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from hypothesis import Phase, given, settings

from eqx_models.layers.embeddings import (
    DeepSeekV4RotaryEmbedding,
    Embed,
    Gemma4PartialRotaryEmbedding,
    LLaMARotaryEmbedding,
    LlamaVisionRotaryEmbedding,
    PartialRotaryEmbedding,
    PositionalEmbedding,
    Qwen3OmniMoeThinkerTextRotaryEmbedding,
    Qwen3OmniMoeVisionPosEmbedInterpolate,
    Qwen3OmniMoeVisionRotaryEmbedding,
    RotaryEmbedding,
    YarnRotaryEmbedding,
    half_to_interleaved,
    interleaved_to_half,
)
from tests.reference import assert_close

PROPERTY = settings(
    max_examples=25, deadline=None, phases=[phase for phase in Phase if phase is not Phase.explain]
)


@eqx.filter_jit
def run(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` under jit: one compilation per module and shape instead of one per eager op."""
    return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Float64 NumPy references


def np_inv_freq(dim: int, max_timescale: float, min_timescale: float = 1.0) -> np.ndarray:
    """`1 / (min * (max / min) ** (2i / dim))`, i < dim / 2, float64."""
    fraction = 2.0 * np.arange(dim // 2) / dim
    return 1.0 / (min_timescale * (max_timescale / min_timescale) ** fraction)


def np_rotate_half_split(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Pairs `(x[i], x[i + d/2])` rotated by `angles[..., i]`."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def np_rotate_interleaved(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Pairs `(x[2i], x[2i + 1])` rotated by `angles[..., i]`."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = np.cos(angles), np.sin(angles)
    out = np.empty(np.broadcast_shapes(x.shape, angles.shape[:-1] + (x.shape[-1],)))
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def np_angles(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """`positions[b, s] * inv_freq`, shaped `[b, s, 1, half]` to broadcast over heads."""
    return np.asarray(positions, np.float64)[..., None, None] * inv_freq


def np_block_coords(t: int, h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each token in `(t, h/m, w/m, m, m)` spatial-merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")

    def order(a):
        return np.tile(a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1), t)

    return order(rows), order(cols)


def np_llama_vision_angles(image_size: int, patch_size: int, head_dim: int, theta: float) -> np.ndarray:
    """`(patches + 1, head_dim / 2)`: pair j < hd/4 at `(col + 1) f_j`, else `(row + 1) f_(j - hd/4)`;
    the CLS row (last) is 0."""
    side = image_size // patch_size
    token = np.arange(side * side)
    col, row = token % side, token // side
    f = theta ** (-2.0 * np.arange(head_dim // 4) / (head_dim // 2))
    patches = np.concatenate([(col[:, None] + 1.0) * f, (row[:, None] + 1.0) * f], axis=-1)
    return np.concatenate([patches, np.zeros((1, head_dim // 2))])


def _positions(rng: np.random.Generator, shape: tuple[int, ...], inv_freq: np.ndarray) -> np.ndarray:
    """Integer positions keeping every angle <= 8 rad: float32 rounds `f` and `p * f` each by <= 2^-24
    relative, so the angle error stays <= 8 * 2^-23 ~ 1e-6 rad, within the 1e-6 tolerance."""
    return rng.integers(0, int(8 / np.max(inv_freq)) + 1, shape)


def _mrope(dims: int, section: tuple[int, int, int], factor: float = 1.0):
    return Qwen3OmniMoeThinkerTextRotaryEmbedding(dims, mrope_section=section, partial_rotary_factor=factor)


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------------------------------------
# A. References: 1-D rotary embeddings


def test_rotary_half_split_matches_numpy(rng):
    """Half-split RoPE, min_timescale 2, linear scaling 4, vs float64 math; tol 1e-6."""
    rope = RotaryEmbedding(32, min_timescale=2.0, max_timescale=500_000.0, rope_linear_scaling_factor=4.0)
    inv_freq = np_inv_freq(32, 500_000.0, 2.0) / 4.0
    x, pos = _f32(rng, 2, 6, 3, 32), _positions(rng, (2, 6), inv_freq)
    ours = run(rope, jnp.asarray(x), jnp.asarray(pos, jnp.int32))
    ref = np_rotate_half_split(_f64(x), np_angles(pos, inv_freq))
    assert ours.dtype == jnp.float32
    assert_close(ours, ref, 1e-6, "RotaryEmbedding half-split")


def test_rotary_default_positions_are_arange(rng):
    """`positions=None` is `arange(seq)` for every row; float64 math, tol 1e-6."""
    rope = RotaryEmbedding(16)
    x = _f32(rng, 2, 9, 2, 16)
    angles = np_angles(np.broadcast_to(np.arange(9), (2, 9)), np_inv_freq(16, 1e4))
    ref = np_rotate_half_split(_f64(x), angles)
    assert_close(run(rope, jnp.asarray(x)), ref, 1e-6, "RotaryEmbedding default positions")


def test_rotary_interleaved_matches_numpy(rng):
    """MAX's pairwise layout `(x[2i], x[2i+1])`, min_timescale 1.5, linear scaling 2, vs float64 math;
    tol 1e-6."""
    rope = RotaryEmbedding(
        16, min_timescale=1.5, max_timescale=1e4, rope_linear_scaling_factor=2.0, interleaved=True
    )
    inv_freq = np_inv_freq(16, 1e4, 1.5) / 2.0
    x, pos = _f32(rng, 2, 5, 2, 16), _positions(rng, (2, 5), inv_freq)
    ours = run(rope, jnp.asarray(x), jnp.asarray(pos, jnp.int32))
    ref = np_rotate_interleaved(_f64(x), np_angles(pos, inv_freq))
    assert_close(ours, ref, 1e-6, "RotaryEmbedding interleaved")


def test_rotary_freqs_cis_and_compute_scale():
    """`freqs_cis` row p = interleaved (cos, sin) of p * inv_freq for 2 * max_seq_len rows (tol 1e-6);
    `compute_scale` = 1/sqrt(dim) or the user's scale."""
    rope = RotaryEmbedding(8, interleaved=True, max_seq_len=16)
    table = rope.freqs_cis
    assert table.shape == (32, 8) and table.dtype == jnp.float32
    angles = np.arange(32)[:, None] * np_inv_freq(8, 1e4)
    ref = np.stack([np.cos(angles), np.sin(angles)], axis=-1).reshape(32, 8)
    assert_close(table, ref, 1e-6, "RotaryEmbedding.freqs_cis")
    assert rope.compute_scale() == pytest.approx(1 / np.sqrt(8), rel=1e-15)
    assert rope.compute_scale(None) == pytest.approx(1 / np.sqrt(8), rel=1e-15)
    assert rope.compute_scale(0.3) == 0.3
    assert RotaryEmbedding(128).compute_scale() == pytest.approx(1 / np.sqrt(128), rel=1e-15)


@pytest.mark.parametrize("min_timescale", [1.0, 3.0])
def test_gemma4_partial_rotary_matches_numpy(rng, min_timescale):
    """Gemma-4: first rotary_dim/2 pairs with full-head_dim timescales, +inf beyond, half-split over the full
    head dim, vs float64 math; tol 1e-6."""
    rope = Gemma4PartialRotaryEmbedding(32, 0.25, min_timescale=min_timescale, max_timescale=1e4)
    timescale = np.full(16, np.inf)
    timescale[:4] = min_timescale * (1e4 / min_timescale) ** (2.0 * np.arange(4) / 32)
    x, pos = _f32(rng, 2, 5, 2, 32), _positions(rng, (2, 5), 1.0 / timescale)
    ref = np_rotate_half_split(_f64(x), np_angles(pos, 1.0 / timescale))
    ours = run(rope, jnp.asarray(x), jnp.asarray(pos, jnp.int32))
    assert_close(ours, ref, 1e-6, "Gemma4PartialRotaryEmbedding")


def test_partial_rotary_matches_numpy(rng):
    """Partial RoPE: half-split on the first int(hd * f) dims with frequencies over rotary_dim; tol 1e-6."""
    rope = PartialRotaryEmbedding(32, 0.25, max_timescale=1e4)
    x, pos = _f32(rng, 2, 5, 2, 32), _positions(rng, (2, 5), np_inv_freq(8, 1e4))
    ref = _f64(x).copy()
    ref[..., :8] = np_rotate_half_split(ref[..., :8], np_angles(pos, np_inv_freq(8, 1e4)))
    assert_close(run(rope, jnp.asarray(x), jnp.asarray(pos, jnp.int32)), ref, 1e-6, "PartialRotaryEmbedding")


def test_deepseek_v4_rotary_matches_numpy_and_reverse_inverts(rng):
    """DeepSeek-V4: nope dims first, interleaved RoPE on the trailing rotary dims; reverse is the inverse
    angle; forward then reverse returns the input. All vs float64, tol 1e-6."""
    rope = DeepSeekV4RotaryEmbedding(32, 0.25, rope_theta=1e4)
    x, pos = _f32(rng, 2, 5, 2, 32), _positions(rng, (2, 5), np_inv_freq(8, 1e4))
    xj, pj = jnp.asarray(x), jnp.asarray(pos, jnp.int32)
    angles = np_angles(pos, np_inv_freq(8, 1e4))
    fwd, rev = _f64(x).copy(), _f64(x).copy()
    fwd[..., 24:] = np_rotate_interleaved(fwd[..., 24:], angles)
    rev[..., 24:] = np_rotate_interleaved(rev[..., 24:], -angles)
    assert_close(run(rope, xj, pj), fwd, 1e-6, "DeepSeekV4RotaryEmbedding forward")
    assert_close(run(rope, xj, pj, reverse=True), rev, 1e-6, "DeepSeekV4RotaryEmbedding reverse")
    round_trip = run(rope, run(rope, xj, pj), pj, reverse=True)
    assert_close(round_trip, x, 1e-6, "DeepSeekV4RotaryEmbedding reverse(forward)")


def test_mrope_matches_numpy(rng):
    """Interleaved MRoPE: frequency i takes axis H if i%3==1 and i<3*sec_H, W if i%3==2 and i<3*sec_W, else T;
    half-split on the first rotary_dim dims, cos/sin scaled by attention_scaling; float64 math, tol 1e-6."""
    rope = Qwen3OmniMoeThinkerTextRotaryEmbedding(
        32, max_timescale=1e6, mrope_section=(3, 3, 2), partial_rotary_factor=0.5, attention_scaling=0.75
    )
    x, pos = _f32(rng, 2, 5, 2, 32), _positions(rng, (2, 5, 3), np_inv_freq(16, 1e6))
    i = np.arange(8)
    axis = np.where((i % 3 == 1) & (i < 9), 1, np.where((i % 3 == 2) & (i < 6), 2, 0))
    angles = np.take_along_axis(pos.astype(np.float64), np.broadcast_to(axis, (2, 5, 8)), axis=-1)
    angles = (angles * np_inv_freq(16, 1e6))[:, :, None]
    ref = _f64(x).copy()
    h = ref[..., :16]
    a, b = h[..., :8], h[..., 8:]
    c, s = 0.75 * np.cos(angles), 0.75 * np.sin(angles)
    ref[..., :16] = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    ours = run(rope, jnp.asarray(x), jnp.asarray(pos, jnp.int32))
    assert_close(ours, ref, 1e-6, "Qwen3OmniMoeThinkerTextRotaryEmbedding")


# ----------------------------------------------------------------------------------------------------------
# A. References: vision rotary embeddings


def test_llama_vision_rotary_matches_numpy(rng):
    """Llama-4 vision 2-D RoPE (col pairs then row pairs, positions + 1, CLS unrotated, interleaved) vs
    float64 math; tol 1e-6."""
    rope = LlamaVisionRotaryEmbedding(56, 14, 64, 4, rope_theta=500.0)
    x = _f32(rng, 2, 17, 4, 16)
    ref = np_rotate_interleaved(_f64(x), np_llama_vision_angles(56, 14, 16, 500.0)[None, :, None])
    ours = run(rope, jnp.asarray(x))
    assert_close(ours, ref, 1e-6, "LlamaVisionRotaryEmbedding vs numpy")
    np.testing.assert_array_equal(np.asarray(ours)[:, -1], x[:, -1])


def test_llama_vision_rotary_matches_hf(rng):
    """vs HF `Llama4VisionRotaryEmbedding` + `vision_apply_rotary_emb` (float32 torch); tol 1e-6."""
    torch = pytest.importorskip("torch")
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    config_mod = pytest.importorskip("transformers.models.llama4.configuration_llama4")
    config = config_mod.Llama4VisionConfig(
        image_size=56, patch_size=14, hidden_size=64, num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    x = _f32(rng, 2, 17, 4, 16)
    xt = torch.from_numpy(x)
    freqs_ci = llama4.Llama4VisionRotaryEmbedding(config)(xt)
    ref_q, _ = llama4.vision_apply_rotary_emb(xt, xt.clone(), freqs_ci)
    rope = LlamaVisionRotaryEmbedding(56, 14, 64, 4, rope_theta=500.0)
    assert_close(run(rope, jnp.asarray(x)), ref_q.numpy(), 1e-6, "LlamaVisionRotaryEmbedding vs HF")
    xb = xt.to(torch.bfloat16)  # HF rotates in float32 and rounds once
    ref_b, _ = llama4.vision_apply_rotary_emb(xb, xb.clone(), freqs_ci)
    ours_b = run(rope, jnp.asarray(xb.float().numpy(), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(ours_b.astype(jnp.float32)), ref_b.float().numpy())


def test_qwen_vision_rotary_matches_numpy(rng):
    """Qwen3-Omni vision 2-D RoPE: angles `[row f | col f]` duplicated, half-split, block order; float64 math,
    tol 1e-6."""
    rope = Qwen3OmniMoeVisionRotaryEmbedding(64, 4, spatial_merge_size=2, rope_theta=1e4)
    x = _f32(rng, 1, 2 * 4 * 6, 4, 16)
    row, col = np_block_coords(2, 4, 6, 2)
    f = np_inv_freq(8, 1e4)
    angles = np.concatenate([row[:, None] * f, col[:, None] * f], axis=-1)[None, :, None]
    ref = np_rotate_half_split(_f64(x), angles)
    assert_close(run(rope, jnp.asarray(x), 2, 4, 6), ref, 1e-6, "Qwen3OmniMoeVisionRotaryEmbedding")


def test_qwen_vision_pos_embed_matches_numpy(getkey):
    """Bilinear align-corners resampling of the side x side table in block order, repeated per frame; float64
    math, tol 1e-6."""
    interp = Qwen3OmniMoeVisionPosEmbedInterpolate(16, 8, 2, key=getkey())
    table = _f64(interp.pos_embed).reshape(4, 4, 8)
    row, col = np_block_coords(2, 4, 6, 2)
    y, x = row * 3 / 3, col * 3 / 5
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, 3), np.minimum(x0 + 1, 3)
    dy, dx = (y - y0)[:, None], (x - x0)[:, None]
    ref = (table[y0, x0] * (1 - dy) * (1 - dx) + table[y0, x1] * (1 - dy) * dx
           + table[y1, x0] * dy * (1 - dx) + table[y1, x1] * dy * dx)
    assert_close(run(interp, 2, 4, 6), ref, 1e-6, "Qwen3OmniMoeVisionPosEmbedInterpolate")


# ----------------------------------------------------------------------------------------------------------
# A. References: sinusoidal positions and token embedding


def test_positional_embedding_matches_numpy(rng):
    """`[sin(p inv) | cos(p inv)]`, `inv_k = exp(-k ln(max_wavelength) / (d/2 - 1))`, for (seq,), (batch, seq)
    and None positions; float64 math, tol 1e-6."""
    pe = PositionalEmbedding(16, max_wavelength=10_000.0)
    inv = np.exp(-np.arange(8) * np.log(10_000.0) / 7)

    def ref(p):
        scaled = np.asarray(p, np.float64)[..., None] * inv
        return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=-1)

    pos1, pos2 = _positions(rng, (7,), inv), _positions(rng, (3, 7), inv)
    out1, out2 = run(pe, 7, jnp.asarray(pos1, jnp.int32)), run(pe, 7, jnp.asarray(pos2, jnp.int32))
    out0 = run(pe, 7)
    assert out1.shape == (7, 16) and out2.shape == (3, 7, 16) and out1.dtype == jnp.float32
    assert_close(out1, ref(pos1), 1e-6, "PositionalEmbedding 1-D")
    assert_close(out2, ref(pos2), 1e-6, "PositionalEmbedding 2-D")
    assert_close(out0, ref(np.arange(7)), 1e-6, "PositionalEmbedding default")


@pytest.mark.parametrize("use_iota_embed", [False, True])
def test_embed_lookup_equals_table_rows(getkey, rng, use_iota_embed):
    """Gather and one-hot lookup both return the table rows bit for bit."""
    embed = Embed(11, 8, use_iota_embed=use_iota_embed, key=getkey())
    ids = rng.integers(0, 11, (3, 5))
    rows = np.asarray(embed.embedding)[ids]
    for out in (embed(jnp.asarray(ids, jnp.int32)), run(embed, jnp.asarray(ids, jnp.int32))):
        assert out.shape == (3, 5, 8) and out.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out), rows)


def test_embed_attend_matches_numpy(getkey, rng):
    """`attend(x) = x @ table.T` vs float64 NumPy; tol 1e-6."""
    embed = Embed(11, 32, key=getkey())
    x = _f32(rng, 2, 3, 32)
    out = run(embed.attend, jnp.asarray(x))
    assert out.shape == (2, 3, 11) and out.dtype == jnp.float32
    assert_close(out, _f64(x) @ _f64(embed.embedding).T, 1e-6, "Embed.attend")


@pytest.mark.parametrize("use_iota_embed", [False, True])
def test_embed_bfloat16_path(getkey, rng, use_iota_embed):
    """dtype bf16: lookup returns the bf16-cast rows exactly; attend returns float32 logits rounded to bf16 (as
    HF's tied bf16 `lm_head`), within bf16 rounding (2^-8) of the float64 product of the bf16-cast operands."""
    embed = Embed(11, 32, use_iota_embed=use_iota_embed, dtype=jnp.bfloat16, key=getkey())
    ids = rng.integers(0, 11, (2, 4))
    out = run(embed, jnp.asarray(ids, jnp.int32))
    assert out.dtype == jnp.bfloat16
    table16 = np.asarray(embed.embedding.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out), table16[ids])
    x = _f32(rng, 2, 4, 32)
    logits = run(embed.attend, jnp.asarray(x))
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32)))
    x16 = _f64(jnp.asarray(x).astype(jnp.bfloat16))
    assert_close(logits, x16 @ _f64(table16).T, 2**-8, "Embed.attend bf16")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_gradient_sums_a_frequent_token_in_param_dtype(getkey, rng, dtype):
    """The lookup's gradient adds up every occurrence of a token in the float32 parameters, whatever the compute
    dtype: 4,096 lookups of 4 tokens vs float64 NumPy, tol 1e-5 (~1,000 float32 additions per row measure
    1.3e-6). Summed in bf16, about half of each row was lost (the running sum stops growing once its ulp
    exceeds twice the terms)."""
    embed = Embed(16, 8, dtype=dtype, key=getkey())
    ids = rng.integers(0, 4, (4, 1024))
    cotangent = jnp.asarray(rng.uniform(0.5, 1.5, (4, 1024, 8)), dtype).astype(jnp.float32)
    grad = jax.grad(lambda e: jnp.sum(e(jnp.asarray(ids, jnp.int32)).astype(jnp.float32) * cotangent))(embed)
    ref = np.zeros((16, 8))
    np.add.at(ref, ids, _f64(cotangent))
    assert grad.embedding.dtype == jnp.float32
    assert_close(grad.embedding, ref, 1e-5, f"Embed gradient ({jnp.dtype(dtype).name} compute)")


# ----------------------------------------------------------------------------------------------------------
# A. MaxText's published snapshot (tests/unit/embeddings_test.py, partial_rotary_embedding_test.py)

GOLDEN_POS1 = {
    "RotaryEmbedding": (lambda: RotaryEmbedding(4), [-0.300781, 0.988281, 1.38281, 1.00781]),
    "LLaMARotaryEmbedding": (
        lambda: LLaMARotaryEmbedding(4, use_scale=True), [-0.300781, 1.38281, 0.988281, 1.00781]
    ),
    "YarnRotaryEmbedding": (
        lambda: YarnRotaryEmbedding(4, max_position_embeddings=16384, original_max_position_embeddings=4096),
        [-0.300781, 0.996094, 1.38281, 1.00781],
    ),
    "PartialRotaryEmbedding": (lambda: PartialRotaryEmbedding(4, 0.5), [-0.30078125, 1.3828125, 1.0, 1.0]),
    "Gemma4PartialRotaryEmbedding": (
        lambda: Gemma4PartialRotaryEmbedding(4, 0.5), [-0.300781, 1.0, 1.38281, 1.0]
    ),
}


@pytest.mark.parametrize("name", GOLDEN_POS1)
def test_maxtext_golden_snapshot(name):
    """All-ones [1,2,1,4], positions [[0,1]], min 1, max 1e4 vs MaxText's bf16 outputs; atol 1e-2 (bf16
    spacing is 2^-7 in [1, 2), so MaxText's bf16 rounding alone accounts for up to 3.9e-3)."""
    make, pos1 = GOLDEN_POS1[name]
    out = np.asarray(run(make(), jnp.ones((1, 2, 1, 4)), jnp.array([[0, 1]], jnp.int32)))
    golden = np.array([[[[1.0, 1.0, 1.0, 1.0]], [pos1]]])
    print(f"{name} golden: max abs err {np.max(np.abs(out - golden)):.3e} (atol 1e-02)")
    np.testing.assert_allclose(out, golden, rtol=0, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# B. Hypothesis properties of every rotary variant


class Case(NamedTuple):
    make: Callable[[], eqx.Module]
    head_dim: int
    kind: str  # "1d": positions [b, s]; "mrope": [b, s, 3]; "qwen_vision" / "llama_vision": grid-fixed


HEADS = 2
QWEN_VISION_GRID = (1, 4, 4)

CASES = {
    "rope_half": Case(lambda: RotaryEmbedding(32, max_timescale=1e4), 32, "1d"),
    "rope_half_scaled": Case(
        lambda: RotaryEmbedding(32, min_timescale=2.0, max_timescale=5e5, rope_linear_scaling_factor=4.0),
        32,
        "1d",
    ),
    "rope_interleaved": Case(lambda: RotaryEmbedding(32, interleaved=True), 32, "1d"),
    "partial": Case(lambda: PartialRotaryEmbedding(32, 0.5), 32, "1d"),
    "gemma4": Case(lambda: Gemma4PartialRotaryEmbedding(32, 0.25), 32, "1d"),
    "llama": Case(lambda: LLaMARotaryEmbedding(32, max_timescale=5e5), 32, "1d"),
    "yarn_pairwise": Case(lambda: YarnRotaryEmbedding(32, pairwise=True, attention_scaling=False), 32, "1d"),
    "yarn_interleave": Case(lambda: YarnRotaryEmbedding(32, interleave=True), 32, "1d"),
    "yarn_half": Case(lambda: YarnRotaryEmbedding(32, interleave=False), 32, "1d"),
    "deepseek_v4": Case(lambda: DeepSeekV4RotaryEmbedding(32, 0.25), 32, "1d"),
    "mrope": Case(lambda: _mrope(16, (4, 2, 2)), 16, "mrope"),
    "mrope_partial": Case(lambda: _mrope(32, (2, 3, 3), 0.5), 32, "mrope"),
    "qwen_vision": Case(lambda: Qwen3OmniMoeVisionRotaryEmbedding(64, 4), 16, "qwen_vision"),
    "llama_vision": Case(lambda: LlamaVisionRotaryEmbedding(56, 14, 64, 4), 16, "llama_vision"),
}
ONE_D = [name for name, case in CASES.items() if case.kind in ("1d", "mrope")]
VISION = [name for name, case in CASES.items() if case.kind not in ("1d", "mrope")]


def _seq_len(case: Case) -> int:
    return {"qwen_vision": int(np.prod(QWEN_VISION_GRID)), "llama_vision": 17}.get(case.kind, 3)


def _apply(case: Case, module, x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    x = jnp.asarray(x)
    if case.kind == "qwen_vision":
        return np.asarray(run(module, x, *QWEN_VISION_GRID))
    if case.kind == "llama_vision":
        return np.asarray(run(module, x))
    return np.asarray(run(module, x, jnp.asarray(positions, jnp.int32)))


def vectors(shape: tuple[int, ...]):
    """float32 arrays in [-64, 64], magnitudes below 1e-6 set to 0 (so no product reaches the subnormals)."""
    return hnp.arrays(np.float32, shape, elements=st.floats(-64, 64, width=32)).map(
        lambda a: np.where(np.abs(a) < 1e-6, np.float32(0), a)
    )


def positions_for(case: Case, batch: int, seq: int, high: int = 1999):
    shape = (batch, seq, 3) if case.kind == "mrope" else (batch, seq)
    return hnp.arrays(np.int32, shape, elements=st.integers(0, high))


@pytest.mark.parametrize("name", CASES)
@PROPERTY
@given(data=st.data())
def test_rotation_preserves_head_norms(name, data):
    """Every rotary variant is an orthogonal map of each head vector: norms equal to rel 1e-5."""
    case = CASES[name]
    seq = _seq_len(case)
    x = data.draw(vectors((2, seq, HEADS, case.head_dim)), label="x")
    positions = None
    if case.kind in ("1d", "mrope"):
        positions = data.draw(positions_for(case, 2, seq), label="positions")
    out = _apply(case, case.make(), x, positions)
    np.testing.assert_allclose(
        np.linalg.norm(_f64(out), axis=-1), np.linalg.norm(_f64(x), axis=-1), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("name", ONE_D)
@PROPERTY
@given(data=st.data())
def test_scores_depend_only_on_position_difference(name, data):
    """q.k after rotation is unchanged when both positions shift by the same offset (per axis for MRoPE).

    Positions stay below 2000, where a float32 angle `p * f` (f <= 1) is rounded by at most half an ulp of
    2048, 6.1e-5 rad; the four angles can move a pair's relative angle by 2.4e-4 rad between the two
    placements, so |delta(q.k)| <= 2.4e-4 |q||k|; the bound used is 3e-4 |q||k| (float32 dot rounding adds
    < 1e-5 relative).
    """
    case = CASES[name]
    qk = data.draw(vectors((2, HEADS, case.head_dim)), label="q, k")
    shape = (3,) if case.kind == "mrope" else ()
    start = st.integers(0, 999)
    p_q, p_k, offset = (data.draw(hnp.arrays(np.int32, shape, elements=start)) for _ in range(3))
    positions = np.stack([p_q, p_k, p_q + offset, p_k + offset])[None]
    x = np.stack([qk[0], qk[1], qk[0], qk[1]])[None]
    out = _f64(_apply(case, case.make(), x, positions))[0]
    before, after = np.sum(out[0] * out[1], axis=-1), np.sum(out[2] * out[3], axis=-1)
    bound = 3e-4 * np.linalg.norm(_f64(qk[0]), axis=-1) * np.linalg.norm(_f64(qk[1]), axis=-1)
    assert np.all(np.abs(before - after) <= bound), (before, after, bound)


@pytest.mark.parametrize("name", VISION)
@PROPERTY
@given(data=st.data())
def test_vision_scores_depend_only_on_patch_offset(name, data):
    """For 2-D RoPE, q.k between patches depends only on (d_row, d_col): every score with the same offset is
    equal to 1e-5 |q||k| (angles stay below 5 rad, so float32 angle error is < 1e-6 rad)."""
    case = CASES[name]
    qk = data.draw(vectors((2, HEADS, case.head_dim)), label="q, k")
    seq = _seq_len(case)
    module = case.make()
    out_q = _f64(_apply(case, module, np.broadcast_to(qk[0], (1, seq, HEADS, case.head_dim)), None))[0]
    out_k = _f64(_apply(case, module, np.broadcast_to(qk[1], (1, seq, HEADS, case.head_dim)), None))[0]
    if case.kind == "llama_vision":
        out_q, out_k = out_q[:-1], out_k[:-1]
        token = np.arange(16)
        row, col = token // 4, token % 4
    else:
        row, col = np_block_coords(*QWEN_VISION_GRID, 2)
    scores = np.einsum("ihd,jhd->hij", out_q, out_k)
    key = (row[:, None] - row[None, :]) * 100 + (col[:, None] - col[None, :])
    bound = 1e-5 * np.linalg.norm(_f64(qk[0]), axis=-1) * np.linalg.norm(_f64(qk[1]), axis=-1)
    for offset in np.unique(key):
        group = scores[:, key == offset]
        assert np.all(group.max(-1) - group.min(-1) <= bound), (offset, group, bound)


PARTIAL = {
    "partial": (lambda: PartialRotaryEmbedding(32, 0.5), np.s_[..., 16:]),
    "gemma4_half1": (lambda: Gemma4PartialRotaryEmbedding(32, 0.25), np.s_[..., 4:16]),
    "gemma4_half2": (lambda: Gemma4PartialRotaryEmbedding(32, 0.25), np.s_[..., 20:]),
    "deepseek_v4": (lambda: DeepSeekV4RotaryEmbedding(32, 0.25), np.s_[..., :24]),
    "mrope_partial": (lambda: _mrope(32, (2, 3, 3), 0.5), np.s_[..., 16:]),
}


@pytest.mark.parametrize("name", PARTIAL)
@PROPERTY
@given(data=st.data())
def test_unrotated_dims_are_bit_identical(name, data):
    """Dims outside the rotary part pass through unchanged, bit for bit."""
    make, untouched = PARTIAL[name]
    module = make()
    x = data.draw(vectors((2, 3, HEADS, 32)), label="x")
    shape = (2, 3, 3) if name.startswith("mrope") else (2, 3)
    positions = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, 1999)), label="positions")
    out = np.asarray(run(module, jnp.asarray(x), jnp.asarray(positions)))
    np.testing.assert_array_equal(out[untouched], x[untouched])


@PROPERTY
@given(data=st.data())
def test_qwen_vision_padded_tokens_are_bit_identical(data):
    """With per-example grid_thw inside the padded length, padded tokens pass through bit for bit."""
    rope = Qwen3OmniMoeVisionRotaryEmbedding(64, 4)
    x = data.draw(vectors((2, 16, HEADS, 16)), label="x")
    h = data.draw(st.sampled_from([2, 4]), label="h")
    w = data.draw(st.sampled_from([2, 4]), label="w")
    grid = jnp.array([[1, 4, 4], [1, h, w]], jnp.int32)
    out = np.asarray(run(rope, jnp.asarray(x), 1, 4, 4, grid_thw=grid))
    np.testing.assert_array_equal(out[1, h * w :], x[1, h * w :])


@PROPERTY
@given(data=st.data())
def test_layout_helpers_are_inverses(data):
    """`interleaved_to_half` and `half_to_interleaved` invert each other; `half_to_interleaved([a | b])` is
    `[a0, b0, a1, b1, ...]`."""
    half = data.draw(st.sampled_from([1, 3, 8]), label="half")
    lead = data.draw(st.sampled_from([(), (2,), (2, 3)]), label="lead")
    x = data.draw(vectors((*lead, 2 * half)), label="x")
    interleaved, halves = run(half_to_interleaved, jnp.asarray(x)), run(interleaved_to_half, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(run(interleaved_to_half, interleaved)), x)
    np.testing.assert_array_equal(np.asarray(run(half_to_interleaved, halves)), x)
    expected = np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(interleaved), expected)


@PROPERTY
@given(data=st.data())
def test_interleaved_rope_is_half_split_rope_in_permuted_layout(data):
    """`RotaryEmbedding(interleaved=True)(x)` equals, bit for bit,
    `half_to_interleaved(RotaryEmbedding()(interleaved_to_half(x)))`."""
    x = jnp.asarray(data.draw(vectors((2, 3, HEADS, 16)), label="x"))
    positions = jnp.asarray(data.draw(hnp.arrays(np.int32, (2, 3), elements=st.integers(0, 1999))))
    ours = RotaryEmbedding(16, interleaved=True)(x, positions)
    via_half = half_to_interleaved(RotaryEmbedding(16)(interleaved_to_half(x), positions))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(via_half))


@PROPERTY
@given(data=st.data())
def test_yarn_pairwise_is_interleaved_non_pairwise_output(data):
    """YaRN `pairwise=True` output == `half_to_interleaved` of the `pairwise=False` (half-split) output."""
    x = jnp.asarray(data.draw(vectors((2, 3, HEADS, 32)), label="x"))
    positions = jnp.asarray(data.draw(hnp.arrays(np.int32, (2, 3), elements=st.integers(0, 1999))))
    pairwise = YarnRotaryEmbedding(32, pairwise=True)(x, positions)
    concatenated = YarnRotaryEmbedding(32, pairwise=False)(x, positions)
    np.testing.assert_array_equal(np.asarray(pairwise), np.asarray(half_to_interleaved(concatenated)))


STRICT_CALLS = {
    "RotaryEmbedding": lambda key: RotaryEmbedding(8)(jnp.ones((1, 3, 1, 8))),
    "RotaryEmbedding.freqs_cis": lambda key: RotaryEmbedding(8, interleaved=True, max_seq_len=4).freqs_cis,
    "PartialRotaryEmbedding": lambda key: PartialRotaryEmbedding(8, 0.5)(jnp.ones((1, 3, 1, 8))),
    "Gemma4PartialRotaryEmbedding": lambda key: Gemma4PartialRotaryEmbedding(8, 0.5)(jnp.ones((1, 3, 1, 8))),
    "LLaMARotaryEmbedding": lambda key: LLaMARotaryEmbedding(8)(jnp.ones((1, 3, 1, 8))),
    "YarnRotaryEmbedding": lambda key: YarnRotaryEmbedding(8)(jnp.ones((1, 3, 1, 8))),
    "DeepSeekV4RotaryEmbedding": lambda key: DeepSeekV4RotaryEmbedding(8, 0.5)(jnp.ones((1, 3, 1, 8))),
    "Qwen3OmniMoeThinkerTextRotaryEmbedding": lambda key: Qwen3OmniMoeThinkerTextRotaryEmbedding(
        8, mrope_section=(2, 1, 1))(jnp.ones((1, 3, 1, 8)), jnp.ones((1, 3, 3), jnp.int32)),
    "PositionalEmbedding": lambda key: PositionalEmbedding(8)(3),
    "LlamaVisionRotaryEmbedding": lambda key: LlamaVisionRotaryEmbedding(28, 14, 16, 2)(
        jnp.ones((1, 5, 2, 8))),
    "Qwen3OmniMoeVisionRotaryEmbedding": lambda key: Qwen3OmniMoeVisionRotaryEmbedding(16, 2)(
        jnp.ones((1, 4, 2, 8)), 1, 2, 2),
    "Qwen3OmniMoeVisionPosEmbedInterpolate": lambda key: Qwen3OmniMoeVisionPosEmbedInterpolate(
        4, 8, key=key)(1, 2, 2),
    "Embed(use_iota_embed=True)": lambda key: Embed(5, 4, use_iota_embed=True, key=key)(
        jnp.ones((2,), jnp.int32)),
}


@pytest.mark.parametrize("name", STRICT_CALLS)
def test_runs_under_strict_promotion(name, getkey):
    """The suite's policy (tests/conftest.py): strict dtype promotion (no implicit int/float or bf16/f32 mixing)."""
    with jax.numpy_dtype_promotion("strict"):
        STRICT_CALLS[name](getkey())


# ----------------------------------------------------------------------------------------------------------
# C. Bad input -> ValueError naming the problem


BAD_CONSTRUCTION = [
    (lambda: RotaryEmbedding(7), "RotaryEmbedding: embedding_dims must be a positive even number, got 7"),
    (lambda: RotaryEmbedding(16, rope_linear_scaling_factor=0.0), "must be positive"),
    (lambda: PartialRotaryEmbedding(12, 0.25), "rotary dim .* must be a positive even number, got 3"),
    (lambda: PartialRotaryEmbedding(16, 1.5), r"partial_rotary_factor must be in \(0, 1\], got 1.5"),
    (lambda: LLaMARotaryEmbedding(7), "LLaMARotaryEmbedding: embedding_dims must be a positive even number"),
    (lambda: YarnRotaryEmbedding(7), "YarnRotaryEmbedding: embedding_dims must be a positive even number"),
    (lambda: YarnRotaryEmbedding(8, interleave=False, pairwise=True), "pairwise=True requires interleave"),
    (lambda: Gemma4PartialRotaryEmbedding(7), "Gemma4PartialRotaryEmbedding: embedding_dims .* got 7"),
    (lambda: Gemma4PartialRotaryEmbedding(12, 0.25), "Gemma4PartialRotaryEmbedding: rotary dim .* got 3"),
    (lambda: DeepSeekV4RotaryEmbedding(24, 0.125), "DeepSeekV4RotaryEmbedding: rotary dim must be .* got 3"),
    (lambda: Qwen3OmniMoeThinkerTextRotaryEmbedding(18, partial_rotary_factor=0.5), "got 9"),
    (
        lambda: Qwen3OmniMoeThinkerTextRotaryEmbedding(16, mrope_section=(4, 2, 1)),
        r"mrope_section \(4, 2, 1\) sums to 7, but must sum to rotary_dim / 2 = 8",
    ),
    (lambda: _mrope(32, (8, 4, 4), 0.5), "sums to 16, but must sum to rotary_dim / 2 = 8"),
    (lambda: Qwen3OmniMoeThinkerTextRotaryEmbedding(16, mrope_section=(4.0, 2.0, 2.0)), "3 non-negative ints"),
    (lambda: Qwen3OmniMoeVisionRotaryEmbedding(60, 8), "hidden_size 60 is not divisible by num_attention"),
    (lambda: LlamaVisionRotaryEmbedding(56, 14, 60, 8), "hidden_size 60 is not divisible by num_attention"),
    (lambda: LlamaVisionRotaryEmbedding(50, 14, 64, 4), "image_size 50 is not a multiple of patch_size 14"),
    (lambda: PositionalEmbedding(7), "PositionalEmbedding: embedding_dims must be a positive even number"),
]


@pytest.mark.parametrize("make, match", BAD_CONSTRUCTION)
def test_bad_construction_raises(make, match):
    """Invalid hyper-parameters raise ValueError naming the offending value."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "module",
    [
        RotaryEmbedding(16),
        RotaryEmbedding(16, interleaved=True),
        PartialRotaryEmbedding(16, 0.5),
        LLaMARotaryEmbedding(16),
        YarnRotaryEmbedding(16),
        Gemma4PartialRotaryEmbedding(16),
        DeepSeekV4RotaryEmbedding(16, 0.5),
        Qwen3OmniMoeThinkerTextRotaryEmbedding(16, mrope_section=(4, 2, 2)),
    ],
    ids=lambda m: type(m).__name__,
)
def test_head_dim_mismatch_raises(module):
    """A rotary built for head_dim 16 called on head_dim 8 names both dims."""
    with pytest.raises(ValueError, match="built for head_dim 16, got input head_dim 8"):
        module(jnp.ones((1, 2, 1, 8)))


def test_positions_shape_mismatch_raises():
    """Positions not `(batch, seq)`: the shape checker names `positions` at the call boundary; without it
    (the undecorated method) the ValueError names both shapes."""
    rope, mrope = RotaryEmbedding(8), Qwen3OmniMoeThinkerTextRotaryEmbedding(16, mrope_section=(4, 2, 2))
    x8, x16 = jnp.ones((2, 4, 1, 8)), jnp.ones((2, 4, 1, 16))
    bad = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(jaxtyping.TypeCheckError, match="positions"):
        rope(x8, bad)
    raw = getattr(RotaryEmbedding.__call__, "__wrapped__", RotaryEmbedding.__call__)
    with pytest.raises(ValueError, match=r"positions \(2, 5\) must be \(batch, seq\) = \(2, 4\)"):
        raw(rope, x8, bad)
    with pytest.raises(ValueError, match=r"positions \(2, 4, 1\) must be \(batch, seq\)"):
        raw(rope, x8, jnp.zeros((2, 4, 1), jnp.int32))  # was broadcast into a rank-5 output
    raw_m = getattr(type(mrope).__call__, "__wrapped__", type(mrope).__call__)
    with pytest.raises(ValueError, match=r"positions \(2, 5\) must be \(batch, seq\)"):
        raw_m(mrope, x16, bad)
    with pytest.raises(ValueError, match=r"MRoPE positions must be \[batch, seq\] or \[batch, seq, 3\]"):
        raw_m(mrope, x16, jnp.zeros((2, 4, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"MRoPE positions .* got \(2, 5, 3\)"):
        raw_m(mrope, x16, jnp.zeros((2, 5, 3), jnp.int32))


def test_embed_rejects_float_ids(getkey):
    """Float ids are not silently truncated; a Python list (no type hook to catch it) is named, not an
    AttributeError."""
    embed = Embed(10, 4, key=getkey())
    with pytest.raises(ValueError, match="token ids must be integers, got dtype float32"):
        embed(jnp.array([0.0, 1.0]))
    with pytest.raises(TypeError, match=r"token ids must be an integer array \(JAX or NumPy\), got list"):
        inspect.unwrap(Embed.__call__)(embed, [[0, 1]])


@pytest.mark.parametrize("use_iota_embed", [False, True])
@pytest.mark.parametrize("bad_id", [10, -1])
def test_embed_out_of_range_ids(getkey, use_iota_embed, bad_id):
    """Concrete out-of-range ids raise ValueError naming the range; under jit the rows come back NaN."""
    embed = Embed(10, 4, use_iota_embed=use_iota_embed, key=getkey())
    ids = jnp.array([[0, bad_id, 3]], jnp.int32)
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, 10\), got range \[{min(bad_id, 0)}, "):
        embed(ids)
    out = np.asarray(run(embed, ids))
    assert np.all(np.isnan(out[0, 1])), f"out-of-range id {bad_id} under jit gave {out[0, 1]}"
    np.testing.assert_array_equal(out[0, [0, 2]], np.asarray(embed.embedding)[[0, 3]])


@pytest.mark.parametrize(
    "vocab, dtype",
    [(300, jnp.uint8), (256, jnp.uint8), (65_536, jnp.uint16), (70_000, jnp.uint16), (32_768, jnp.int16)],
)
def test_iota_embed_takes_ids_narrower_than_the_vocab(getkey, vocab, dtype):
    """uint16 ids (common storage for token ids) with a 65,536 vocab: the iota must not wrap in the ids' dtype."""
    embed = Embed(vocab, 4, use_iota_embed=True, key=getkey())
    last = min(vocab - 1, np.iinfo(dtype).max)
    ids = np.array([0, 7, last // 2, last - 1, last])
    out = embed(jnp.asarray(ids, dtype))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(embed.embedding)[ids])


def test_pos_embed_interpolate_non_square_raises(getkey):
    """num_position_embeddings must be a perfect square."""
    with pytest.raises(ValueError, match="num_position_embeddings must be a perfect square, got 50"):
        Qwen3OmniMoeVisionPosEmbedInterpolate(50, 8, key=getkey())


def test_grid_not_multiple_of_merge_size_raises(getkey):
    """h or w not a multiple of the spatial merge size is named by rotary, cos/sin table and pos-embed."""
    rope = Qwen3OmniMoeVisionRotaryEmbedding(64, 4, spatial_merge_size=2)
    match = r"grid \(t=1, h=3, w=4\) must be positive with h and w multiples of the spatial merge size 2"
    with pytest.raises(ValueError, match=match):
        rope(jnp.ones((1, 12, 4, 16)), 1, 3, 4)
    with pytest.raises(ValueError, match=match):
        rope.compute_cos_sin(1, 3, 4)
    with pytest.raises(ValueError, match=match):
        Qwen3OmniMoeVisionPosEmbedInterpolate(16, 8, 2, key=getkey())(1, 3, 4)


@pytest.mark.parametrize("grid, why", [([1, 4, 6], "beyond the 16 static patches"), ([1, 3, 4], "h odd"),
                                       ([0, 4, 4], "t zero"), ([1, -2, 4], "h negative")])
def test_concrete_per_example_grid_is_checked(getkey, grid, why):
    """A concrete per-example `grid_thw` is validated like a static grid (it was truncated or misplaced)."""
    rope = Qwen3OmniMoeVisionRotaryEmbedding(64, 4, spatial_merge_size=2)
    grids = jnp.array([[1, 4, 4], grid], jnp.int32)
    match = rf"grid \(t={grid[0]}, h={grid[1]}, w={grid[2]}\) must be positive .* within the static 16 patches"
    with pytest.raises(ValueError, match=match):
        rope(jnp.ones((2, 16, 4, 16)), 1, 4, 4, grids)
    with pytest.raises(ValueError, match=match):
        Qwen3OmniMoeVisionPosEmbedInterpolate(16, 8, 2, key=getkey())(1, 4, 4, grids)


def test_vision_sequence_length_mismatch_raises():
    """Sequence length != t*h*w (Qwen vision) or != patches + CLS (Llama vision)."""
    with pytest.raises(ValueError, match=r"sequence length 10 != num_frames \* height \* width = 16"):
        Qwen3OmniMoeVisionRotaryEmbedding(64, 4)(jnp.ones((1, 10, 4, 16)), 1, 4, 4)
    with pytest.raises(ValueError, match=r"expected 17 tokens \(patches \+ CLS\), got 16"):
        LlamaVisionRotaryEmbedding(56, 14, 64, 4)(jnp.ones((1, 16, 4, 16)))


def test_vision_grid_thw_batch_mismatch_raises():
    """grid_thw rows != batch: the shape checker names `grid_thw`; the undecorated method's ValueError
    names both shapes."""
    rope = Qwen3OmniMoeVisionRotaryEmbedding(64, 4)
    x, grid = jnp.ones((1, 16, 4, 16)), jnp.ones((2, 3), jnp.int32)
    with pytest.raises(jaxtyping.TypeCheckError, match="grid_thw"):
        rope(x, 1, 4, 4, grid)
    raw = getattr(type(rope).__call__, "__wrapped__", type(rope).__call__)
    with pytest.raises(ValueError, match=r"grid_thw must be \[batch, 3\] = \(1, 3\), got \(2, 3\)"):
        raw(rope, x, 1, 4, 4, grid)
