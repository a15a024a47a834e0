"""The gated delta rule (the token mixer of Gated DeltaNet / Qwen3-Next `linear_attn`) in three forms, and a kernel.

Per batch row and value head, with a `key_dim x value_dim` state `S` starting at `initial_state` (or zeros):

    S = S * exp(g_t);   S = S + k_t (beta_t * (v_t - S^T k_t))^T;   o_t = S^T q_t

- `recurrent_gated_delta_rule`: one `lax.scan` over tokens; also the decode step (seq == 1).
- `naive_chunk_gated_delta_rule`: HF's `torch_chunk_gated_delta_rule`, one `lax.scan` over chunks doing
  everything per chunk.
- `chunk_gated_delta_rule`: everything that does not depend on the carried state (decays, the WY factors from
  one batched unit-triangular inverse, the intra-chunk attention) computed for all chunks at once; the scan over
  chunks only does the state matmuls. The training path. With `pallas=True` (`impl="chunk_pallas"`) that scan,
  forward and backward, is a Pallas Triton kernel; off GPU it runs in Pallas's interpreter. Not yet measured
  on a GPU, so `"auto"` does not pick it.

`gated_delta_rule(impl=...)` dispatches (`select_gated_delta_impl` says which form runs). All maths is float32;
the output comes back in `v.dtype` and the state in float32. `reset[b, t]` starts a new sequence at `t` (the
state carried into `t` is dropped), for packed rows; padding tokens need `g = 0, beta = 0` (state unchanged).
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Bool, Float

from eqx_models.layers.norms import l2norm
from eqx_models.layers.pallas_gpu import interpret, tiles_fit

GatedDeltaImpl = Literal["auto", "recurrent", "naive_chunk", "chunk", "chunk_pallas"]
GATED_DELTA_IMPLS = ("auto", "recurrent", "naive_chunk", "chunk", "chunk_pallas")

_Out = tuple[Float[Array, "batch seq heads value_dim"], Float[Array, "batch heads key_dim value_dim"]]


def select_gated_delta_impl(
    seq_len: int, impl: GatedDeltaImpl = "auto"
) -> Literal["recurrent", "naive_chunk", "chunk", "chunk_pallas"]:
    """The form `gated_delta_rule` runs: `impl` itself, or for `"auto"` the recurrent form when `seq_len == 1`
    (decode) and the fast chunked form otherwise, as HF does."""
    if impl not in GATED_DELTA_IMPLS:
        raise ValueError(f"gated delta impl must be one of {GATED_DELTA_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "recurrent" if seq_len == 1 else "chunk"


def _check_inputs(q, k, v, g, beta, initial_state, reset) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(
            f"gated delta rule needs q, k of shape (batch, seq, key_heads, key_dim), got q {q.shape}, k {k.shape}"
        )
    if v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"gated delta rule needs v of shape (batch, seq, heads, value_dim) with q's (batch, seq) = "
            f"{q.shape[:2]}, got v {v.shape}"
        )
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(
            f"gated delta rule needs g, beta of shape (batch, seq, heads) = {v.shape[:3]}, "
            f"got g {g.shape}, beta {beta.shape}"
        )
    key_heads, heads = q.shape[2], v.shape[2]
    if heads % key_heads:
        raise ValueError(f"gated delta rule needs heads ({heads}) divisible by key_heads ({key_heads})")
    state_shape = (v.shape[0], heads, q.shape[3], v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(
            f"gated delta rule needs initial_state of shape (batch, heads, key_dim, value_dim) = {state_shape}, "
            f"got {initial_state.shape}"
        )
    if reset is not None and (reset.shape != q.shape[:2] or reset.dtype != jnp.bool_):
        raise ValueError(
            f"gated delta rule needs a bool reset of shape (batch, seq) = {q.shape[:2]}, "
            f"got {reset.dtype} {reset.shape}"
        )


def _prepare(q, k, v, g, beta, initial_state, reset, use_qk_l2norm, scale):
    """Validates; returns float32 `q` (normalised, scaled), `k` (normalised), both expanded to the value heads,
    float32 `v, g, beta` and the initial state (zeros when None)."""
    _check_inputs(q, k, v, g, beta, initial_state, reset)
    key_heads, key_dim = q.shape[2:]
    batch, _, heads, value_dim = v.shape
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q = q * (key_dim**-0.5 if scale is None else scale)
    if heads != key_heads:
        # k-head j serves v-heads j*r .. j*r+r-1 (HF's repeat_interleave)
        q, k = jnp.repeat(q, heads // key_heads, axis=2), jnp.repeat(k, heads // key_heads, axis=2)
    if initial_state is None:
        state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    else:
        state = initial_state.astype(jnp.float32)
    return q, k, v.astype(jnp.float32), g.astype(jnp.float32), beta.astype(jnp.float32), state


def recurrent_gated_delta_rule(
    q: Float[Array, "batch seq key_heads key_dim"],
    k: Float[Array, "batch seq key_heads key_dim"],
    v: Float[Array, "batch seq heads value_dim"],
    g: Float[Array, "batch seq heads"],
    beta: Float[Array, "batch seq heads"],
    *,
    initial_state: Float[Array, "batch heads key_dim value_dim"] | None = None,
    reset: Bool[Array, "batch seq"] | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> _Out:
    """The gated delta rule token by token (`lax.scan` over `seq`); returns `(o, final_state)`.

    `g` is the log-decay (<= 0), `beta` the write strength; `scale` defaults to `key_dim ** -0.5` and multiplies
    `q` after the optional l2 normalisation.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, state = _prepare(q, k, v, g, beta, initial_state, reset, use_qk_l2norm, scale)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    if reset is not None:
        xs = xs + (reset.T,)

    def step(state, x):
        q_t, k_t, v_t, g_t, beta_t = x[:5]
        if reset is not None:
            state = jnp.where(x[5][:, None, None, None], 0.0, state)
        state = state * jnp.exp(g_t)[..., None, None]
        delta = beta_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[..., :, None] * delta[..., None, :]
        return state, jnp.einsum("bhkv,bhk->bhv", state, q_t)

    state, o = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), state


