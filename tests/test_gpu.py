"""Checks that need a GPU, each against the reference path on the same device: cuDNN fused attention (outputs and
gradients, masks, padding), the Pallas Triton kernels compiled for the GPU (gated delta scan, MoE grouped
matmul), and whole models (GPU vs CPU logits, a bf16 train step). Skipped without a GPU; on a GPU machine run
`python -m pytest -q tests/test_gpu.py` (README, Benchmarks)."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_models as em
from eqx_models.layers import gated_delta as gd
from eqx_models.layers.attention import Attention
from eqx_models.layers.grouped_matmul import grouped_matmul
from eqx_models.layers.kv_cache import KVCache
from eqx_models.layers.moe import RoutedMoE
from eqx_models.training import lm_loss, make_optimizer
from tests.reference import assert_close, max_rel_err, numpy_grouped_matmul

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (CUDA backend)")

CUDNN = "cudnn"


def _has_triton_call(text: str) -> bool:
    """jaxlib <= 0.10.2 hands a Triton kernel to XLA; later ones compile it at lowering and call it through FFI."""
    return "__gpu$xla.gpu.triton" in text or "triton_kernel_call_ffi" in text


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def _value_and_grads(fn, *args):
    """`sum(fn(*args) * c)` (float32) and its gradients with respect to every argument, for a fixed random `c`."""
    out = fn(*args)
    c = jax.random.normal(jax.random.key(1), out.shape, jnp.float32)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * c)  # noqa: E731
    return out, eqx.filter_jit(eqx.filter_grad(lambda a: loss(*a)))(args)


# ----------------------------------------------------------------------------------------------------------
# cuDNN attention


def _attention(kernel, dtype, **kwargs):
    """The same weights (same key, float32 parameters) for every kernel and compute dtype."""
    return Attention(256, 8, 4, 64, attention_kernel=kernel, dtype=dtype, key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("segmented", [False, True], ids=["dense", "packed+padded"])
@pytest.mark.parametrize("mask", [{}, {"attention_type": "local_sliding", "sliding_window": 33},
                                  {"attention_type": "full"}], ids=["causal", "sliding33", "full"])
def test_cudnn_attention_matches_reference(rng, mask, segmented):
    """bf16 cuDNN vs bf16 reference path, both against the float32 reference: outputs and gradients (x and
    every weight) within 2x the reference path's own bf16 error; fully masked (padding) rows stay finite."""
    batch, seq = 2, 160
    segment_ids = np.ones((batch, seq), np.int32)
    if segmented:
        segment_ids[0, 70:] = 2  # two packed documents
        segment_ids[1, :25] = 0  # left padding
    segment_ids = jnp.asarray(segment_ids)
    real = np.asarray(segment_ids) != 0
    x = jnp.asarray(rng.standard_normal((batch, seq, 256)), jnp.float32)
    kwargs = {"segment_ids": segment_ids} if segmented else {}

    def run(kernel, dtype):
        layer = _attention(kernel, dtype, **mask)
        keep = jnp.asarray(real[..., None], jnp.float32)
        call = lambda m, x: m(x, **kwargs)[0].astype(jnp.float32) * keep  # noqa: E731
        out, grads = _value_and_grads(call, layer, x.astype(dtype))
        return layer, out, grads

    cudnn_layer, cudnn, cudnn_grads = run("cudnn", jnp.bfloat16)
    _, xla, xla_grads = run("dot_product", jnp.bfloat16)
    _, ref, ref_grads = run("dot_product", jnp.float32)
    assert CUDNN in _lowered(lambda m, x: m(x, **kwargs)[0], cudnn_layer, x.astype(jnp.bfloat16)).lower()
    assert bool(jnp.all(jnp.isfinite(cudnn)))
    assert max_rel_err(cudnn, ref) <= 2 * max_rel_err(xla, ref) + 1e-3
    for ours, theirs, exact in zip(jax.tree.leaves(cudnn_grads), jax.tree.leaves(xla_grads),
                                   jax.tree.leaves(ref_grads), strict=True):
        assert bool(jnp.all(jnp.isfinite(ours)))
        assert max_rel_err(ours, exact) <= 2 * max_rel_err(theirs, exact) + 1e-3


