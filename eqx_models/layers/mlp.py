"""Feed-forward block with activations chosen by name (MaxText's `MlpBlock`)."""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

from eqx_models.layers.linear import Linear, at_least_float32


def _in_float32(fn: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """`fn` computed in float32 and rounded once to the input's dtype, as torch's bf16 kernels do (XLA rounds
    bf16 after every step of silu/gelu/sigmoid: up to 9 ulp off)."""
    return lambda x: fn(x.astype(at_least_float32(x.dtype))).astype(x.dtype)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": _in_float32(jax.nn.silu),
    "swish": _in_float32(jax.nn.silu),
    "gelu": _in_float32(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_pytorch_tanh": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_new": _in_float32(lambda x: jax.nn.gelu(x, approximate=True)),
    "relu": jax.nn.relu,
    "sigmoid": _in_float32(jax.nn.sigmoid),
    "linear": lambda x: x,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation function called `name` (HF names accepted: `gelu` is exact, `gelu_pytorch_tanh` tanh)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class MLP(eqx.Module):
    """`wo(prod_i act_i(wi(x)[..., i, :]))`: one fused input projection to `(len(activations), hidden)`.

    `activations=("silu", "linear")` is the gated SwiGLU MLP of Qwen3 (`down(silu(gate(x)) * up(x))`);
    a single activation gives a plain two-layer MLP (`fc2(act(fc1(x)))`).
    """

    wi: Linear
    wo: Linear
    activations: tuple[str, ...] = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        activations: Sequence[str] = ("silu", "linear"),
        out_features: int | None = None,
        use_bias: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        key: PRNGKeyArray,
    ):
        self.activations = tuple(activations)
        if not self.activations:
            raise ValueError("MLP needs at least one activation")
        for name in self.activations:
            get_activation(name)
        k_in, k_out = jax.random.split(key)
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        self.wi = Linear(in_features, (len(self.activations), hidden_features), key=k_in, **common)
        self.wo = Linear(hidden_features, in_features if out_features is None else out_features, key=k_out, **common)

    def __call__(self, x: Float[Array, "*batch embed"]) -> Float[Array, "*batch out"]:
        h = checkpoint_name(self.wi(x), "mlpwi")
        y = get_activation(self.activations[0])(h[..., 0, :])
        for i, name in enumerate(self.activations[1:], start=1):
            y = y * get_activation(name)(h[..., i, :])
        return checkpoint_name(self.wo(y), "mlpwo")