def _to_chunks(x: Array, chunk_size: int) -> Array:
    """`(batch, seq, heads, ...)` -> `(chunks, batch, heads, chunk, ...)`, right-padded with zeros."""
    batch, seq = x.shape[:2]
    pad = -seq % chunk_size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, (seq + pad) // chunk_size, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, (1, 2), (0, 3))


def _reset_segments(reset: Bool[Array, "batch seq"], chunk_size: int) -> Array:
    """Per-chunk segment ids `(chunks, batch, 1, chunk)`: the number of resets in chunk positions `0..i`."""
    batch, seq = reset.shape
    reset = jnp.pad(reset, [(0, 0), (0, -seq % chunk_size)]).reshape(batch, -1, chunk_size)
    return jnp.cumsum(jnp.moveaxis(reset, 1, 0).astype(jnp.int32), axis=-1)[:, :, None, :]


def _chunk_masks(segments: Array | None, chunk_size: int):
    """`(keep, carried, to_last)` for chunk positions i, j.

    `keep[i, j]`: j reaches i (j <= i, no reset in (j, i]); `carried[i]`: the carried state reaches i (no reset
    in 0..i); `to_last[j]`: j reaches the end of the chunk. Without resets only the causal mask remains.
    """
    idx = jnp.arange(chunk_size)
    causal = idx[:, None] >= idx[None, :]
    if segments is None:
        return causal, None, None
    keep = causal & (segments[..., :, None] == segments[..., None, :])
    return keep, segments == 0, segments == segments[..., -1:]


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"gated delta rule needs chunk_size >= 1, got {chunk_size}")


