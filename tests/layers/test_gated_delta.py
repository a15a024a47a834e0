"""The gated delta rule's forms vs HF qwen3_next `torch_{chunk,recurrent}_gated_delta_rule` (torch
fallbacks, float32) and vs a float64 NumPy recurrence written here (resets, which HF lacks)."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from eqx_models.layers import gated_delta as gd
from tests.reference import assert_close, lowered_for_an_h100, primitive_names

KEY_DIM, VALUE_DIM = 16, 8


def _inputs(rng, batch, seq, key_heads, heads, dtype=np.float32):
    """Random q, k, v, g (log-decay in [-1, -0.01]), beta in (0, 1), initial state.

    q, k have norm ~1 so the un-normalised path (|beta k.k| <= ~1) is a stable recurrence too.
    """
    q = rng.standard_normal((batch, seq, key_heads, KEY_DIM)) / np.sqrt(KEY_DIM)
    k = rng.standard_normal((batch, seq, key_heads, KEY_DIM)) / np.sqrt(KEY_DIM)
    v = rng.standard_normal((batch, seq, heads, VALUE_DIM))
    g = -rng.uniform(0.01, 1.0, (batch, seq, heads))
    beta = rng.uniform(0.0, 1.0, (batch, seq, heads))
    state = 0.5 * rng.standard_normal((batch, heads, KEY_DIM, VALUE_DIM))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta, state))


def _numpy_gdn(q, k, v, g, beta, state=None, reset=None, l2=True, scale=None):
    """Float64 recurrence: `S = S*exp(g); S += k (beta (v - S^T k))^T; o = S^T q`, reset zeroes S first."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    batch, seq, key_heads, key_dim = q.shape
    heads = v.shape[2]
    if l2:
        q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
        k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    q = q * (key_dim**-0.5 if scale is None else scale)
    q, k = np.repeat(q, heads // key_heads, 2), np.repeat(k, heads // key_heads, 2)
    s = np.zeros((batch, heads, key_dim, v.shape[3])) if state is None else np.array(state, np.float64)
    o = np.zeros(v.shape)
    for t in range(seq):
        if reset is not None:
            s[np.asarray(reset)[:, t]] = 0.0
        s = s * np.exp(g[:, t])[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", s, k[:, t]))
        s = s + k[:, t, :, :, None] * delta[:, :, None, :]
        o[:, t] = np.einsum("bhkv,bhk->bhv", s, q[:, t])
    return o, s


def _form(name, chunk_size=16, **kw):
    fn = {
        "recurrent": gd.recurrent_gated_delta_rule,
        "naive_chunk": functools.partial(gd.naive_chunk_gated_delta_rule, chunk_size=chunk_size),
        "chunk": functools.partial(gd.chunk_gated_delta_rule, chunk_size=chunk_size),
        "chunk_pallas": functools.partial(gd.chunk_gated_delta_rule, chunk_size=chunk_size, pallas=True),
    }[name]
    return jax.jit(functools.partial(fn, **kw))


FORMS = ("recurrent", "naive_chunk", "chunk", "chunk_pallas")


@pytest.mark.parametrize(
    "seq, chunk_size, key_heads, heads, with_state, l2",
    [
        (1, 16, 2, 4, True, True),
        (37, 16, 2, 4, False, True),
        (70, 32, 2, 2, True, False),
        (130, 64, 1, 2, True, True),
        (130, 32, 2, 2, False, False),
        (64, 16, 2, 4, True, False),
    ],
)
def test_forms_agree_with_float64_recurrence(rng, seq, chunk_size, key_heads, heads, with_state, l2):
    """All forms (outputs and final states) vs the float64 NumPy recurrence, rel <= 1e-5."""
    q, k, v, g, beta, s0 = _inputs(rng, 2, seq, key_heads, heads)
    s0 = s0 if with_state else None
    ref_o, ref_s = _numpy_gdn(q, k, v, g, beta, s0, l2=l2)
    for name in FORMS:
        fn = _form(name, chunk_size, use_qk_l2norm=l2, initial_state=None if s0 is None else jnp.asarray(s0))
        o, s = fn(q, k, v, g, beta)
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        assert s.shape == (2, heads, KEY_DIM, VALUE_DIM)
        what = f"{name} seq={seq} C={chunk_size} Hk={key_heads} H={heads} state={with_state} l2={l2}"
        assert_close(o, ref_o, 1e-5, f"{what}: output")
        assert_close(s, ref_s, 1e-5, f"{what}: final state")


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_forms_stay_accurate_after_a_strong_forget(rng, chunk_size):
    """A strong forget gate (g = -300, as trained Qwen3-Next layers have) puts the in-chunk cumsums near -300 to
    -1000; the chunked forms add each span of g directly, so the decays of later positions stay as accurate as
    the recurrence's (as differences of two cumsums they were off by up to 4e-5 relative)."""
    q, k, v, g, beta, s0 = _inputs(rng, 2, 150, 2, 4)
    g[:, 3::chunk_size // 2] = -300.0
    g[:, 5::7] -= 40.0
    ref_o, ref_s = _numpy_gdn(q, k, v, g, beta, s0)
    for name in FORMS:
        o, s = _form(name, chunk_size, initial_state=jnp.asarray(s0))(q, k, v, g, beta)
        assert_close(o, ref_o, 1e-6, f"{name} C={chunk_size}: output")
        assert_close(s, ref_s, 1e-6, f"{name} C={chunk_size}: final state")


def test_custom_scale(rng):
    """`scale` replaces key_dim**-0.5 and multiplies q after the l2norm."""
    q, k, v, g, beta, _ = _inputs(rng, 1, 20, 2, 2)
    ref_o, _ = _numpy_gdn(q, k, v, g, beta, scale=0.3)
    for name in FORMS:
        o, _ = _form(name, 8, scale=0.3)(q, k, v, g, beta)
        assert_close(o, ref_o, 1e-5, f"{name} scale=0.3")


@pytest.mark.parametrize(
    "seq, key_heads, heads, l2, with_reset", [(37, 2, 4, True, False), (40, 2, 2, False, True)]
)
def test_chunk_gradients_match_recurrent(rng, seq, key_heads, heads, l2, with_reset):
    """jax.grad of the chunk forms vs the recurrent form's (float32, both differentiated by JAX), w.r.t.
    q, k, v, g, beta, initial_state: rel <= 1e-5."""
    q, k, v, g, beta, s0 = _inputs(rng, 2, seq, key_heads, heads)
    reset = None
    if with_reset:
        reset = np.zeros((2, seq), bool)
        reset[0, [0, 11, 16]] = True
        reset[1, 25] = True
        reset = jnp.asarray(reset)
    co = rng.standard_normal((2, seq, heads, VALUE_DIM)).astype(np.float32)
    cs = rng.standard_normal(s0.shape).astype(np.float32)

    def grads(fn):
        def loss(q, k, v, g, beta, s0):
            o, s = fn(q, k, v, g, beta, initial_state=s0, reset=reset, use_qk_l2norm=l2)
            return jnp.sum(o * co) + jnp.sum(s * cs)

        return jax.jit(jax.grad(loss, argnums=range(6)))(q, k, v, g, beta, s0)

    ref = grads(gd.recurrent_gated_delta_rule)
    for name, fn in [
        ("chunk", functools.partial(gd.chunk_gated_delta_rule, chunk_size=16)),
        ("naive_chunk", functools.partial(gd.naive_chunk_gated_delta_rule, chunk_size=16)),
        ("chunk_pallas", functools.partial(gd.chunk_gated_delta_rule, chunk_size=16, pallas=True)),
    ]:
        for arg, ours, theirs in zip(("q", "k", "v", "g", "beta", "initial_state"), grads(fn), ref):
            assert_close(ours, theirs, 1e-5, f"{name} d/d{arg} vs recurrent (l2={l2}, reset={with_reset})")


def test_gradients_finite_for_strong_decay(rng):
    """g = -50 everywhere: exp(G_i - G_j) would overflow above the diagonal if masked after the exp."""
    q, k, v, _, beta, s0 = _inputs(rng, 1, 40, 2, 2)
    g = np.full(beta.shape, -50.0, np.float32)
    reset = jnp.asarray(np.arange(40)[None] % 13 == 5)
    for name, fn in [("chunk", gd.chunk_gated_delta_rule), ("naive_chunk", gd.naive_chunk_gated_delta_rule)]:
        def loss(q, k, v, g, beta, s0, fn=fn):
            o, s = fn(q, k, v, g, beta, chunk_size=32, initial_state=s0, reset=reset)
            return jnp.sum(o) + jnp.sum(s)

        val, gs = jax.jit(jax.value_and_grad(loss, argnums=range(6)))(q, k, v, g, beta, s0)
        assert np.isfinite(val)
        for arg, gr in zip(("q", "k", "v", "g", "beta", "initial_state"), gs):
            assert np.all(np.isfinite(np.asarray(gr))), f"{name}: d/d{arg} not finite for g = -50"


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("key_heads, heads", [(2, 4), (2, 2)])
def test_matches_hf(rng, l2, key_heads, heads):
    """vs HF `torch_chunk_gated_delta_rule` (chunk 64) and `torch_recurrent_gated_delta_rule`, float32, with an
    initial state and the output final state; HF expands q/k heads itself (repeat_interleave). rel <= 1e-5."""
    q, k, v, g, beta, s0 = _inputs(rng, 2, 70, key_heads, heads)
    t = torch.from_numpy
    hf_kw = dict(initial_state=t(s0), output_final_state=True, use_qk_l2norm_in_kernel=l2)
    with torch.no_grad():
        hf_chunk = hf_next.torch_chunk_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), chunk_size=64, **hf_kw)
        hf_rec = hf_next.torch_recurrent_gated_delta_rule(t(q), t(k), t(v), t(g), t(beta), **hf_kw)
    for name, chunk_size, (ref_o, ref_s), ref_name in [
        ("recurrent", 64, hf_rec, "torch_recurrent"),
        ("naive_chunk", 64, hf_chunk, "torch_chunk"),
        ("chunk", 64, hf_chunk, "torch_chunk"),
        ("chunk_pallas", 64, hf_chunk, "torch_chunk"),
    ]:
        o, s = _form(name, chunk_size, use_qk_l2norm=l2, initial_state=jnp.asarray(s0))(q, k, v, g, beta)
        what = f"{name} C={chunk_size} vs HF {ref_name} (Hk={key_heads}, H={heads}, l2={l2})"
        assert_close(o, ref_o.numpy(), 1e-5, f"{what}: output")
        assert_close(s, ref_s.numpy(), 1e-5, f"{what}: final state")


@pytest.mark.parametrize(
    "lengths, chunk_size, reset_first",
    [((13, 3, 20), 16, True), ((5, 6, 30), 16, False), ((16, 16, 5), 16, False), ((21, 43), 32, True)],
    ids=["inside-then-on-boundary", "two-inside-one-chunk", "on-boundaries", "inside-second-chunk"],
)
def test_reset_equals_separate_sequences(rng, lengths, chunk_size, reset_first):
    """A row packing [a | b | ...] with reset at each segment start equals the segments run separately (a from
    the initial state unless reset at t = 0 drops it); the final state is the last segment's. Row 1 has no
    reset and must equal the plain float64 recurrence."""
    seq = sum(lengths)
    q, k, v, g, beta, s0 = _inputs(rng, 2, seq, 2, 4)
    starts = np.cumsum((0,) + lengths[:-1])
    reset = np.zeros((2, seq), bool)
    reset[0, starts[1:]] = True
    reset[0, 0] = reset_first
    refs, state = [], None
    for i, (start, length) in enumerate(zip(starts, lengths)):
        sl = slice(start, start + length)
        init = s0[:1] if (i == 0 and not reset_first) else None
        o, state = _numpy_gdn(q[:1, sl], k[:1, sl], v[:1, sl], g[:1, sl], beta[:1, sl], init)
        refs.append(o)
    ref_o0, ref_s0 = np.concatenate(refs, axis=1), state
    ref_o1, ref_s1 = _numpy_gdn(q[1:], k[1:], v[1:], g[1:], beta[1:], s0[1:])
    for name in FORMS:
        fn = _form(name, chunk_size, initial_state=jnp.asarray(s0), reset=jnp.asarray(reset))
        o, s = fn(q, k, v, g, beta)
        what = f"{name} reset lengths={lengths} C={chunk_size} reset_first={reset_first}"
        assert_close(o[:1], ref_o0, 1e-5, f"{what}: packed row output")
        assert_close(s[:1], ref_s0, 1e-5, f"{what}: packed row final state")
        assert_close(o[1:], ref_o1, 1e-5, f"{what}: unpacked row output")
        assert_close(s[1:], ref_s1, 1e-5, f"{what}: unpacked row final state")


def test_padding_tokens_leave_state_unchanged(rng):
    """Tokens with g = 0, beta = 0 (any q, k, v) pass the state through: inserting them anywhere (left, middle,
    right) leaves the real tokens' outputs and the final state equal to the unpadded sequence's."""
    seq, padded = 29, 45
    q, k, v, g, beta, s0 = _inputs(rng, 2, padded, 2, 4)
    real = np.sort(rng.choice(np.arange(3, padded - 5), seq, replace=False))  # >= 3 left and 5 right pads
    g[:, np.setdiff1d(np.arange(padded), real)] = 0.0
    beta[:, np.setdiff1d(np.arange(padded), real)] = 0.0
    ref_o, ref_s = _numpy_gdn(q[:, real], k[:, real], v[:, real], g[:, real], beta[:, real], s0)
    for name in FORMS:
        o, s = _form(name, 16, initial_state=jnp.asarray(s0))(q, k, v, g, beta)
        assert_close(o[:, real], ref_o, 1e-5, f"{name} padded: real-token outputs")
        assert_close(s, ref_s, 1e-5, f"{name} padded: final state")


def test_streaming(rng):
    """Chunk prefill of 30 tokens, then the rest from the returned state, equals one call; token-by-token
    `gated_delta_rule` (auto -> recurrent at seq 1) from the same initial state equals the chunk form."""
    seq = 70
    q, k, v, g, beta, s0 = _inputs(rng, 2, seq, 2, 4)
    full = jax.jit(functools.partial(gd.chunk_gated_delta_rule, chunk_size=16))
    o_full, s_full = full(q, k, v, g, beta, initial_state=s0)
    o_a, s_a = full(q[:, :30], k[:, :30], v[:, :30], g[:, :30], beta[:, :30], initial_state=s0)
    o_b, s_b = full(q[:, 30:], k[:, 30:], v[:, 30:], g[:, 30:], beta[:, 30:], initial_state=s_a)
    assert_close(jnp.concatenate([o_a, o_b], 1), o_full, 1e-5, "chunk prefill 30 + rest: output")
    assert_close(s_b, s_full, 1e-5, "chunk prefill 30 + rest: final state")

    assert gd.select_gated_delta_impl(1) == "recurrent"
    step = jax.jit(gd.gated_delta_rule)
    state, outs = jnp.asarray(s0), []
    for t in range(seq):
        sl = slice(t, t + 1)
        o_t, state = step(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state)
        outs.append(o_t)
    assert_close(jnp.concatenate(outs, 1), o_full, 1e-5, "token-by-token recurrent vs chunk: output")
    assert_close(state, s_full, 1e-5, "token-by-token recurrent vs chunk: final state")


def test_select_impl():
    assert gd.select_gated_delta_impl(1, "auto") == "recurrent"
    assert gd.select_gated_delta_impl(2, "auto") == "chunk"
    assert gd.select_gated_delta_impl(1000, "auto") == "chunk"
    for impl in ("recurrent", "naive_chunk", "chunk", "chunk_pallas"):
        assert gd.select_gated_delta_impl(1, impl) == impl
        assert gd.select_gated_delta_impl(77, impl) == impl
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="fast"):
        gd.select_gated_delta_impl(5, "fast")


