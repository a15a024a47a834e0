"""DepthwiseCausalConv1D vs HF qwen3_next `causal_conv1d_fn` / `causal_conv1d_update` (torch fallbacks)."""

import importlib.util

import equinox as eqx
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from eqx_models.layers import Conv2d, DepthwiseCausalConv1D
from tests.reference import assert_close, bf16_ulps

B, C = 2, 12


def _conv(getkey, rng, kernel_size, use_bias):
    """Our conv and HF-layout weight (C, 1, K) / bias with equal random values: weight[j, c] = hf[c, 0, j]."""
    hf_w = (rng.standard_normal((C, 1, kernel_size)) / np.sqrt(kernel_size)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32) if use_bias else None
    conv = eqx.filter_eval_shape(DepthwiseCausalConv1D, C, kernel_size, use_bias=use_bias, key=getkey())
    conv = eqx.tree_at(lambda m: m.weight, conv, jnp.asarray(hf_w[:, 0, :].T))
    if use_bias:
        conv = eqx.tree_at(lambda m: m.bias, conv, jnp.asarray(bias))
    return conv, torch.from_numpy(hf_w), None if bias is None else torch.from_numpy(bias)


def _x(rng, seq):
    return rng.standard_normal((B, seq, C)).astype(np.float32)


def test_reference_is_the_torch_fallback():
    """No `causal_conv1d` package: HF's conv functions are the torch code this file compares against."""
    assert importlib.util.find_spec("causal_conv1d") is None


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_hf_causal_conv1d_fn(getkey, rng, kernel_size, use_bias):
    """Full sequence vs HF `causal_conv1d_fn` (F.conv1d, groups=C, padding K-1, first S outputs; no silu)."""
    conv, hf_w, hf_b = _conv(getkey, rng, kernel_size, use_bias)
    x = _x(rng, 10)
    with torch.no_grad():
        ref = hf_next.causal_conv1d_fn(torch.from_numpy(x).transpose(1, 2), hf_w[:, 0, :], hf_b)
        direct = F.conv1d(torch.from_numpy(x).transpose(1, 2), hf_w, hf_b, padding=kernel_size - 1, groups=C)
    ref = ref.transpose(1, 2).numpy()
    np.testing.assert_array_equal(ref, direct[:, :, :10].transpose(1, 2).numpy())
    y, state = conv(jnp.asarray(x))
    assert y.shape == x.shape and state.shape == (B, kernel_size - 1, C)
    assert_close(y, ref, 1e-6, f"conv K={kernel_size} bias={use_bias} vs causal_conv1d_fn")
    np.testing.assert_array_equal(np.asarray(state), x[:, 10 - (kernel_size - 1) :])


@pytest.mark.parametrize("use_bias", [False, True])
def test_short_sequence_and_init_state(getkey, rng, use_bias):
    """S < K - 1: output still matches HF and the state keeps zeros for the positions before t = 0."""
    conv, hf_w, hf_b = _conv(getkey, rng, 4, use_bias)
    x = _x(rng, 2)
    with torch.no_grad():
        ref = hf_next.causal_conv1d_fn(torch.from_numpy(x).transpose(1, 2), hf_w[:, 0, :], hf_b)
    y, state = conv(jnp.asarray(x))
    assert_close(y, ref.transpose(1, 2).numpy(), 1e-6, f"conv S=2 K=4 bias={use_bias} vs causal_conv1d_fn")
    np.testing.assert_array_equal(np.asarray(state), np.concatenate([np.zeros((B, 1, C), np.float32), x], 1))
    assert conv.init_state(3).shape == (3, 3, C) and not np.any(np.asarray(conv.init_state(3)))