def _from_chunks(o: Array, seq: int) -> Array:
    """`(chunks, batch, heads, chunk, dim)` -> `(batch, seq, heads, dim)`, padding dropped."""
    chunks, batch, heads, chunk, dim = o.shape
    return jnp.moveaxis(o, (0, 3), (1, 2)).reshape(batch, chunks * chunk, heads, dim)[:, :seq]


def unit_lower_inverse(a: Float[Array, "*batch n n"]) -> Float[Array, "*batch n n"]:
    """`(I + a)^-1` for strictly lower triangular `a` (entries on and above the diagonal are ignored), by
    recursive 2x2 block inversion: `[[L11, 0], [L21, L22]]^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]`.

    Only batched matmuls, which run near peak on accelerators; LAPACK's batched triangular solve on CPU also
    deadlocks when several (simulated) devices call it at once (jaxlib 0.10).
    """
    n = a.shape[-1]
    if n == 1:
        return jnp.ones_like(a)
    h = n // 2
    top = unit_lower_inverse(a[..., :h, :h])
    bottom = unit_lower_inverse(a[..., h:, h:])
    corner = -bottom @ a[..., h:, :h] @ top
    zeros = jnp.zeros(a.shape[:-2] + (h, n - h), a.dtype)
    return jnp.concatenate(
        [jnp.concatenate([top, zeros], axis=-1), jnp.concatenate([corner, bottom], axis=-1)], axis=-2
    )


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """`a + b` and its rounding error, exactly (Knuth's TwoSum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def _in_chunk_sums(g: Array) -> tuple[Array, Array]:
    """The cumsum `G` of `g` over the last axis (a chunk) and the spans `S_ij = g_(j+1) + ... + g_i` (for
    i >= j). Taken as `G_i - G_j` of the plain cumsum, a strong forget (g ~ -300) leaves both near -1e3 and the span
    off by ~1e-4 (the decays by 3e-5, relative); the cumsum is carried as an exact pair `hi + lo`, so the span keeps
    float32 accuracy."""

    def combine(x, y):
        total, error = _two_sum(x[0], y[0])
        return total, error + x[1] + y[1]

    hi, lo = jax.lax.associative_scan(combine, (g, jnp.zeros_like(g)), axis=-1)
    lo = jax.lax.stop_gradient(lo)  # a rounding error: the gradient is the plain cumsum's
    return hi, (hi[..., :, None] - hi[..., None, :]) + (lo[..., :, None] - lo[..., None, :])


def _decay_matrix(spans: Array, keep: Array) -> Array:
    """`exp(S_ij)` where `keep`, else 0; masked before the exp so neither value nor gradient overflows."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, spans, 0.0)), 0.0)