def test_auto_kernel_is_cudnn_for_bf16_training_and_prefill_and_reference_for_decode():
    """"auto" lowers an uncached bf16 causal layer and a prefill into an empty cache to cuDNN, a float32 layer and
    a step that reads the cache to the reference."""
    x = jnp.ones((1, 64, 256), jnp.bfloat16)
    assert CUDNN in _lowered(lambda m, x: m(x)[0], _attention("auto", jnp.bfloat16), x).lower()
    assert CUDNN not in _lowered(lambda m, x: m(x)[0], _attention("auto", jnp.float32), x.astype(jnp.float32)).lower()
    layer = _attention("auto", jnp.bfloat16)
    cache = KVCache.init(1, 64, layer.num_kv_heads, layer.head_dim, dtype=jnp.bfloat16)
    step = lambda m, x, c: m(x, cache=c)[0]  # noqa: E731
    assert CUDNN in _lowered(step, layer, x[:, :32], cache).lower()
    _, cache = layer(x[:, :32], cache=cache)
    assert CUDNN not in _lowered(step, layer, x[:, 32:33], cache).lower()


# ----------------------------------------------------------------------------------------------------------
# Pallas kernels


def _gdn_inputs(rng, dtype, batch=2, seq=320, key_heads=2, heads=4, dim=128):
    """Qwen3-Next head sizes; q, k of norm ~1, log-decays in [-1, -0.01], beta in (0, 1)."""
    q, k = (rng.standard_normal((batch, seq, key_heads, dim)) / np.sqrt(dim) for _ in range(2))
    v = rng.standard_normal((batch, seq, heads, dim))
    g, beta = -rng.uniform(0.01, 1.0, (batch, seq, heads)), rng.uniform(0.0, 1.0, (batch, seq, heads))
    state = 0.5 * rng.standard_normal((batch, heads, dim, dim))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v, g, beta)) + (jnp.asarray(state, jnp.float32),)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_chunk_pallas_matches_xla_chunk(rng, dtype, tol):
    """The Triton scan (forward, and backward with the six gradients) vs the XLA chunked form, with resets."""
    q, k, v, g, beta, state = _gdn_inputs(rng, dtype)
    reset = jnp.zeros(q.shape[:2], bool).at[0, 100].set(True).at[1, 192].set(True)

    def form(pallas):
        def fn(q, k, v, g, beta, state):
            o, final = gd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, reset=reset, pallas=pallas)
            return jnp.concatenate([o.astype(jnp.float32).reshape(-1), final.reshape(-1)])
        return fn

    assert _has_triton_call(_lowered(jax.grad(lambda *a: jnp.sum(form(True)(*a))), q, k, v, g, beta, state))
    ours, ours_grads = _value_and_grads(form(True), q, k, v, g, beta, state)
    ref, ref_grads = _value_and_grads(form(False), q, k, v, g, beta, state)
    assert_close(ours, ref, tol, "chunk_pallas output and final state")
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state"), ours_grads, ref_grads, strict=True):
        assert_close(a, b, tol, f"chunk_pallas d/d{name}")


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_grouped_matmul_matches_float64(rng, dtype, tol):
    """Forward, d/dx and d/dw at MoE tiles (128 rows) vs float64, with experts that own no tile."""
    tile_rows, experts, k, n = 128, 6, 256, 384
    tile_expert = np.asarray([1, 1, 3, 4, 4, 4], np.int32)
    x = rng.standard_normal((tile_rows * tile_expert.size, k))
    w = rng.standard_normal((experts, k, n)) / np.sqrt(k)
    dy = rng.standard_normal((x.shape[0], n))
    out, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, jnp.asarray(tile_expert), tile_rows),
                       jnp.asarray(x, dtype), jnp.asarray(w, dtype))
    dx, dw = vjp(jnp.asarray(dy, dtype))
    ref_out, ref_dx, ref_dw = numpy_grouped_matmul(x, w, dy, tile_expert, tile_rows)
    for name, ours, ref in (("output", out, ref_out), ("d/dx", dx, ref_dx), ("d/dw", dw, ref_dw)):
        assert_close(ours, ref, tol, f"grouped matmul {name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_launch_at_the_default_matmul_precision(rng, dtype):
    """The tests here run at "highest" precision (conftest); training runs at the default, where float32 dots are
    TF32 and their tiles take more shared memory: every kernel, forward and backward, must still compile and give
    finite values there."""
    q, k, v, g, beta, state = _gdn_inputs(rng, dtype)
    x = jnp.asarray(rng.standard_normal((512, 256)), dtype)
    w = jnp.asarray(rng.standard_normal((4, 256, 384)) / 16, dtype)
    tile_expert = jnp.asarray([0, 1, 1, 3], jnp.int32)

    def gdn(q, k, v, g, beta, state):
        o, final = gd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, pallas=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    def gmm(x, w):
        return jnp.sum(grouped_matmul(x, w, tile_expert, 128).astype(jnp.float32))

    with jax.default_matmul_precision("default"):
        grads = jax.jit(jax.grad(gdn, argnums=range(6)))(q, k, v, g, beta, state)
        grads += jax.jit(jax.grad(gmm, argnums=(0, 1)))(x, w)
    for grad in grads:
        assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_grouped_pallas_moe_matches_xla_grouped(rng, dtype, tol):
    """A dropless MoE layer (2048 tokens, 16 experts, top-4) through the Triton grouped matmul vs XLA's grouped
    path: output and gradients (input and every weight)."""
    x = jnp.asarray(rng.standard_normal((4, 512, 256)), dtype)

    def layer(impl):
        return RoutedMoE(256, 128, 16, 4, impl=impl, dtype=dtype, key=jax.random.key(0))

    call = lambda m, x: m(x)[0]  # noqa: E731
    assert _has_triton_call(_lowered(call, layer("grouped_pallas"), x))
    ours, ours_grads = _value_and_grads(call, layer("grouped_pallas"), x)
    ref, ref_grads = _value_and_grads(call, layer("grouped"), x)
    assert_close(ours, ref, tol, "grouped_pallas output")
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(ref_grads), strict=True):
        assert_close(a, b, tol, "grouped_pallas gradient")


