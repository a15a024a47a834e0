"""Normalisations: RMSNorm (plain and zero-centred), gated RMSNorm, L2Norm, LayerNorm.

Statistics are always taken in float32, as the HF reference does.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float

from eqx_models.layers.linear import cast_broadcast


def _check_features(name: str, x: Array, num_features: int) -> None:
    if x.shape[-1] != num_features:
        raise ValueError(f"{name} expects last dim {num_features}, got input shape {x.shape}")


def _rms_normalize(x: Array, eps: float) -> Float[Array, "..."]:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(eqx.Module):
    """`y = x / rms(x) * (scale + scale_offset)` over the last axis.

    `scale_offset=0` (scale initialised to 1) is HF's `Qwen3RMSNorm`: the normalised value is cast to `dtype`
    before the scale multiply. `scale_offset=1` (scale initialised to 0) is the zero-centred `Qwen3NextRMSNorm`,
    which multiplies by `1 + scale` in float32 and casts last. `use_scale=False` drops the parameter.
    """

    scale: Float[Array, " features"] | None
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    scale_offset: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        scale_offset: float = 0.0,
        use_scale: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
    ):
        if num_features <= 0 or eps < 0:
            raise ValueError(f"RMSNorm needs num_features > 0 and eps >= 0, got {num_features}, {eps}")
        self.num_features, self.eps, self.scale_offset = num_features, eps, float(scale_offset)
        self.dtype = jnp.dtype(dtype)
        init = 0.0 if scale_offset else 1.0
        self.scale = jnp.full((num_features,), init, param_dtype) if use_scale else None

    def __call__(self, x: Float[Array, "*batch features"]) -> Float[Array, "*batch features"]:
        _check_features("RMSNorm", x, self.num_features)
        y = _rms_normalize(x, self.eps)
        if self.scale is None:
            return y.astype(self.dtype)
        if self.scale_offset:
            return (y * (self.scale.astype(jnp.float32) + self.scale_offset)).astype(self.dtype)
        return y.astype(self.dtype) * cast_broadcast(self.scale, y.shape, self.dtype)


class GatedRMSNorm(eqx.Module):
    """Gated DeltaNet output norm (HF `Qwen3NextRMSNormGated`): `scale * rmsnorm(x) * silu(gate)`.

    The scale is plain (initialised to 1, no offset); the gate is applied in float32 after normalising.
    """

    scale: Float[Array, " features"]
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
    ):
        if num_features <= 0 or eps < 0:
            raise ValueError(f"GatedRMSNorm needs num_features > 0 and eps >= 0, got {num_features}, {eps}")
        self.num_features, self.eps, self.dtype = num_features, eps, jnp.dtype(dtype)
        self.scale = jnp.ones((num_features,), param_dtype)

    def __call__(
        self, x: Float[Array, "*batch features"], gate: Float[Array, "*batch features"]
    ) -> Float[Array, "*batch features"]:
        _check_features("GatedRMSNorm", x, self.num_features)
        y = _rms_normalize(x, self.eps)
        h = cast_broadcast(self.scale, y.shape, self.dtype) * y.astype(self.dtype)
        return (h.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(self.dtype)


class L2Norm(eqx.Module):
    """Scale-less RMS normalisation `x * rsqrt(mean(x^2) + eps)` (MaxText's `L2Norm`, Llama-4 q/k norm)."""

    eps: float = eqx.field(static=True, default=1e-6)

    def __call__(self, x: Float[Array, "*batch features"]) -> Float[Array, "*batch features"]:
        return _rms_normalize(x, self.eps).astype(x.dtype)


def l2norm(x: Float[Array, "*batch features"], eps: float = 1e-6) -> Float[Array, "*batch features"]:
    """`x * rsqrt(sum(x^2) + eps)` in float32: the Gated DeltaNet q/k normalisation (eps inside the sqrt)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class LayerNorm(eqx.Module):
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, statistics in float32."""

    scale: Float[Array, " features"] | None
    bias: Float[Array, " features"] | None
    num_features: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
    ):
        if num_features <= 0 or eps < 0:
            raise ValueError(f"LayerNorm needs num_features > 0 and eps >= 0, got {num_features}, {eps}")
        self.num_features, self.eps, self.dtype = num_features, eps, jnp.dtype(dtype)
        self.scale = jnp.ones((num_features,), param_dtype) if use_scale else None
        self.bias = jnp.zeros((num_features,), param_dtype) if use_bias else None

    def __call__(self, x: Float[Array, "*batch features"]) -> Float[Array, "*batch features"]:
        _check_features("LayerNorm", x, self.num_features)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * self.scale.astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        return y.astype(self.dtype)