def naive_chunk_gated_delta_rule(
    q: Float[Array, "batch seq key_heads key_dim"],
    k: Float[Array, "batch seq key_heads key_dim"],
    v: Float[Array, "batch seq heads value_dim"],
    g: Float[Array, "batch seq heads"],
    beta: Float[Array, "batch seq heads"],
    *,
    chunk_size: int = 64,
    initial_state: Float[Array, "batch heads key_dim value_dim"] | None = None,
    reset: Bool[Array, "batch seq"] | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> _Out:
    """HF's chunked gated delta rule, one `lax.scan` over chunks doing all the work of each chunk.

    The reference for `chunk_gated_delta_rule`; same arguments and result as `recurrent_gated_delta_rule`.
    """
    _check_chunk_size(chunk_size)
    out_dtype, seq = v.dtype, v.shape[1]
    q, k, v, g, beta, state = _prepare(q, k, v, g, beta, initial_state, reset, use_qk_l2norm, scale)
    xs = tuple(_to_chunks(x, chunk_size) for x in (q, k, v, g, beta))
    segments = None if reset is None else _reset_segments(reset, chunk_size)
    eye = jnp.eye(chunk_size, dtype=jnp.bool_)

    def step(state, x):
        q, k, v, g, beta = x[:5]  # (batch, heads, chunk, ...)
        keep, carried, to_last = _chunk_masks(None if segments is None else x[5], chunk_size)
        gc, spans = _in_chunk_sums(g)
        gamma = _decay_matrix(spans, keep)
        k_beta, v_beta = k * beta[..., None], v * beta[..., None]
        # strictly lower part of the UT system; with the unit diagonal it is (I + A) u = beta v
        ut = jnp.where(keep & ~eye, (k_beta @ jnp.swapaxes(k, -1, -2)) * gamma, 0.0)
        decay_in = jnp.exp(gc) if carried is None else jnp.where(carried, jnp.exp(gc), 0.0)
        inverse = unit_lower_inverse(ut)
        new_values = inverse @ v_beta
        k_cumdecay = inverse @ (k_beta * decay_in[..., None])
        v_new = new_values - k_cumdecay @ state
        intra = (q @ jnp.swapaxes(k, -1, -2)) * gamma
        o = (q * decay_in[..., None]) @ state + intra @ v_new
        decay_out = jnp.exp(spans[..., -1, :])
        chunk_decay = decay_in[..., -1]
        if to_last is not None:
            decay_out = jnp.where(to_last, decay_out, 0.0)
        state = state * chunk_decay[..., None, None] + jnp.swapaxes(k * decay_out[..., None], -1, -2) @ v_new
        return state, o

    if segments is not None:
        xs = xs + (segments,)
    state, o = jax.lax.scan(step, state, xs)
    return _from_chunks(o, seq).astype(out_dtype), state


def chunk_gated_delta_rule(
    q: Float[Array, "batch seq key_heads key_dim"],
    k: Float[Array, "batch seq key_heads key_dim"],
    v: Float[Array, "batch seq heads value_dim"],
    g: Float[Array, "batch seq heads"],
    beta: Float[Array, "batch seq heads"],
    *,
    chunk_size: int = 64,
    initial_state: Float[Array, "batch heads key_dim value_dim"] | None = None,
    reset: Bool[Array, "batch seq"] | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    pallas: bool = False,
) -> _Out:
    """The chunked gated delta rule with all state-free work batched over chunks (the training path).

    Per chunk (positions i, j; `G` the in-chunk cumsum of `g`; `Gamma_ij = exp(G_i - G_j)` for j <= i, zero
    across a reset, with `G_i - G_j` summed as its own span, `_in_chunk_sums`): the WY factors
    `U = (I + A)^-1 (beta V)`, `W = (I + A)^-1 (beta exp(G) K)` with `A = strict_lower(beta_i (k_i . k_j) Gamma_ij)`,
    and the intra-chunk attention `(Q K^T) * Gamma`; then a scan over chunks with `V' = U - W S`,
    `O = (Q exp(G)) S + intra V'`, `S <- exp(G_last) S + (K exp(G_last - G))^T V'`. Same arguments and result as
    `recurrent_gated_delta_rule`.

    `pallas=True` runs the scan over chunks, forward and backward, as Pallas Triton kernels (`_pallas_chunk_scan`,
    `_pallas_chunk_scan_bwd`): one program per (batch row, head, block of value columns) keeps its block of the
    state on chip for all chunks. Off GPU they run in Pallas's interpreter (slow; for tests).
    """
    _check_chunk_size(chunk_size)
    out_dtype, seq, value_dim = v.dtype, v.shape[1], v.shape[3]
    if pallas:
        _check_pallas_tiles(chunk_size, q.shape[3], value_dim)
    q, k, v, g, beta, state = _prepare(q, k, v, g, beta, initial_state, reset, use_qk_l2norm, scale)
    q, k, v, g, beta = (_to_chunks(x, chunk_size) for x in (q, k, v, g, beta))  # (chunks, batch, heads, chunk, ..)
    segments = None if reset is None else _reset_segments(reset, chunk_size)
    keep, carried, to_last = _chunk_masks(segments, chunk_size)

    gc, spans = _in_chunk_sums(g)
    gamma = _decay_matrix(spans, keep)
    k_t = jnp.swapaxes(k, -1, -2)
    a = jnp.where(keep & ~jnp.eye(chunk_size, dtype=jnp.bool_), beta[..., None] * (k @ k_t) * gamma, 0.0)
    # exp(G_i): how the carried state reaches position i (zero after a reset in this chunk)
    decay_in = jnp.exp(gc) if carried is None else jnp.where(carried, jnp.exp(gc), 0.0)
    rhs = jnp.concatenate([v * beta[..., None], k * (beta * decay_in)[..., None]], axis=-1)
    uw = unit_lower_inverse(a) @ rhs
    u, w = uw[..., :value_dim], uw[..., value_dim:]
    intra = (q @ k_t) * gamma
    q_in = q * decay_in[..., None]
    decay_out = jnp.exp(spans[..., -1, :])
    if to_last is not None:
        decay_out = jnp.where(to_last, decay_out, 0.0)
    k_out = k * decay_out[..., None]
    o, state = _chunk_scan(pallas, q_in, intra, u, w, k_out, decay_in[..., -1], state)
    return _from_chunks(o, seq).astype(out_dtype), state


def _t(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _advance(state, u, w, k_out, decay):
    """One chunk: `V' = U - W S` and the next state `d S + K_out^T V'`."""
    v_new = u - w @ state
    return state * decay[..., None, None] + _t(k_out) @ v_new, v_new


def _chunk_states(u, w, k_out, chunk_decay, state):
    """`_advance` over the chunks: `(S_c, V'_c)` for every chunk c, and the final state."""

    def step(state, x):
        new_state, v_new = _advance(state, *x)
        return new_state, (state, v_new)

    state, (states, v_new) = jax.lax.scan(step, state, (u, w, k_out, chunk_decay))
    return states, v_new, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_scan(pallas, q_in, intra, u, w, k_out, chunk_decay, state):
    """The sequential part of the chunked rule: `_chunk_states` and the output `O_c = Q_in_c S_c + intra_c V'_c`.

    Without differentiation the output is formed inside the scan and no per-chunk state is kept. The backward
    pass (`_chunk_scan_bwd`) carries only the state's cotangent through the chunks and computes every other
    gradient afterwards, batched over chunks, where `jax.grad` of the scan would do all of it per step.
    """
    if pallas:
        return _pallas_chunk_scan(q_in, intra, u, w, k_out, chunk_decay, state, keep_states=False)

    def step(state, x):
        q_in, intra, *advance = x
        new_state, v_new = _advance(state, *advance)
        return new_state, q_in @ state + intra @ v_new

    state, o = jax.lax.scan(step, state, (q_in, intra, u, w, k_out, chunk_decay))
    return o, state


def _chunk_scan_fwd(pallas, q_in, intra, u, w, k_out, chunk_decay, state):
    if pallas:
        o, final, states, v_new = _pallas_chunk_scan(
            q_in, intra, u, w, k_out, chunk_decay, state, keep_states=True
        )
    else:
        states, v_new, final = _chunk_states(u, w, k_out, chunk_decay, state)
        o = q_in @ states + intra @ v_new
    return (o, final), (q_in, intra, w, k_out, chunk_decay, states, v_new)


def _chunk_scan_bwd(pallas, residuals, cotangents):
    q_in, intra, w, k_out, chunk_decay, states, v_new = residuals
    d_o, d_final = cotangents
    d_q_in, d_intra = d_o @ _t(states), d_o @ _t(v_new)
    d_state, d_v = _t(q_in) @ d_o, _t(intra) @ d_o
    if pallas:
        d_nexts, d_u, d_initial = _pallas_chunk_scan_bwd(d_state, d_v, w, k_out, chunk_decay, d_final)
    else:

        def step(d_next, x):
            """`d_next`: the cotangent of `S_{c+1}`; returns that of `S_c`."""
            d_state, d_v, w, k_out, decay = x
            d_v = d_v + k_out @ d_next
            d_state = d_state + d_next * decay[..., None, None] - _t(w) @ d_v
            return d_state, (d_next, d_v)

        d_initial, (d_nexts, d_u) = jax.lax.scan(step, d_final, (d_state, d_v, w, k_out, chunk_decay), reverse=True)
    d_w = -d_u @ _t(states)
    d_k_out = v_new @ _t(d_nexts)
    d_decay = jnp.sum(states * d_nexts, axis=(-2, -1))
    return d_q_in, d_intra, d_u, d_w, d_k_out, d_decay, d_initial


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)

_PALLAS_VALUE_BLOCK = 32  # value columns per program (fla's kernels tune 32 / 64); untuned here


def _check_pallas_tiles(chunk_size: int, key_dim: int, value_dim: int) -> None:
    block = min(_PALLAS_VALUE_BLOCK, value_dim)
    if value_dim % block:
        raise ValueError(f"chunk_pallas needs value_dim ({value_dim}) to be a multiple of {block}")
    tiles = {"chunk_size": chunk_size, "key_dim": key_dim, "value block": block}
    if not tiles_fit(*tiles.values()):
        raise ValueError(f"chunk_pallas on GPU needs tiles that are powers of two >= 16 (Triton), got {tiles}")


def _pallas_call(kernel, chunk_decay: Array, value_dim: int, ins, outs, name: str, stages: int):
    """Runs `kernel` on a grid `(batch, heads, value blocks)`: every program sees all chunks of its (batch row,
    head) and one block of value columns. `ins` / `outs` are `(shape, split)` pairs: `(chunks, batch, heads, rows,
    cols)` arrays whose `cols` are value columns when `split` (else whole), `(batch, heads, key_dim, value_dim)`
    states, or the `(chunks, batch, heads)` chunk decays. `stages`: Triton's software pipelining depth, bounded
    by shared memory. Off GPU the kernel runs in Pallas's interpreter."""
    _, batch, heads = chunk_decay.shape
    block = min(_PALLAS_VALUE_BLOCK, value_dim)

    def spec(shape, split):
        if len(shape) == 3:
            return pl.BlockSpec((shape[0], None, None), lambda b, h, j: (0, b, h))
        if len(shape) == 4:
            return pl.BlockSpec((None, None, shape[2], block), lambda b, h, j: (b, h, 0, j))
        if split:
            return pl.BlockSpec((shape[0], None, None, shape[3], block), lambda b, h, j: (0, b, h, 0, j))
        return pl.BlockSpec((shape[0], None, None, *shape[3:]), lambda b, h, j: (0, b, h, 0, 0))

    return pl.pallas_call(
        kernel,
        grid=(batch, heads, value_dim // block),
        in_specs=[spec(*x) for x in ins],
        out_specs=[spec(*x) for x in outs],
        out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32) for shape, _ in outs],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=stages),
        interpret=interpret(),
        name=name,
    )


