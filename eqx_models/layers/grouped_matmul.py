"""A grouped matmul for the MoE grouped path as Pallas Triton kernels: rows sorted by expert in tiles of
`tile_rows`, each tile multiplied by its own expert's weight read in place.

The XLA form (`moe._take_blocks` + a batched einsum) copies every block's expert weights first; these kernels read
`w[expert]` tile by tile instead, and the weight gradient sums each expert's tiles in float32 inside the kernel.
Off GPU they run in Pallas's interpreter.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from eqx_models.layers.pallas_gpu import interpret, tiles_fit

_BLOCK_K, _BLOCK_N = 64, 128  # untuned: the common Triton GEMM tiles


def _tile(dim: int, largest: int) -> int:
    """The largest power of two <= `largest` dividing `dim` (1 if `dim` is odd)."""
    tile = largest
    while dim % tile:
        tile //= 2
    return tile


def grouped_matmul_tiles_fit(tile_rows: int, k: int, n: int) -> bool:
    """Whether `grouped_matmul` of `[rows, k] @ [experts, k, n]` in tiles of `tile_rows` can run here."""
    return tiles_fit(tile_rows, _tile(k, _BLOCK_K), _tile(n, _BLOCK_N))


def _call(kernel, grid, out_shape, name, dtype):
    """Three pipeline stages of 2-byte tiles; two of 4-byte ones, whose float32 weight-gradient tiles need 295 KB
    of shared memory at three (an H100 has 227 KB)."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=3 if jnp.dtype(dtype).itemsize <= 2 else 2),
        interpret=interpret(),
        name=name,
    )


def _gmm(x, w, tile_expert, tile_rows: int, transpose: bool):
    """`out[rows of tile t] = x[rows] @ w[tile_expert[t]]` (`.T` of it with `transpose`), float32 accumulation."""
    rows, k = x.shape
    n = w.shape[1] if transpose else w.shape[2]
    bk, bn = _tile(k, _BLOCK_K), _tile(n, _BLOCK_N)

    def kernel(tile_expert_ref, x_ref, w_ref, out_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        expert, tile, cols = tile_expert_ref[t], pl.ds(t * tile_rows, tile_rows), pl.ds(j * bn, bn)

        def body(i, acc):
            a = x_ref[tile, pl.ds(i * bk, bk)]
            if transpose:
                return acc + plgpu.dot(a, w_ref[expert, cols, pl.ds(i * bk, bk)], trans_b=True)
            return acc + plgpu.dot(a, w_ref[expert, pl.ds(i * bk, bk), cols])

        acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((tile_rows, bn), jnp.float32))
        out_ref[tile, cols] = acc.astype(out_ref.dtype)

    out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
    return _call(kernel, (rows // tile_rows, n // bn), out_shape, "grouped_matmul", x.dtype)(tile_expert, x, w)


def _tgmm(x, dy, tile_expert, tile_rows: int, num_experts: int):
    """`dw[e] = sum over tiles t of expert e of x[rows]^T @ dy[rows]`, float32."""
    k, n = x.shape[1], dy.shape[1]
    bk, bn = _tile(k, _BLOCK_K), _tile(n, _BLOCK_N)
    experts = jnp.arange(num_experts, dtype=tile_expert.dtype)
    first = jnp.searchsorted(tile_expert, experts, side="left").astype(jnp.int32)
    last = jnp.searchsorted(tile_expert, experts, side="right").astype(jnp.int32)

    def kernel(first_ref, last_ref, x_ref, dy_ref, dw_ref):
        e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        ks, ns = pl.ds(i * bk, bk), pl.ds(j * bn, bn)

        def body(t, acc):
            tile = pl.ds(t * tile_rows, tile_rows)
            return acc + plgpu.dot(x_ref[tile, ks], dy_ref[tile, ns], trans_a=True)

        dw_ref[e, ks, ns] = jax.lax.fori_loop(first_ref[e], last_ref[e], body, jnp.zeros((bk, bn), jnp.float32))

    out_shape = jax.ShapeDtypeStruct((num_experts, k, n), jnp.float32)
    name = "grouped_matmul_weight_grad"
    return _call(kernel, (num_experts, k // bk, n // bn), out_shape, name, x.dtype)(first, last, x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(
    x: Float[Array, "rows k"],
    w: Float[Array, "experts k n"],
    tile_expert: Int[Array, " tiles"],
    tile_rows: int,
) -> Float[Array, "rows n"]:
    """`x[rows of tile t] @ w[tile_expert[t]]` for tiles of `tile_rows` rows (`rows = tiles * tile_rows`),
    `tile_expert` sorted; result in `x.dtype`. Differentiable in `x` and `w`."""
    if w.ndim != 3 or x.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_matmul needs x [rows, k] and w [experts, k, n], got x {x.shape}, w {w.shape}")
    if x.shape[0] != tile_expert.shape[0] * tile_rows:
        raise ValueError(
            f"grouped_matmul needs rows = tiles * tile_rows, got {x.shape[0]} rows, {tile_expert.shape[0]} tiles "
            f"of {tile_rows}"
        )
    return _gmm(x, w, tile_expert, tile_rows, transpose=False)


def _grouped_matmul_fwd(x, w, tile_expert, tile_rows):
    return grouped_matmul(x, w, tile_expert, tile_rows), (x, w, tile_expert)


def _grouped_matmul_bwd(tile_rows, residuals, d_out):
    x, w, tile_expert = residuals
    d_x = _gmm(d_out, w, tile_expert, tile_rows, transpose=True)
    d_w = _tgmm(x, d_out, tile_expert, tile_rows, w.shape[0]).astype(w.dtype)
    return d_x, d_w, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
