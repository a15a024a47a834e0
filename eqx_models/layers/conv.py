"""Convolutions: causal depthwise 1-D with an explicit state for step-by-step decoding (Gated DeltaNet), and a
plain 2-D convolution (the Qwen3-Omni audio tower's stem)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from eqx_models.layers.linear import at_least_float32, cast_broadcast


class DepthwiseCausalConv1D(eqx.Module):
    """`y[t, c] = sum_j weight[j, c] * x[t - K + 1 + j, c] (+ bias[c])`, zeros (or `state`) before `t = 0`.

    `weight` is `(kernel_size, channels)` (HF stores `(channels, 1, kernel_size)`). The state is the last
    `kernel_size - 1` inputs; passing the returned state into the next call continues the sequence exactly, so
    one token at a time equals the whole sequence at once. Products accumulate in float32. `reset[b, t]` marks
    the first token of a new (packed) sequence: outputs from `t` on read no input before `t`.
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
        reset: Bool[Array, "batch seq"] | None = None,
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
        taps = [xs[:, j : j + seq].astype(jnp.float32) for j in range(self.kernel_size)]
        if reset is not None:
            # input s may feed output t only if no sequence starts in (s, t]; the state counts as before t = 0
            starts = jnp.cumsum(reset.astype(jnp.int32), axis=1)
            starts = jnp.concatenate([jnp.zeros((batch, self.kernel_size - 1), jnp.int32), starts], axis=1)
            taps = [jnp.where((starts[:, j : j + seq] == starts[:, -seq:])[..., None], tap, 0.0)
                    for j, tap in enumerate(taps)]
            state_valid = starts[:, seq:] == starts[:, -1:]
        y = sum(tap * w[j] for j, tap in enumerate(taps))
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        new_state = xs[:, seq:]
        if reset is not None:
            new_state = jnp.where(state_valid[..., None], new_state, jnp.zeros((), self.dtype))
        return y.astype(self.dtype), new_state


class Conv2d(eqx.Module):
    """2-D convolution of `[batch, height, width, in]` (NHWC) with kernel `(kh, kw, in, out)`, symmetric zero
    padding and a bias (torch `Conv2d` semantics), computed in `dtype` with `lax.conv_general_dilated`."""

    kernel: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"] | None
    stride: int = eqx.field(static=True)
    padding: int = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        if min(in_channels, out_channels, kernel_size, stride) <= 0 or padding < 0:
            raise ValueError(
                f"Conv2d needs positive channels/kernel/stride and padding >= 0, got in={in_channels}, "
                f"out={out_channels}, kernel={kernel_size}, stride={stride}, padding={padding}"
            )
        k_w, k_b = jax.random.split(key)
        bound = 1.0 / (in_channels * kernel_size**2) ** 0.5  # torch's default init
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = jax.random.uniform(k_w, shape, param_dtype, -bound, bound)
        self.bias = jax.random.uniform(k_b, (out_channels,), param_dtype, -bound, bound) if use_bias else None
        self.stride, self.padding, self.dtype = stride, padding, jnp.dtype(dtype)

    def __call__(
        self, x: Float[Array, "batch height width cin"]
    ) -> Float[Array, "batch height_out width_out cout"]:
        if x.shape[-1] != self.kernel.shape[2]:
            raise ValueError(f"Conv2d expects {self.kernel.shape[2]} input channels, got shape {x.shape}")
        p, stride = self.padding, (self.stride, self.stride)
        wide = self.dtype if self.bias is None else at_least_float32(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel.astype(self.dtype), stride, ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=wide,
        )
        if self.bias is None:
            return y
        return (y + cast_broadcast(self.bias, y.shape, self.dtype).astype(wide)).astype(self.dtype)
