"""The GPU programs, lowered for CUDA on any machine. jax's cuDNN attention checks are told they run on an H100
with cuDNN 9.12 and `jax.default_backend()` says "gpu", so `"auto"` makes the choices it makes on a GPU; each
program is then lowered for CUDA (`lowering_platforms`), which needs no GPU. This catches, in CI, arguments
jax's cuDNN path refuses (it raises while tracing) and a kernel choice that leaves a workload on the reference
path. tests/test_gpu.py runs the same kernels on a real GPU."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_models as em
from eqx_models.config import Qwen3OmniAudioConfig, Qwen3OmniVisionConfig
from eqx_models.layers.attention import Attention
from eqx_models.layers.kv_cache import KVCache
from eqx_models.models.qwen3_omni import Qwen3OmniAudioEncoder, Qwen3OmniMoeVisionEncoder
from eqx_models.training import make_optimizer, make_train_step
from tests.reference import lowered_for_an_h100

fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo", reason="jax's cuDNN attention moved")
if not all(hasattr(fused, name) for name in ("check_cudnn_version", "check_compute_capability",
                                             "is_cuda_compute_capability_equal")):
    pytest.skip("jax's cuDNN attention checks moved", allow_module_level=True)

FORWARD, BACKWARD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
BIASED, BIASED_BACKWARD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"
TRITON = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, dtype="bfloat16")


@pytest.fixture(autouse=True)
def on_an_h100(monkeypatch):
    """What jax and `select_kernel` see on an H100. Traces cached before or during the test are dropped, so no
    program traced for the GPU is reused on the CPU. The KV cache's overflow check is a host callback, which
    lowers for CUDA only where there is a CUDA backend: equinox is told to return NaN instead."""
    jax.clear_caches()
    monkeypatch.setattr(eqx._errors, "EQX_ON_ERROR", "nan")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91200)
    monkeypatch.setattr(fused, "check_compute_capability", lambda c: tuple(map(int, c.split("."))) <= (9, 0))
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda c: c == "9.0")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    yield
    jax.clear_caches()


def lowered(fn, *args) -> str:
    """The StableHLO of `jax.jit(fn)(*args)` lowered for CUDA."""
    return lowered_for_an_h100(lambda: jax.jit(fn).trace(*args))


def custom_calls(text: str) -> list[str]:
    """The custom-call targets of a StableHLO text, in program order."""
    return re.findall(r"custom_call @([\w$.]+)", text) + re.findall(r'call_target_name = "([^"]+)"', text)


def lowered_train_step(model, batch) -> str:
    """The StableHLO of `make_train_step`'s AdamW step, lowered for CUDA."""
    optimizer = make_optimizer(3e-3, total_steps=10, warmup_steps=2)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optimizer)
    params, static = eqx.partition(model, eqx.is_array)
    def trace():
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int32 step count
            return jax.jit(lambda p, s, b: step(eqx.combine(p, static), s, b, jax.random.key(0))).trace(
                params, opt_state, batch)

    return lowered_for_an_h100(trace)


def train_step_calls(model, batch) -> set[str]:
    return set(custom_calls(lowered_train_step(model, batch)))


def ids(batch: int, seq: int) -> jax.Array:
    return jnp.zeros((batch, seq), jnp.int32)


def test_bf16_train_step_runs_cudnn_forward_and_backward_without_a_bias():
    """A batch without segment ids costs cuDNN no dense `[batch, 1, seq, seq]` bias."""
    model = em.Qwen3ForCausalLM(em.Qwen3Config(**TINY), key=jax.random.key(0))
    assert train_step_calls(model, {"input_ids": ids(4, 256)}) == {FORWARD, BACKWARD}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_every_matmul_of_a_bf16_train_step_is_bf16(tied):
    """bf16 compute means bf16 operands for every matmul, forward and backward, the LM head's included (float32
    logits from a tied head once made its two backward matmuls float32, 2x slower on tensor cores)."""
    model = em.Qwen3ForCausalLM(em.Qwen3Config(**TINY, tie_word_embeddings=tied), key=jax.random.key(0))
    text = lowered_train_step(model, {"input_ids": ids(4, 256)})
    operands = re.findall(r"stablehlo.dot_general .*: \((tensor<[^>]+>), (tensor<[^>]+>)\)", text)
    assert len(operands) >= 3 * 7 * TINY["num_hidden_layers"] // 2, len(operands)
    assert all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in operands), operands