@pytest.mark.parametrize("impl", ["auto", "recurrent", "naive_chunk", "chunk", "chunk_pallas"])
def test_dispatch_runs_the_chosen_form(rng, impl):
    q, k, v, g, beta, _ = (jnp.asarray(x) for x in _inputs(rng, 1, 9, 1, 2))
    ref = {"auto": gd.chunk_gated_delta_rule, "recurrent": gd.recurrent_gated_delta_rule,
           "naive_chunk": gd.naive_chunk_gated_delta_rule, "chunk": gd.chunk_gated_delta_rule,
           "chunk_pallas": functools.partial(gd.chunk_gated_delta_rule, pallas=True)}[impl]
    o, s = gd.gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=4)
    o_ref, s_ref = ref(q, k, v, g, beta, **({} if impl == "recurrent" else {"chunk_size": 4}))
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))


def test_chunk_pallas_runs_the_kernels_and_checks_gpu_tiles(rng, monkeypatch):
    """`pallas=True` computes the chunk scan (forward, and forward + backward under `jax.grad`) in `pallas_call`s
    and none of it in a `lax.scan`; on GPU, tiles Triton cannot take are a ValueError naming them."""
    q, k, v, g, beta, s0 = (jnp.asarray(x) for x in _inputs(rng, 1, 40, 2, 4))

    def loss(q, pallas):
        o, s = gd.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=s0, pallas=pallas)
        return jnp.sum(o) + jnp.sum(s)

    for pallas, kernels, scans in ((True, 2, 0), (False, 0, 2)):
        names = primitive_names(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(q, pallas).jaxpr)
        assert (names.count("pallas_call"), names.count("scan")) == (kernels, scans), pallas
    names = primitive_names(jax.make_jaxpr(loss, static_argnums=1)(q, True).jaxpr)
    assert (names.count("pallas_call"), names.count("scan")) == (1, 0)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match=r"powers of two >= 16 \(Triton\), got \{'chunk_size': 16, 'key_dim': 16, "
                                         r"'value block': 8\}"):
        gd.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, pallas=True)
    with pytest.raises(ValueError, match=r"value_dim \(40\) to be a multiple of 32"):
        v40 = jnp.ones(v.shape[:3] + (40,))
        gd.chunk_gated_delta_rule(q, k, v40, g, beta, chunk_size=16, pallas=True)