def _pallas_chunk_scan(q_in, intra, u, w, k_out, chunk_decay, state, *, keep_states: bool):
    """`_chunk_scan`'s forward as one Pallas kernel: `(o, final_state)`, and with `keep_states` also every
    chunk's incoming state and `V'` (the backward pass's residuals)."""
    chunks = u.shape[0]

    def kernel(q_in_ref, intra_ref, u_ref, w_ref, k_out_ref, decay_ref, initial_ref, o_ref, final_ref, *kept):
        def body(c, state):
            v_new = u_ref[c] - plgpu.dot(w_ref[c], state)
            o_ref[c] = plgpu.dot(q_in_ref[c], state) + plgpu.dot(intra_ref[c], v_new)
            if keep_states:
                kept[0][c] = state
                kept[1][c] = v_new
            return state * decay_ref[c] + plgpu.dot(k_out_ref[c], v_new, trans_a=True)

        final_ref[...] = jax.lax.fori_loop(0, chunks, body, initial_ref[...])

    ins = [(q_in.shape, False), (intra.shape, False), (u.shape, True), (w.shape, False), (k_out.shape, False),
           (chunk_decay.shape, False), (state.shape, True)]
    outs = [(u.shape, True), (state.shape, True)]
    if keep_states:
        outs += [((chunks, *state.shape), True), (u.shape, True)]
    # two stages would need 256 KB of shared memory with TF32 dots (an H100 has 227 KB); one needs 56 KB
    call = _pallas_call(kernel, chunk_decay, u.shape[-1], ins, outs, "gated_delta_chunk_scan", stages=1)
    return call(q_in, intra, u, w, k_out, chunk_decay, state)