def test_packed_batches_take_cudnn_with_a_bias_at_even_lengths_only():
    """Segment ids become a bias, whose gradient jax's cuDNN path computes only at even lengths."""
    model = em.Qwen3ForCausalLM(em.Qwen3Config(**TINY), key=jax.random.key(0))
    for seq, calls in ((256, {BIASED, BIASED_BACKWARD}), (255, set())):
        batch = {"input_ids": ids(4, seq), "segment_ids": jnp.ones((4, seq), jnp.int32)}
        assert train_step_calls(model, batch) == calls, seq


def test_sliding_window_layers_give_cudnn_their_window():
    """Qwen3's sliding layer (layer 1 of 2 here) runs cuDNN with its window of 48 (the query and the 47 keys
    before it), the causal layer with none (0)."""
    cfg = em.Qwen3Config(**TINY, use_sliding_window=True, sliding_window=48, max_window_layers=1)
    model = em.Qwen3ForCausalLM(cfg, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    text = lowered(lambda p, x: eqx.combine(p, static)(x), params, ids(2, 128))
    windows = re.findall(r"sliding_window_length\\22: (\d+)", text)
    assert sorted(set(windows)) == ["0", "48"], windows


def test_generate_prefills_with_cudnn_and_decodes_on_the_reference_path():
    """The prompt attends through cuDNN (forward only); the decode steps, which read the cache, do not."""
    model = em.Qwen3ForCausalLM(em.Qwen3Config(**TINY), key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    prompt = jnp.ones((2, 16), jnp.int32)
    calls = custom_calls(lowered(lambda p: em.generate(eqx.combine(p, static), prompt, 4), params))
    assert set(calls) == {BIASED} and len(calls) == TINY["num_hidden_layers"], calls


def test_prefill_takes_cudnn_and_a_decode_step_the_reference_path():
    """A prefill into an empty cache attends over its own keys; a step that reads the cache cannot use cuDNN."""
    layer = Attention(256, 8, 4, 64, dtype=jnp.bfloat16, key=jax.random.key(0))
    cache = KVCache.init(1, 64, 4, 64, dtype=jnp.bfloat16)
    x = jnp.ones((1, 32, 256), jnp.bfloat16)
    filled = cache.update(*(jnp.ones((1, 32, 4, 64), jnp.bfloat16),) * 2, jnp.ones((1, 32), jnp.int32))
    assert custom_calls(lowered(lambda m, x, c: m(x, cache=c)[0], layer, x, cache)) == [FORWARD]
    assert custom_calls(lowered(lambda m, x, c: m(x, cache=c)[0], layer, x[:, :1], filled)) == []


def test_qwen3_next_train_step_lowers_its_pallas_kernels_and_cudnn():
    """Qwen3-Next with the Pallas gated-delta scan and grouped-matmul MoE: Triton calls for both, cuDNN for the
    full-attention layers."""
    cfg = em.Qwen3NextConfig(
        **dict(TINY, num_hidden_layers=4), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        shared_expert_intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=128, linear_value_head_dim=128, gated_delta_impl="chunk_pallas",
        moe_impl="grouped_pallas",
    )
    calls = train_step_calls(em.Qwen3NextForCausalLM(cfg, key=jax.random.key(0)), {"input_ids": ids(2, 256)})
    assert {FORWARD, BACKWARD} <= calls and calls & set(TRITON), calls


def test_omni_encoders_attend_through_cudnn_without_a_mask():
    """The vision and audio encoders batch equal-length segments and attend within them with no mask at all."""
    vision = Qwen3OmniVisionConfig(
        depth=2, hidden_size=64, intermediate_size=96, num_heads=4, patch_size=4, temporal_patch_size=2,
        spatial_merge_size=2, out_hidden_size=40, num_position_embeddings=16, deepstack_visual_indexes=(0,),
        dtype="bfloat16",
    )
    encoder = Qwen3OmniMoeVisionEncoder(vision, key=jax.random.key(0))
    grid = ((1, 4, 4), (2, 4, 4))
    pixels = jnp.zeros((48, vision.patch_dim), jnp.float32)
    assert set(custom_calls(lowered(lambda m, x: m(x, grid), encoder, pixels))) == {FORWARD}
    audio = Qwen3OmniAudioConfig(
        num_mel_bins=20, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96, d_model=64,
        max_source_positions=64, n_window=50, n_window_infer=400, downsample_hidden_size=8, output_dim=40,
        dtype="bfloat16",
    )
    encoder = Qwen3OmniAudioEncoder(audio, key=jax.random.key(0))
    features = jnp.zeros((20, 430), jnp.float32)
    assert set(custom_calls(lowered(lambda m, x: m(x, (300, 130)), encoder, features))) == {FORWARD}