# ----------------------------------------------------------------------------------------------------------
# Whole models


TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_next"])
def test_model_logits_on_gpu_match_cpu(name):
    """Float32 logits of a model on the GPU vs the same model on the CPU (precision "highest" in the tests)."""
    if name == "qwen3":
        model = em.Qwen3ForCausalLM(em.Qwen3Config(**TINY), key=jax.random.key(0))
    else:
        cfg = em.Qwen3NextConfig(**dict(TINY, num_hidden_layers=4), num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=128, shared_expert_intermediate_size=128,
                                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128,
                                 linear_value_head_dim=128)
        model = em.Qwen3NextForCausalLM(cfg, key=jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 192), 0, TINY["vocab_size"], jnp.int32)
    forward = eqx.filter_jit(lambda m, ids: m(ids))
    gpu = forward(model, ids)
    cpu = jax.devices("cpu")[0]
    on_cpu = forward(jax.device_put(model, cpu), jax.device_put(ids, cpu))
    assert gpu.devices() != on_cpu.devices()
    assert_close(gpu, on_cpu, 1e-5, f"{name} logits, GPU vs CPU")


def test_bf16_train_step_learns():
    """A bf16 Qwen3 (cuDNN attention, chunked loss) fits one repeated batch: the loss falls by half in 30 steps."""
    model = em.Qwen3ForCausalLM(em.Qwen3Config(**TINY, dtype="bfloat16"), key=jax.random.key(0))
    optimizer = make_optimizer(3e-3, total_steps=30, warmup_steps=3)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    batch = {"input_ids": jax.random.randint(jax.random.key(2), (4, 256), 0, TINY["vocab_size"], jnp.int32)}

    @functools.partial(eqx.filter_jit, donate="all-except-first")
    def step(batch, model, opt_state):
        (loss, _), grads = eqx.filter_value_and_grad(lm_loss, has_aux=True)(model, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int32 step count
            updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    assert CUDNN in step.lower(batch, model, opt_state).as_text().lower()
    losses = []
    for _ in range(30):
        model, opt_state, loss = step(batch, model, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
