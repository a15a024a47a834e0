"""Dense projection with MaxText's DenseGeneral semantics."""

import functools
import math
import numbers
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray


def is_a(value: Any, kind: type) -> bool:
    """`isinstance` for sizes, counts and config values: any real is a float, any integral (NumPy too) an int,
    a bool neither."""
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, kind)


def _as_tuple(features: object) -> tuple[int, ...]:
    features = (features,) if isinstance(features, numbers.Integral) else tuple(features)
    if not features or any(not is_a(f, int) or f <= 0 for f in features):
        raise ValueError(f"feature sizes must be positive ints, got {features}")
    return tuple(int(f) for f in features)


def at_least_float32(dtype: DTypeLike) -> jnp.dtype:
    """float32 for the half-precision dtypes, else `dtype` itself: where one rounding at the end is wanted."""
    return max(jnp.dtype(dtype), jnp.dtype(jnp.float32), key=lambda d: d.itemsize)


def cast_broadcast(param: Array, shape: tuple[int, ...], dtype: DTypeLike) -> Array:
    """`param` broadcast to `shape`, then cast to `dtype`: the values of casting first, but the gradient's sum
    over the broadcast axes runs in `param`'s dtype. Summed in bf16, a norm scale's or bias's gradient over a
    16k-token batch is ~1% off; in float32 it is exact to float32 rounding."""
    return jnp.broadcast_to(param, shape).astype(dtype)


_DRAW_BLOCK = 1 << 22  # values drawn at a time by `scaled_normal`


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def scaled_normal(key: PRNGKeyArray, shape: tuple[int, ...], dtype: DTypeLike, std: float,
                  truncated: bool) -> Array:
    """A normal draw with standard deviation `std`; `truncated` cuts it at two deviations (rescaled so `std`
    still holds). Arrays of 8M values or more are drawn in blocks of at least 4M, one key each: XLA's threefry holds
    about three times its output in temporaries (2 GB for Qwen3-0.6B's embedding table drawn whole), and
    blocks that stay in cache draw faster."""
    size = math.prod(shape)
    blocks = math.gcd(size, 1 << max(0, (size // _DRAW_BLOCK).bit_length() - 1))

    def draw(k: PRNGKeyArray, block_shape: tuple[int, ...]) -> Array:
        if truncated:
            return (std / 0.87962566) * jax.random.truncated_normal(k, -2.0, 2.0, block_shape, dtype)
        return std * jax.random.normal(k, block_shape, dtype)

    if blocks == 1:
        return draw(key, shape)
    return jax.lax.map(lambda k: draw(k, (size // blocks,)), jax.random.split(key, blocks)).reshape(shape)


class Linear(eqx.Module):
    """`y = x . kernel (+ bias)`, contracting the trailing `in_features` axes of `x`.

    `in_features` and `out_features` are an int or a tuple of ints, so one layer can map `[..., embed]` to
    `[..., heads, head_dim]` or back. The kernel is stored `(*in_features, *out_features)` in `param_dtype`;
    the product runs in `dtype`.
    """

    kernel: Float[Array, "..."]
    bias: Float[Array, "..."] | None
    in_features: tuple[int, ...] = eqx.field(static=True)
    out_features: tuple[int, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        in_features: int | tuple[int, ...],
        out_features: int | tuple[int, ...],
        *,
        use_bias: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        self.in_features = _as_tuple(in_features)
        self.out_features = _as_tuple(out_features)
        self.dtype = jnp.dtype(dtype)
        # MaxText's default: truncated normal, variance 1/fan_in.
        std = 1.0 / math.sqrt(math.prod(self.in_features))
        shape = self.in_features + self.out_features
        self.kernel = scaled_normal(key, shape, jnp.dtype(param_dtype), std, True)
        self.bias = jnp.zeros(self.out_features, param_dtype) if use_bias else None

    def __call__(self, x: Float[Array, "*batch"]) -> Float[Array, "*batch_out"]:
        """`x`: `[..., *in_features]` -> `[..., *out_features]`."""
        n_in = len(self.in_features)
        if x.shape[x.ndim - n_in :] != self.in_features:
            raise ValueError(f"Linear expects trailing dims {self.in_features}, got input shape {x.shape}")
        x_axes = tuple(range(x.ndim - n_in, x.ndim))
        dims = ((x_axes, tuple(range(n_in))), ((), ()))
        if self.bias is None:
            return jax.lax.dot_general(x.astype(self.dtype), self.kernel.astype(self.dtype), dims)
        # the bias joins the float32 product and the sum is rounded once, as torch's nn.Linear
        wide = at_least_float32(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), self.kernel.astype(self.dtype), dims,
                                preferred_element_type=wide)
        return (y + cast_broadcast(self.bias, y.shape, self.dtype).astype(wide)).astype(self.dtype)
