"""Linear (MaxText DenseGeneral) vs float64 NumPy and torch.nn.functional.linear."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from eqx_models.layers import MLP, Linear
from eqx_models.layers.linear import _as_tuple, scaled_normal
from tests.reference import assert_close, bf16_ulps

IN_OUT = [((64,), (4, 16)), ((4, 16), (64,)), ((2, 3), (5, 7))]
IN_OUT_IDS = ["64->4x16", "4x16->64", "2x3->5x7"]


def _randomised(layer, rng, scale=0.2, bias_scale=1.0):
    """`layer` (or its `eqx.filter_eval_shape` skeleton) with random kernel and bias, returned with them."""
    kernel = (scale * rng.standard_normal(layer.kernel.shape)).astype(np.float32)
    layer = eqx.tree_at(lambda m: m.kernel, layer, jnp.asarray(kernel, layer.kernel.dtype))
    if layer.bias is None:
        return layer, kernel, None
    bias = (bias_scale * rng.standard_normal(layer.bias.shape)).astype(np.float32)
    return eqx.tree_at(lambda m: m.bias, layer, jnp.asarray(bias, layer.bias.dtype)), kernel, bias


@pytest.mark.parametrize("in_f,out_f", IN_OUT, ids=IN_OUT_IDS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_float64_einsum(getkey, rng, in_f, out_f, use_bias):
    """Linear vs float64 NumPy `tensordot(x, kernel, len(in)) + bias` over leading (batch, seq) dims."""
    layer = eqx.filter_eval_shape(Linear, in_f, out_f, use_bias=use_bias, key=getkey())
    layer, kernel, bias = _randomised(layer, rng)
    x = rng.standard_normal((2, 3, *in_f)).astype(np.float32)
    ref = np.tensordot(x.astype(np.float64), kernel.astype(np.float64), len(in_f))
    if use_bias:
        ref = ref + bias
    y = layer(jnp.asarray(x))
    assert y.shape == (2, 3, *out_f) and y.dtype == jnp.float32
    assert_close(y, ref, 1e-6, f"Linear {in_f}->{out_f} bias={use_bias} vs float64")


@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_torch_linear_with_transposed_weight(getkey, rng, use_bias):
    """Linear with kernel = W.T equals `torch.nn.functional.linear(x, W, b)` (W is torch's (out, in))."""
    w = rng.standard_normal((48, 64)).astype(np.float32) / 8
    b = rng.standard_normal(48).astype(np.float32) if use_bias else None
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    layer = eqx.tree_at(lambda m: m.kernel, Linear(64, 48, use_bias=use_bias, key=getkey()), jnp.asarray(w.T))
    if use_bias:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.asarray(b))
    with torch.no_grad():
        ref = torch.nn.functional.linear(
            torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b)
        ).numpy()
    assert_close(layer(jnp.asarray(x)), ref, 1e-6, f"Linear vs F.linear bias={use_bias}")


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("use_bias", [False, True])
def test_bf16_compute_with_fp32_params(getkey, rng, use_bias):
    """dtype=bf16, param_dtype=fp32: fp32 storage, bf16 output equal to bf16-rounded float64 on bf16 operands.

    Reference: `bf16(x . k + bf16(b))` in float64: the bias joins the unrounded product and the sum is rounded
    once, as torch's bf16 nn.Linear (rounding the product first put 31% of outputs 1 ulp off torch's).
    """
    layer = Linear(64, (4, 8), use_bias=use_bias, dtype=jnp.bfloat16, key=getkey())
    layer, kernel, bias = _randomised(layer, rng, bias_scale=0.1)
    assert layer.kernel.dtype == jnp.float32
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = layer(jnp.asarray(x))
    assert y.dtype == jnp.bfloat16
    ref = _bf16(np.tensordot(_bf16(x), _bf16(kernel), 1) + (_bf16(bias) if use_bias else 0.0))
    ulps = bf16_ulps(np.asarray(y, np.float32), ref.astype(np.float32))
    n_diff = np.count_nonzero(ulps)
    print(f"Linear bf16 compute bias={use_bias}: max {ulps.max()} ulp, {n_diff}/{ulps.size} differ")
    # <= 1 ulp: the fp32 accumulation (vs float64) can flip the bf16 rounding.
    assert ulps.max() <= 1
    if use_bias:
        assert n_diff <= ulps.size // 50, f"{n_diff}/{ulps.size} outputs differ from the once-rounded sum"
    # 2^-7 = 7.8e-3: one bf16 rounding, <= 2^-8 of its value.
    unrounded = np.tensordot(_bf16(x), _bf16(kernel), 1) + (_bf16(bias) if use_bias else 0.0)
    assert_close(y, unrounded, 2**-7, f"Linear bf16 compute bias={use_bias} vs unrounded float64")
    assert layer(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_bf16_bias_gradient_is_summed_in_float32(getkey, rng):
    """With bf16 compute, the float32 bias's gradient over 16,384 rows vs float64 NumPy, tol 1e-5 (float32
    summation). Summed in bf16, as before `cast_broadcast`, it was 2e-3 off."""
    layer = Linear(16, 8, use_bias=True, dtype=jnp.bfloat16, key=getkey())
    x = jnp.asarray(rng.standard_normal((4, 4096, 16)), jnp.float32)
    cotangent = jnp.asarray(rng.uniform(0.5, 1.5, (4, 4096, 8)), jnp.bfloat16).astype(jnp.float32)
    grad = jax.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) * cotangent))(layer)
    assert grad.bias.dtype == jnp.float32
    assert_close(grad.bias, np.asarray(cotangent, np.float64).sum((0, 1)), 1e-5, "bf16 Linear bias gradient")