@pytest.mark.parametrize("use_bias", [False, True])
def test_streaming_chunks_equal_one_call(getkey, rng, use_bias):
    """Chunks of 3 + 1 + 1 + 5 tokens, carrying the returned state, are bit-identical to one full call."""
    conv, _, _ = _conv(getkey, rng, 4, use_bias)
    x = jnp.asarray(_x(rng, 10))
    full, full_state = conv(x)
    outs, state, start = [], None, 0
    for n in (3, 1, 1, 5):
        y, state = conv(x[:, start : start + n], state)
        outs.append(y)
        start += n
    chunked = jnp.concatenate(outs, axis=1)
    diff = float(jnp.max(jnp.abs(chunked - full)))
    print(f"conv streaming bias={use_bias}: max |chunked - full| = {diff:.3e}")
    np.testing.assert_array_equal(np.asarray(chunked), np.asarray(full))
    np.testing.assert_array_equal(np.asarray(state), np.asarray(full_state))


@pytest.mark.parametrize("use_bias", [False, True])
def test_reset_equals_separate_sequences(getkey, rng, use_bias):
    """A row packing pieces of 5, 1 and 6 tokens (resets at 5 and 6) equals each piece run alone, for outputs
    and state; continuing from a state with a reset at the call's first token ignores that state."""
    conv, _, _ = _conv(getkey, rng, 4, use_bias)
    x = jnp.asarray(_x(rng, 12))
    reset = np.zeros((B, 12), bool)
    reset[:, [5, 6]] = True
    y, state = conv(x, reset=jnp.asarray(reset))
    for start, stop in ((0, 5), (5, 6), (6, 12)):
        alone, alone_state = conv(x[:, start:stop])
        np.testing.assert_allclose(np.asarray(y[:, start:stop]), np.asarray(alone), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state), np.asarray(alone_state))

    _, carried = conv(x[:, :5])
    first = jnp.zeros((B, 7), bool).at[:, 0].set(True)
    y, state = conv(x[:, 5:], carried, reset=first)
    fresh, fresh_state = conv(x[:, 5:])
    np.testing.assert_allclose(np.asarray(y), np.asarray(fresh), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state), np.asarray(fresh_state))

    short = np.zeros((B, 2), bool)
    short[:, 1] = True
    _, state = conv(x[:, :2], carried, reset=jnp.asarray(short))
    expected = np.concatenate([np.zeros((B, 2, C), np.float32), np.asarray(x[:, 1:2])], axis=1)
    np.testing.assert_array_equal(np.asarray(state), expected)


@pytest.mark.parametrize("prefill", [2, 6])
@pytest.mark.parametrize("use_bias", [False, True])
def test_decode_steps_match_hf_causal_conv1d_update(getkey, rng, prefill, use_bias):
    """One-token steps after a prefill vs HF `causal_conv1d_update` (HF state: last K inputs; ours: K - 1)."""
    k = 4
    conv, hf_w, hf_b = _conv(getkey, rng, k, use_bias)
    x = _x(rng, prefill + 5)
    _, state = conv(jnp.asarray(x[:, :prefill]))
    padded = np.concatenate([np.zeros((B, k, C), np.float32), x[:, :prefill]], 1)
    hf_state = torch.from_numpy(np.ascontiguousarray(padded[:, -k:].transpose(0, 2, 1)))
    ys, refs = [], []
    for t in range(prefill, prefill + 5):
        x_t = torch.from_numpy(x[:, t : t + 1]).transpose(1, 2)
        with torch.no_grad():
            ref = hf_next.causal_conv1d_update(x_t, hf_state, hf_w[:, 0, :], hf_b)
        refs.append(ref.transpose(1, 2).numpy())
        y, state = conv(jnp.asarray(x[:, t : t + 1]), state)
        ys.append(np.asarray(y))
        np.testing.assert_array_equal(np.asarray(state), hf_state[:, :, 1:].transpose(1, 2).numpy())
    what = f"conv decode prefill={prefill} bias={use_bias} vs causal_conv1d_update"
    assert_close(np.concatenate(ys, 1), np.concatenate(refs, 1), 1e-6, what)


def test_wrong_channels_raise_value_error(getkey):
    """An input whose channel count differs from the layer's raises ValueError naming both."""
    conv = DepthwiseCausalConv1D(C, 4, key=getkey())
    with pytest.raises(ValueError, match=rf"{C} channels.*\(2, 5, {C + 1}\)"):
        conv(jnp.ones((2, 5, C + 1)))