def _pallas_chunk_scan_bwd(d_state, d_v, w, k_out, chunk_decay, d_final):
    """The backward scan of `_chunk_scan_bwd` as one Pallas kernel: the cotangents of every `S_{c+1}` and `U_c`,
    and of the initial state."""
    chunks = w.shape[0]

    def kernel(d_state_ref, d_v_ref, w_ref, k_out_ref, decay_ref, d_final_ref, d_nexts_ref, d_u_ref, d_initial_ref):
        def body(i, d_next):
            c = chunks - 1 - i
            d_nexts_ref[c] = d_next
            d_v = d_v_ref[c] + plgpu.dot(k_out_ref[c], d_next)
            d_u_ref[c] = d_v
            return d_state_ref[c] + d_next * decay_ref[c] - plgpu.dot(w_ref[c], d_v, trans_a=True)

        d_initial_ref[...] = jax.lax.fori_loop(0, chunks, body, d_final_ref[...])

    ins = [(d_state.shape, True), (d_v.shape, True), (w.shape, False), (k_out.shape, False),
           (chunk_decay.shape, False), (d_final.shape, True)]
    outs = [(d_state.shape, True), (d_v.shape, True), (d_final.shape, True)]
    call = _pallas_call(kernel, chunk_decay, d_v.shape[-1], ins, outs, "gated_delta_chunk_scan_bwd", stages=2)
    return call(d_state, d_v, w, k_out, chunk_decay, d_final)