@pytest.mark.parametrize("in_f,out_f", IN_OUT, ids=IN_OUT_IDS)
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_parameter_layout(getkey, in_f, out_f, param_dtype):
    """Kernel is stored (*in, *out) and the bias (*out,), both in param_dtype; ints become 1-tuples."""
    layer = eqx.filter_eval_shape(Linear, in_f, out_f, use_bias=True, param_dtype=param_dtype, key=getkey())
    assert layer.kernel.shape == (*in_f, *out_f) and layer.kernel.dtype == param_dtype
    assert layer.bias.shape == out_f and layer.bias.dtype == param_dtype
    assert layer.in_features == in_f and layer.out_features == out_f
    plain = eqx.filter_eval_shape(Linear, in_f[0], out_f[0], key=getkey())
    assert plain.bias is None and plain.kernel.shape == (in_f[0], out_f[0])


def test_bias_starts_at_zero(getkey):
    """A fresh bias is all zeros, stored in param_dtype."""
    layer = Linear(8, (2, 3), use_bias=True, param_dtype=jnp.bfloat16, key=getkey())
    assert layer.bias.dtype == jnp.bfloat16 and not np.any(np.asarray(layer.bias, np.float32))


@pytest.mark.parametrize(
    "in_f,out_f", [((1024,), (512,)), ((16, 64), (2, 256))], ids=["1024->512", "16x64->2x256"]
)
def test_init_statistics(getkey, in_f, out_f):
    """Truncated normal, std 1/sqrt(fan_in) with fan_in = prod(in_features), cut at 2 base-normal sigma."""
    kernel = np.asarray(Linear(in_f, out_f, key=getkey()).kernel, np.float64)
    std = 1.0 / math.sqrt(math.prod(in_f))
    # 524288 draws: sample std spread ~1/sqrt(2n) = 1e-3 relative, mean ~std/sqrt(n); 2% and 1% are loose.
    assert abs(kernel.std() / std - 1.0) < 0.02, kernel.std() / std
    assert abs(kernel.mean()) < 0.01 * std
    assert np.abs(kernel).max() <= 2.0 * std / 0.87962566 * (1 + 1e-6)
    k2 = np.asarray(Linear(in_f, out_f, key=getkey()).kernel)
    assert not np.array_equal(kernel, k2), "different keys gave the same kernel"


@pytest.mark.parametrize("truncated", [False, True])
def test_scaled_normal_in_blocks(getkey, truncated):
    """Above 8M values the draw runs in blocks, each from its own key: same statistics as one draw, no block a
    copy of another, the same values for the same key; small arrays are one plain draw."""
    key, std, shape = getkey(), 0.05, (3, 1024, 4096)  # 12.6M values: two blocks
    x = np.asarray(scaled_normal(key, shape, jnp.dtype(jnp.float32), std, truncated), np.float64)
    assert x.shape == shape
    assert "scan" in str(jax.make_jaxpr(lambda k: scaled_normal(k, shape, jnp.dtype(jnp.float32), std, truncated))(key))
    assert abs(x.std() / std - 1.0) < 0.005 and abs(x.mean()) < 0.005 * std
    assert (np.abs(x).max() <= 2.0 * std / 0.87962566 * (1 + 1e-6)) == truncated
    halves = x.reshape(2, -1)
    assert np.corrcoef(halves[0], halves[1])[0, 1] < 0.01
    np.testing.assert_array_equal(x, scaled_normal(key, shape, jnp.dtype(jnp.float32), std, truncated))
    small = scaled_normal(key, (64, 32), jnp.dtype(jnp.bfloat16), std, truncated)
    bf16 = jnp.bfloat16
    plain = (jax.random.truncated_normal(key, -2.0, 2.0, (64, 32), bf16) / 0.87962566 if truncated
             else jax.random.normal(key, (64, 32), bf16))
    assert small.dtype == bf16
    np.testing.assert_allclose(np.asarray(small, np.float32), std * np.asarray(plain, np.float32), rtol=1e-2)


@pytest.mark.parametrize(
    "in_f,shape",
    [((64,), (2, 63)), ((4, 16), (2, 16, 4)), ((4, 16), (16,)), ((64,), ())],
    ids=["wrong_dim", "swapped", "too_few_dims", "scalar"],
)
def test_wrong_trailing_dims_raise_value_error(getkey, in_f, shape):
    """Input whose trailing dims differ from in_features raises ValueError naming both."""
    layer = eqx.filter_eval_shape(Linear, in_f, 8, key=getkey())
    with pytest.raises(ValueError, match=r"trailing dims"):
        layer(jnp.ones(shape))


@pytest.mark.parametrize("bad", [0, (4, 0), (), (4, -1)])
def test_bad_feature_sizes_raise(getkey, bad):
    """Non-positive or empty feature tuples raise ValueError at construction."""
    with pytest.raises(ValueError):
        Linear(bad, 4, key=getkey())
    with pytest.raises(ValueError):
        Linear(4, bad, key=getkey())


def test_numpy_int_feature_sizes_build_without_the_hook(getkey):
    """A NumPy int (a size read from an array) is a size like an int; `Linear(np.int64(8), 4)` raised "not
    iterable" and an MLP with out_features=0 silently built an in_features-wide output."""
    for sizes, expected in [(np.int64(8), (8,)), ((np.int32(2), 3), (2, 3))]:
        got = _as_tuple(sizes)  # what Linear's constructor calls, reached with NumPy ints without the hook
        assert got == expected and all(type(f) is int for f in got)
    with pytest.raises(ValueError, match=r"feature sizes must be positive ints, got \(True,\)"):
        _as_tuple(True)
    with pytest.raises(ValueError, match=r"feature sizes must be positive ints, got \(0,\)"):
        MLP(8, 4, out_features=0, key=getkey())