def test_wrong_state_length_raises_value_error(getkey):
    """A state whose length is not K - 1 raises ValueError naming the expected shape."""
    conv = DepthwiseCausalConv1D(C, 4, key=getkey())
    with pytest.raises(ValueError, match=rf"\(2, 3, {C}\).*\(2, 4, {C}\)"):
        conv(jnp.ones((2, 5, C)), jnp.zeros((2, 4, C)))


@pytest.mark.parametrize("state_shape", [(3, 3, C), (2, 3, C + 1)], ids=["batch", "channels"])
def test_state_batch_or_channels_mismatch_raise_type_check_error(getkey, state_shape):
    """State batch / channels are bound to the input's by the jaxtyping annotation."""
    conv = DepthwiseCausalConv1D(C, 4, key=getkey())
    with pytest.raises(jaxtyping.TypeCheckError):
        conv(jnp.ones((2, 5, C)), jnp.zeros(state_shape))


def test_wrong_rank_and_bad_constructor(getkey):
    """A 2-D input fails the shape check; non-positive channels / kernel size raise ValueError."""
    conv = DepthwiseCausalConv1D(C, 4, key=getkey())
    with pytest.raises(jaxtyping.TypeCheckError):
        conv(jnp.ones((5, C)))
    for channels, kernel_size in [(0, 4), (C, 0)]:
        with pytest.raises(ValueError):
            DepthwiseCausalConv1D(channels, kernel_size, key=getkey())


@pytest.mark.parametrize(("stride", "padding", "use_bias"), [(1, 0, True), (2, 1, True), (2, 1, False)])
def test_conv2d_matches_torch(getkey, rng, stride, padding, use_bias):
    """`Conv2d` (NHWC, kernel HWIO) vs `torch.nn.functional.conv2d` (NCHW, OIHW) with the same weights."""
    conv = Conv2d(3, 5, 3, stride=stride, padding=padding, use_bias=use_bias, key=getkey())
    kernel = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    conv = eqx.tree_at(lambda m: m.kernel, conv, jnp.asarray(kernel))
    if use_bias:
        conv = eqx.tree_at(lambda m: m.bias, conv, jnp.asarray(bias))
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    with torch.no_grad():
        ref = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(kernel).permute(3, 2, 0, 1),
                       torch.from_numpy(bias) if use_bias else None, stride=stride, padding=padding)
    assert_close(conv(jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy(), 1e-6, f"Conv2d stride={stride}")


def test_conv2d_bf16_with_bias_equals_torch_bf16(getkey, rng):
    """In bf16 the bias joins the float32 convolution and the sum is rounded once, as torch's bf16 conv2d (29% of
    outputs were 1 ulp off while the product was rounded before the bias add)."""
    conv = Conv2d(4, 6, 3, padding=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, key=getkey())
    kernel = jnp.asarray(0.3 * rng.standard_normal((3, 3, 4, 6)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(6), jnp.bfloat16)
    conv = eqx.tree_at(lambda m: (m.kernel, m.bias), conv, (kernel, bias))
    x = jnp.asarray(rng.standard_normal((2, 7, 5, 4)), jnp.bfloat16)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32)).bfloat16()  # noqa: E731
    with torch.no_grad():
        ref = F.conv2d(t(x).permute(0, 3, 1, 2), t(kernel).permute(3, 2, 0, 1), t(bias), padding=1)
    ulps = bf16_ulps(np.asarray(conv(x), np.float32), ref.permute(0, 2, 3, 1).float().numpy())
    print(f"bf16 Conv2d vs torch: {np.count_nonzero(ulps)}/{ulps.size} differ, max {ulps.max()} ulp")
    assert np.count_nonzero(ulps) <= ulps.size // 100


def test_conv2d_bad_input(getkey):
    with pytest.raises(ValueError, match="positive"):
        Conv2d(3, 0, 3, key=getkey())
    with pytest.raises(ValueError, match="input channels"):
        Conv2d(3, 5, 3, key=getkey())(jnp.zeros((1, 4, 4, 2)))
