"""Causal depthwise 1-D convolution with an explicit state for step-by-step decoding."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray


class DepthwiseCausalConv1D(eqx.Module):
    """`y[t, c] = sum_j weight[j, c] * x[t - K + 1 + j, c] (+ bias[c])`, zeros (or `state`) before `t = 0`.

    `weight` is `(kernel_size, channels)` (HF stores `(channels, 1, kernel_size)`). The state is the last
    `kernel_size - 1` inputs; passing the returned state into the next call continues the sequence exactly, so
    one token at a time equals the whole sequence at once. Products accumulate in float32.
    """

    weight: Float[Array, "kernel channels"]
    bias: Float[Array, " channels"] | None
    channels: int = eqx.field(static=True)
    kernel_size: int = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        use_bias: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        if channels <= 0 or kernel_size <= 0:
            raise ValueError(f"conv needs channels > 0 and kernel_size > 0, got {channels}, {kernel_size}")
        self.channels, self.kernel_size, self.dtype = channels, kernel_size, jnp.dtype(dtype)
        bound = 1.0 / kernel_size**0.5  # torch Conv1d default, fan_in = kernel_size for depthwise
        self.weight = jax.random.uniform(key, (kernel_size, channels), param_dtype, -bound, bound)
        self.bias = jnp.zeros((channels,), param_dtype) if use_bias else None

    def init_state(self, batch: int) -> Float[Array, "batch kernel_minus_1 channels"]:
        return jnp.zeros((batch, self.kernel_size - 1, self.channels), self.dtype)

    def __call__(
        self,
        x: Float[Array, "batch seq channels"],
        state: Float[Array, "batch kernel_minus_1 channels"] | None = None,
    ) -> tuple[Float[Array, "batch seq channels"], Float[Array, "batch kernel_minus_1 channels"]]:
        """Returns `(y, new_state)`; `state` defaults to zeros (the start of a sequence)."""
        batch, seq, channels = x.shape
        if channels != self.channels:
            raise ValueError(f"conv expects {self.channels} channels, got input shape {x.shape}")
        if state is None:
            state = self.init_state(batch)
        if state.shape != (batch, self.kernel_size - 1, channels):
            raise ValueError(
                f"conv state must be {(batch, self.kernel_size - 1, channels)}, got {state.shape}"
            )
        xs = jnp.concatenate([state.astype(self.dtype), x.astype(self.dtype)], axis=1)
        w = self.weight.astype(jnp.float32)
        y = sum(xs[:, j : j + seq].astype(jnp.float32) * w[j] for j in range(self.kernel_size))
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        return y.astype(self.dtype), xs[:, seq:]
