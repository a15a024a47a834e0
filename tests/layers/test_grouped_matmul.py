"""The Pallas grouped matmul (interpreted on CPU) vs a float64 NumPy formula, and its lowering to Triton."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models.layers.grouped_matmul import grouped_matmul
from eqx_models.layers.moe import RoutedMoE
from tests.reference import assert_close, lowered_for_an_h100, numpy_grouped_matmul, primitive_names


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_float64_with_empty_experts(rng, dtype, tol):
    """Output and gradients (x, w) vs float64; experts 0, 2 and 5 own no tile and get a zero weight gradient."""
    tile_rows, experts, k, n = 8, 6, 48, 40
    tile_expert = jnp.asarray([1, 1, 3, 4, 4, 4, 4], jnp.int32)
    rows = tile_rows * tile_expert.shape[0]
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((experts, k, n)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.standard_normal((rows, n)), dtype)

    out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, tile_expert, tile_rows), x, w)
    dx, dw = vjp(dy)
    ref_out, ref_dx, ref_dw = numpy_grouped_matmul(x, w, dy, tile_expert, tile_rows)
    assert out.dtype == dx.dtype == dw.dtype == dtype
    assert_close(out, ref_out, tol, "grouped matmul output")
    assert_close(dx, ref_dx, tol, "grouped matmul d/dx")
    assert_close(dw, ref_dw, tol, "grouped matmul d/dw")
    assert not np.asarray(dw, np.float32)[[0, 2, 5]].any()


def test_bad_shapes_raise():
    raw = getattr(grouped_matmul.fun, "__wrapped__", grouped_matmul.fun)  # past the jaxtyping hook of the test run
    with pytest.raises(ValueError, match=r"rows = tiles \* tile_rows, got 20 rows, 3 tiles of 8"):
        grouped_matmul(jnp.ones((20, 16)), jnp.ones((2, 16, 16)), jnp.zeros(3, jnp.int32), 8)
    with pytest.raises(ValueError, match=r"x \[rows, k\] and w \[experts, k, n\], got x \(24, 16\), w \(2, 8, 16\)"):
        raw(jnp.ones((24, 16)), jnp.ones((2, 8, 16)), jnp.zeros(3, jnp.int32), 8)


def test_lowers_to_triton_for_gpu(monkeypatch):
    """Forward, d/dx and d/dw lower for CUDA (Pallas -> Triton IR, no PTX) at bf16 MoE-like tiles."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    tile_expert = jnp.asarray([0, 0, 2], jnp.int32)
    x, w = jnp.ones((3 * 128, 256), jnp.bfloat16), jnp.ones((4, 256, 384), jnp.bfloat16)
    loss = lambda x, w: jnp.sum(grouped_matmul(x, w, tile_expert, 128).astype(jnp.float32))  # noqa: E731
    text = lowered_for_an_h100(lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, w))
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_moe_grouped_pallas_runs_the_kernels(monkeypatch):
    """`impl="grouped_pallas"` runs both projections, forward and backward, in `pallas_call`s (6 in all); on
    GPU too (64-row blocks at 512 tokens), but blocks under Triton's 16 rows (a few tokens) keep the XLA form."""
    layer = RoutedMoE(32, 16, 8, 2, impl="grouped_pallas", key=jax.random.key(0))

    def count(tokens):
        x = jnp.ones((1, tokens, 32))
        loss = lambda m: jnp.sum(m(x)[0])  # noqa: E731
        return primitive_names(jax.make_jaxpr(eqx.filter_value_and_grad(loss))(layer).jaxpr).count("pallas_call")

    assert count(64) == 6
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert count(512) == 6
    assert count(4) == 0