def gated_delta_rule(
    q: Float[Array, "batch seq key_heads key_dim"],
    k: Float[Array, "batch seq key_heads key_dim"],
    v: Float[Array, "batch seq heads value_dim"],
    g: Float[Array, "batch seq heads"],
    beta: Float[Array, "batch seq heads"],
    *,
    impl: GatedDeltaImpl = "auto",
    chunk_size: int = 64,
    initial_state: Float[Array, "batch heads key_dim value_dim"] | None = None,
    reset: Bool[Array, "batch seq"] | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
) -> _Out:
    """The gated delta rule in the form `select_gated_delta_impl(seq, impl)` picks; returns `(o, final_state)`.

    `q, k`: `(batch, seq, key_heads, key_dim)`, `v`: `(batch, seq, heads, value_dim)` with `heads` a multiple of
    `key_heads`; `g` (log-decay, <= 0), `beta`: `(batch, seq, heads)`; `initial_state`:
    `(batch, heads, key_dim, value_dim)` float32; `reset[b, t]`: position t starts a new sequence.
    """
    _check_inputs(q, k, v, g, beta, initial_state, reset)
    kwargs = dict(initial_state=initial_state, reset=reset, use_qk_l2norm=use_qk_l2norm, scale=scale)
    chosen = select_gated_delta_impl(v.shape[1], impl)
    if chosen == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if chosen == "naive_chunk":
        return naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, pallas=chosen == "chunk_pallas", **kwargs)