def test_chunk_pallas_lowers_to_triton_for_gpu(monkeypatch):
    """Without a GPU the kernels run interpreted; this lowers them for CUDA (Pallas -> Triton IR, no PTX) at
    Qwen3-Next's tile sizes (chunk 64, key_dim 128, value_dim 128), forward and backward, so a kernel Triton
    cannot express fails here."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, v = jnp.ones((1, 128, 1, 128), jnp.bfloat16), jnp.ones((1, 128, 2, 128), jnp.bfloat16)
    g = -jnp.ones((1, 128, 2))

    def loss(q, k, v, g, beta):
        o, s = gd.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, pallas=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    for fn, kernels in ((loss, 1), (jax.grad(loss, argnums=range(5)), 2)):
        text = lowered_for_an_h100(lambda: jax.jit(fn).trace(q, q, v, g, g))
        assert text.count("__gpu$xla.gpu.triton") == kernels


def _raw(fn):
    """The undecorated function (the pytest jaxtyping hook wraps it and checks named dims first)."""
    return getattr(fn, "__wrapped__", fn)


def test_bad_inputs_raise(rng):
    q, k, v, g, beta, s0 = (jnp.asarray(x) for x in _inputs(rng, 2, 5, 2, 4))
    for name in ("recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule", "chunk_gated_delta_rule",
                 "gated_delta_rule"):
        fn = getattr(gd, name)
        q3 = jnp.ones((2, 5, 3, KEY_DIM))
        with pytest.raises(ValueError, match=r"heads \(4\) divisible by key_heads \(3\)"):
            fn(q3, q3, v, g, beta)
        raw = _raw(fn)
        cases = [
            ((q, k[..., :8], v, g, beta), {}, r"got q \(2, 5, 2, 16\), k \(2, 5, 2, 8\)"),
            ((q, k, v[:, :4], g, beta), {}, r"\(2, 5\), got v \(2, 4, 4, 8\)"),
            ((q, k, v, g[..., :2], beta), {}, r"= \(2, 5, 4\), got g \(2, 5, 2\), beta \(2, 5, 4\)"),
            ((q, k, v, g, beta), {"initial_state": s0[:, :2]}, r"= \(2, 4, 16, 8\), got \(2, 2, 16, 8\)"),
            ((q, k, v, g, beta), {"reset": jnp.zeros((2, 4), bool)}, r"= \(2, 5\), got bool \(2, 4\)"),
            ((q, k, v, g, beta), {"reset": jnp.zeros((2, 5), jnp.int32)}, r"got int32 \(2, 5\)"),
            ((q[0], k[0], v, g, beta), {}, r"got q \(5, 2, 16\), k \(5, 2, 16\)"),
        ]
        for args, kw, match in cases:
            with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
                fn(*args, **kw)
            with pytest.raises(ValueError, match=match):
                raw(*args, **kw)
    for fn in (gd.chunk_gated_delta_rule, gd.naive_chunk_gated_delta_rule):
        with pytest.raises(ValueError, match="chunk_size >= 1, got 0"):
            fn(q, k, v, g, beta, chunk_size=0)
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="impl"):
        gd.gated_delta_rule(q, k, v, g, beta, impl="fast")


def test_bfloat16_inputs(rng):
    """bf16 q, k, v, g, beta: output bf16, state float32, within 2e-2 of the float32 result on the same values."""
    arrays = _inputs(rng, 2, 40, 2, 4)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in arrays[:5]]
    f32 = [x.astype(jnp.float32) for x in bf]
    s0 = jnp.asarray(arrays[5])
    for name in FORMS:
        fn = _form(name, 16, initial_state=s0)
        o, s = fn(*bf)
        o_ref, s_ref = fn(*f32)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        assert_close(o, o_ref, 2e-2, f"{name} bf16 output vs float32")
        assert_close(s, s_ref, 1e-5, f"{name} bf16 inputs: float32 state vs float32 run")


@pytest.mark.parametrize("n", [1, 5, 48, 64])
def test_unit_lower_inverse_matches_float64(rng, n):
    """The block-recursive `(I + a)^-1` (what both chunked forms use in place of a triangular solve) vs
    NumPy's float64 inverse; the upper triangle and diagonal of `a` must be ignored."""
    a = rng.standard_normal((3, n, n)).astype(np.float32) * 0.3
    lower = np.tril(a.astype(np.float64), -1)
    ref = np.linalg.inv(np.eye(n) + lower)
    assert_close(gd.unit_lower_inverse(jnp.asarray(a)), ref, 1e-5, f"unit_lower_inverse n={n}")
