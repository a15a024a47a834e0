"""`eqx_models.layers.attention` and the KV cache: parity with HF `Qwen3Attention` / `Qwen3NextAttention` /
`Qwen2Attention`, cache consistency, masks and kernel features (output bias, dropout included) vs float64 NumPy
attention, kernel selection, bad-input errors."""

import inspect
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen3Config, Qwen3NextConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

from eqx_models.layers.attention import (
    _check_attention_type,
    Attention,
    AttentionMask,
    cudnn_attention,
    dot_product_attention,
    merge_attention,
    select_kernel,
)
from eqx_models.layers.embeddings import PartialRotaryEmbedding, RotaryEmbedding
from eqx_models.layers.kv_cache import KVCache, dequantize_int8, quantize_int8
from tests.reference import assert_close, max_rel_err

E, H, D = 64, 4, 16


@eqx.filter_jit
def _apply(layer, x, positions=None, **kwargs):
    return layer(x, positions, **kwargs)


@eqx.filter_jit
def _project(layer, x, positions):
    q, k, v, _ = layer.project(x)
    if layer.rotary is not None:
        q, k = layer.rotary(q, positions), layer.rotary(k, positions)
    return q, k, v


_dpa = eqx.filter_jit(dot_product_attention)


def _x(rng, shape, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))


def _layer(getkey, num_kv_heads=2, head_dim=D, **kwargs):
    return Attention(E, H, num_kv_heads, head_dim, key=getkey(), **kwargs)


def _nudge(layer, rng, *, names=("query_norm", "key_norm", "value_norm")):
    """Norm scales + N(0, 0.1), so `w` vs `1 + w` and a skipped norm are visible."""
    for name in names:
        norm = getattr(layer, name)
        if norm is not None:
            noise = jnp.asarray(0.1 * rng.standard_normal(norm.scale.shape), jnp.float32)
            layer = eqx.tree_at(lambda m: getattr(m, name).scale, layer, norm.scale + noise)
    return layer


# ----------------------------------------------------------------------------------------------------------
# Float64 NumPy references


def np_attention(q, k, v, mask, scale, *, soft_cap=None, sinks=None, keep=None, dropout_rate=0.0):
    """Softmax attention in float64; `mask[b, t, s]` True = attend; query head h reads kv head h // groups.
    With `keep[b, h, t, s]` (dropout's kept probabilities), `probs` becomes `keep * probs / (1 - dropout_rate)`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    if soft_cap is not None:
        logits = np.tanh(logits / soft_cap) * soft_cap
    logits = np.where(np.asarray(mask)[:, None], logits, -np.inf)
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], logits.shape[:-1] + (1,))
        logits = np.concatenate([logits, sink], axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    if sinks is not None:
        probs = probs[..., :-1]
    if keep is not None:
        probs = np.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return np.einsum("bhts,bshd->bthd", probs, v)


def np_out(layer, attended):
    return np.einsum("bthd,hde->bte", attended, np.asarray(layer.out.kernel, np.float64))


def np_qkv(layer, x, positions=None):
    """q, k, v (float64) from our projections and rotary, before any attention."""
    return (np.asarray(a, np.float64) for a in _project(layer, x, positions))


def np_causal(batch, seq):
    i = np.arange(seq)
    return np.broadcast_to(i[None, :] <= i[:, None], (batch, seq, seq))


def np_banded(batch, seq, window):
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    return np.broadcast_to((j <= i) & (j > i - window), (batch, seq, seq))


def np_chunked(batch, seq, chunk):
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    return np.broadcast_to((j <= i) & (i // chunk == j // chunk), (batch, seq, seq))


def np_layer(layer, x, mask, positions=None, **kwargs):
    q, k, v = np_qkv(layer, x, positions)
    return np_out(layer, np_attention(q, k, v, mask, 1.0 / math.sqrt(layer.head_dim), **kwargs))


# ----------------------------------------------------------------------------------------------------------
# HF parity


def _hf_mask(seq, pads):
    """HF 4-D additive mask: causal, left padding `pads[b]` keys masked (finite min, as HF's sdpa/eager mask)."""
    i = np.arange(seq)
    allowed = (i[None, None, :] <= i[None, :, None]) & (i[None, None, :] >= np.asarray(pads)[:, None, None])
    return torch.from_numpy(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))[:, None]


def _from_hf(layer, hf):
    """HF Linear weight (out, in) -> our kernel (in, *out); biases (out,) -> (*out) for every HF projection that
    has one (ours must too); q/k norm weights as is, when HF has them."""
    weights = {n: p.detach().numpy() for n, p in hf.named_parameters()}
    projections = lambda m: (m.query, m.key, m.value, m.out)  # noqa: E731
    kernels = [jnp.asarray(weights[f"{n}_proj.weight"].T.reshape(p.kernel.shape))
               for n, p in zip("qkvo", projections(layer))]
    layer = eqx.tree_at(lambda m: tuple(p.kernel for p in projections(m)), layer, tuple(kernels))
    if "q_norm.weight" in weights:
        layer = eqx.tree_at(lambda m: (m.query_norm.scale, m.key_norm.scale), layer,
                            (jnp.asarray(weights["q_norm.weight"]), jnp.asarray(weights["k_norm.weight"])))
    for i, name in enumerate("qkvo"):
        if f"{name}_proj.bias" in weights:
            bias = jnp.asarray(weights[f"{name}_proj.bias"].reshape(projections(layer)[i].bias.shape))
            layer = eqx.tree_at(lambda m, i=i: projections(m)[i].bias, layer, bias)
    return layer


def _nudge_hf(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize(
    "num_kv_heads,bias", [(4, False), (2, False), (1, False), (2, True)], ids=["mha", "gqa2", "mqa", "gqa2_bias"]
)
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left_padded"])
@pytest.mark.parametrize("seq", [9, 600], ids=["short", "query_blocks"])
def test_matches_hf_qwen3_attention(getkey, rng, num_kv_heads, bias, padded, seq):
    """vs HF `Qwen3Attention` (eager): q/k RMSNorm, RoPE theta 1e6, head_dim 24 != hidden / heads,
    optionally `attention_bias` (random biases on q/k/v/o); at 600 tokens our reference kernel runs two query
    blocks."""
    torch.manual_seed(int(rng.integers(2**31)))
    cfg = Qwen3Config(
        vocab_size=256, hidden_size=E, intermediate_size=128, num_hidden_layers=1, num_attention_heads=H,
        num_key_value_heads=num_kv_heads, head_dim=24, rms_norm_eps=1e-6, attention_bias=bias,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="eager",
    )
    hf = Qwen3Attention(cfg, 0).eval()
    _nudge_hf(hf)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    batch = 2
    pads = np.array([3, 0] if padded else [0, 0])
    positions = np.maximum(np.arange(seq)[None] - pads[:, None], 0)
    x = rng.standard_normal((batch, seq, E)).astype(np.float32)
    cos, sin = Qwen3RotaryEmbedding(cfg)(torch.from_numpy(x), torch.from_numpy(positions))
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), (cos, sin), _hf_mask(seq, pads))[0].numpy()
    ours = Attention(E, H, num_kv_heads, 24, rope_theta=1e6, use_qk_norm=True, use_bias=bias, key=getkey())
    ours = _from_hf(ours, hf)
    segment_ids = jnp.asarray(np.arange(seq)[None] >= pads[:, None], jnp.int32)
    assert (AttentionMask.build(segment_ids).causal_blocks() is not None) == (seq >= 512)
    y, _ = _apply(ours, jnp.asarray(x), jnp.asarray(positions, jnp.int32), segment_ids=segment_ids)
    real = np.arange(seq)[None] >= pads[:, None]
    assert np.all(np.isfinite(np.asarray(y))), "fully masked padding rows must stay finite"
    what = f"Qwen3Attention kv_heads={num_kv_heads} bias={bias} padded={padded} seq={seq}"
    assert_close(np.asarray(y)[real], ref[real], 1e-5, what)


def test_matches_hf_qwen3_next_attention(getkey, rng):
    """vs HF `Qwen3NextAttention`: per-head [query | gate] q_proj, zero-centred q/k norms, partial RoPE 0.25."""
    torch.manual_seed(int(rng.integers(2**31)))
    cfg = Qwen3NextConfig(
        vocab_size=256, hidden_size=E, intermediate_size=128, num_hidden_layers=4, num_attention_heads=H,
        num_key_value_heads=2, head_dim=D,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
        experts_implementation="eager", attn_implementation="eager",
    )
    hf = Qwen3NextAttention(cfg, 3).eval()
    _nudge_hf(hf)
    batch, seq = 2, 10
    x = rng.standard_normal((batch, seq, E)).astype(np.float32)
    positions = np.broadcast_to(np.arange(seq), (batch, seq)).copy()
    cos, sin = Qwen3NextRotaryEmbedding(cfg)(torch.from_numpy(x), torch.from_numpy(positions))
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), (cos, sin), _hf_mask(seq, [0, 0]))[0].numpy()
    ours = Attention(
        E, H, 2, D, rotary=PartialRotaryEmbedding(D, 0.25, max_timescale=1e7), use_qk_norm=True,
        qk_norm_scale_offset=1.0, output_gate=True, key=getkey(),
    )
    assert ours.query.kernel.shape == (E, H, 2 * D)
    ours = _from_hf(ours, hf)
    y, _ = _apply(ours, jnp.asarray(x))
    assert_close(y, ref, 1e-5, "Qwen3NextAttention (gated, zero-centred norms, partial RoPE)")


def test_qkv_bias_without_out_bias_matches_hf_qwen2_attention(getkey, rng):
    """`use_bias=True, use_out_bias=False` is HF `Qwen2Attention` (biased q/k/v, unbiased o_proj): random q/k/v
    biases N(0, 0.5^2), row 0 left-padded by 3, vs HF eager, 1e-5."""
    torch.manual_seed(int(rng.integers(2**31)))
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=E, intermediate_size=128, num_hidden_layers=1, num_attention_heads=H,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        attn_implementation="eager",
    )
    hf = Qwen2Attention(cfg, 0).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    batch, seq, pads = 2, 9, np.array([3, 0])
    positions = np.maximum(np.arange(seq)[None] - pads[:, None], 0)
    x = rng.standard_normal((batch, seq, E)).astype(np.float32)
    cos, sin = Qwen2RotaryEmbedding(cfg)(torch.from_numpy(x), torch.from_numpy(positions))
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), (cos, sin), _hf_mask(seq, pads))[0].numpy()
    ours = Attention(E, H, 2, D, rope_theta=1e6, use_bias=True, use_out_bias=False, key=getkey())
    assert ours.out.bias is None and all(p.bias is not None for p in (ours.query, ours.key, ours.value))
    ours = _from_hf(ours, hf)
    segment_ids = jnp.asarray(np.arange(seq)[None] >= pads[:, None], jnp.int32)
    y, _ = _apply(ours, jnp.asarray(x), jnp.asarray(positions, jnp.int32), segment_ids=segment_ids)
    real = np.arange(seq)[None] >= pads[:, None]
    assert_close(np.asarray(y)[real], ref[real], 1e-5, "Qwen2Attention (q/k/v bias, no o_proj bias)")


def test_out_bias_without_qkv_bias(getkey, rng):
    """`use_bias=False, use_out_bias=True`: only the output projection has a bias (random N(0, 0.5^2)), added
    after the output kernel, vs float64 NumPy, 1e-5."""
    layer = _layer(getkey, use_out_bias=True)
    assert all(p.bias is None for p in (layer.query, layer.key, layer.value)) and layer.out.bias.shape == (E,)
    bias = 0.5 * rng.standard_normal(E)
    layer = eqx.tree_at(lambda m: m.out.bias, layer, jnp.asarray(bias, jnp.float32))
    x = _x(rng, (2, 9, E))
    y, _ = _apply(layer, x)
    assert_close(y, np_layer(layer, x, np_causal(2, 9)) + bias, 1e-5, "output projection bias")


# ----------------------------------------------------------------------------------------------------------
# KV cache consistency


def _qwen3_like(getkey, rng, **kwargs):
    return _nudge(_layer(getkey, use_qk_norm=True, rope_theta=1e6, **kwargs), rng)


def _prefill_decode(layer, x, prefill, cache):
    """Prefill `x[:, :prefill]`, then one token at a time; the outputs concatenated and the final cache."""
    y, cache = _apply(layer, x[:, :prefill], cache=cache)
    outs = [y]
    for t in range(prefill, x.shape[1]):
        y, cache = _apply(layer, x[:, t : t + 1], cache=cache)
        outs.append(y)
    return jnp.concatenate(outs, axis=1), cache


def test_prefill_then_decode_matches_full_forward(getkey, rng):
    """Prefill 7 + 5 one-token decode steps under filter_jit == one full causal forward."""
    layer = _qwen3_like(getkey, rng)
    x = _x(rng, (2, 12, E))
    full, _ = _apply(layer, x)
    y, cache = _prefill_decode(layer, x, 7, KVCache.init(2, 16, 2, D))
    assert int(cache.end_index) == 12
    assert_close(y, full, 1e-5, "prefill + decode (jit) vs full forward")


def test_chunked_prefill_matches_one_shot(getkey, rng):
    """Prefill in chunks of 5 + 3 + 4 tokens == the same 12 tokens in one call (Qwen3-Next layout: output gate,
    zero-centred q/k norms, partial RoPE)."""
    layer = _nudge(_layer(getkey, rotary=PartialRotaryEmbedding(D, 0.25, max_timescale=1e7), use_qk_norm=True,
                          qk_norm_scale_offset=1.0, output_gate=True), rng)
    x = _x(rng, (2, 12, E))
    full, _ = _apply(layer, x)
    cache, outs, start = KVCache.init(2, 16, 2, D), [], 0
    for size in (5, 3, 4):
        y, cache = _apply(layer, x[:, start : start + size], cache=cache)
        outs.append(y)
        start += size
    assert_close(jnp.concatenate(outs, axis=1), full, 1e-5, "chunked prefill vs one shot")


def test_left_padded_batch_matches_each_prompt_alone(getkey, rng):
    """Prompts of 5 and 7 tokens, left-padded into one batch (segment 0 on pads, positions from 0 at the first
    real token), then 3 decode steps == each prompt prefilled and decoded alone at batch 1."""
    layer = _qwen3_like(getkey, rng)
    lengths, seq, steps = [5, 7], 7, 3
    pads = np.array([seq - n for n in lengths])
    prompts = [_x(rng, (1, n, E)) for n in lengths]
    decode = _x(rng, (2, steps, E))
    x = jnp.concatenate([jnp.pad(p, ((0, 0), (seq - p.shape[1], 0), (0, 0))) for p in prompts], axis=0)
    positions = jnp.asarray(np.arange(seq)[None] - pads[:, None], jnp.int32)
    segment_ids = jnp.asarray(np.arange(seq)[None] >= pads[:, None], jnp.int32)
    y, cache = _apply(layer, x, positions, segment_ids=segment_ids, cache=KVCache.init(2, 16, 2, D))
    batched = [y]
    for t in range(steps):
        pos = jnp.asarray(seq + t - pads[:, None], jnp.int32)
        y, cache = _apply(layer, decode[:, t : t + 1], pos, cache=cache)
        batched.append(y)
    batched = jnp.concatenate(batched, axis=1)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(lengths) + steps)
    for b, prompt in enumerate(prompts):
        alone, _ = _prefill_decode(layer, jnp.concatenate([prompt, decode[b : b + 1]], axis=1), lengths[b],
                                   KVCache.init(1, 16, 2, D))
        assert_close(batched[b : b + 1, pads[b] :], alone, 1e-5, f"left-padded row {b} vs alone")


def test_packed_sequences_match_separate_runs(getkey, rng):
    """Two sequences packed in one row (segment ids 1/2, positions restarting at 0) == run separately."""
    layer = _qwen3_like(getkey, rng)
    a, b = _x(rng, (1, 5, E)), _x(rng, (1, 7, E))
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
    packed, _ = _apply(layer, jnp.concatenate([a, b], axis=1), positions, segment_ids=segment_ids)
    assert_close(packed[:, :5], _apply(layer, a)[0], 1e-5, "packed sequence 1")
    assert_close(packed[:, 5:], _apply(layer, b)[0], 1e-5, "packed sequence 2")


# ----------------------------------------------------------------------------------------------------------
# Sliding window and chunked attention vs explicit masks


@pytest.mark.parametrize("cached", [False, True], ids=["forward", "prefill_decode"])
@pytest.mark.parametrize(
    "kwargs,np_mask",
    [(dict(attention_type="local_sliding", sliding_window=3), lambda b, s: np_banded(b, s, 3)),
     (dict(attention_type="chunk", chunk_size=4), lambda b, s: np_chunked(b, s, 4))],
    ids=["sliding3", "chunk4"],
)
def test_local_masks_match_explicit_mask(getkey, rng, kwargs, np_mask, cached):
    """Sliding window W=3 / chunk C=4 vs float64 NumPy attention with the band / block mask written out;
    through the cache as prefill 7 + 5 decode steps (window and chunks smaller than the sequence)."""
    layer = _layer(getkey, **kwargs)
    x = _x(rng, (2, 12, E))
    ref = np_layer(layer, x, np_mask(2, 12))
    if cached:
        y, _ = _prefill_decode(layer, x, 7, KVCache.init(2, 16, 2, D))
    else:
        y, _ = _apply(layer, x)
    assert_close(y, ref, 1e-5, f"{kwargs['attention_type']} cached={cached}")
    assert max_rel_err(y, np_layer(layer, x, np_causal(2, 12))) > 1e-2, "the mask changes nothing here"


@pytest.mark.parametrize(
    "kwargs", [dict(attention_type="local_sliding", sliding_window=3), dict(attention_type="chunk", chunk_size=4)],
    ids=["sliding3", "chunk4"],
)
def test_local_masks_left_padded_match_alone(getkey, rng, kwargs):
    """A prompt left-padded by 2 (segment 0 on pads, positions from 0) == the prompt alone, for sliding window
    and chunk attention: windows and chunks follow the sequence, not the padded slot index (HF's chunked mask
    subtracts the left padding: `(kv_idx - left_pad) // C == (q_idx - left_pad) // C`)."""
    layer = _layer(getkey, **kwargs)
    prompt = _x(rng, (1, 7, E))
    alone, _ = _apply(layer, prompt)
    x = jnp.pad(prompt, ((0, 0), (2, 0), (0, 0)))
    segment_ids = jnp.asarray([[0, 0] + [1] * 7], jnp.int32)
    positions = jnp.asarray([np.arange(9) - 2], jnp.int32)
    padded, _ = _apply(layer, x, positions, segment_ids=segment_ids)
    assert_close(padded[:, 2:], alone, 1e-5, f"{kwargs['attention_type']} left-padded vs alone")


# ----------------------------------------------------------------------------------------------------------
# int8 KV cache


def test_int8_roundtrip_error_bounded(rng):
    """quantize/dequantize: |x - deq| <= scale / 127 per element, int8 storage, zero vectors stay zero."""
    x = rng.standard_normal((2, 5, 3, 16)) * np.exp(rng.uniform(-4, 4, (2, 5, 3, 1)))
    x[0, 0, 0] = 0.0
    q, scale = quantize_int8(jnp.asarray(x, jnp.float32))
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3, 1)
    deq = np.asarray(dequantize_int8(q, scale, jnp.float32), np.float64)
    bound = np.asarray(scale, np.float64) / 127.0
    assert np.all(np.abs(deq - x) <= bound * (1 + 1e-6)), f"worst |err|/bound {np.max(np.abs(deq - x) / bound):.3f}"
    assert np.all(deq[0, 0, 0] == 0.0)


def test_int8_cache_decode_close_to_float_cache(getkey, rng):
    """Prefill 7 + 5 decode steps with the int8 cache vs the float32 cache.

    Keys/values carry an error <= 0.5/127 (~4e-3) of their per-(token, head) max; the output error measured over
    30 seeds is 3.8e-3 to 8.4e-3 relative, so 2e-2 leaves margin for the random inputs while a wrong scale or a
    missed dequantization (O(1) errors) still fails.
    """
    layer = _qwen3_like(getkey, rng)
    x = _x(rng, (2, 12, E))
    outs = {}
    for quantized in (False, True):
        outs[quantized], cache = _prefill_decode(layer, x, 7, KVCache.init(2, 16, 2, D, quantized=quantized))
        assert cache.quantized == quantized and (cache.key.dtype == jnp.int8) == quantized
    assert_close(outs[True], outs[False], 2e-2, "int8 cache vs float cache")


# ----------------------------------------------------------------------------------------------------------
# Kernel features vs float64 NumPy


def test_logits_soft_cap(getkey, rng):
    """`tanh(logits / cap) * cap` before masking vs float64 NumPy."""
    layer = _layer(getkey, logits_soft_cap=0.5)
    x = _x(rng, (2, 9, E))
    y, _ = _apply(layer, x)
    assert_close(y, np_layer(layer, x, np_causal(2, 9), soft_cap=0.5), 1e-5, "soft cap 0.5")
    assert max_rel_err(y, np_layer(layer, x, np_causal(2, 9))) > 1e-2


def test_attention_sinks(getkey, rng):
    """Per-head sink logits (nudged N(0, 1), GQA 4/2) join the softmax denominator vs float64 NumPy."""
    layer = _layer(getkey, attention_sinks=True)
    sinks = rng.standard_normal(H).astype(np.float32)
    layer = eqx.tree_at(lambda m: m.sinks, layer, jnp.asarray(sinks))
    x = _x(rng, (2, 9, E))
    y, _ = _apply(layer, x)
    assert_close(y, np_layer(layer, x, np_causal(2, 9), sinks=sinks), 1e-5, "attention sinks")
    assert max_rel_err(y, np_layer(layer, x, np_causal(2, 9), sinks=sinks[::-1].copy())) > 1e-3


def test_query_pre_attn_scalar(getkey, rng):
    """q is multiplied by the scalar and the softmax scale is 1 (no head_dim**-0.5) vs float64 NumPy."""
    layer = _layer(getkey, query_pre_attn_scalar=0.4)
    x = _x(rng, (2, 9, E))
    q, k, v = np_qkv(layer, x)
    y, _ = _apply(layer, x)
    assert_close(y, np_out(layer, np_attention(q * 0.4, k, v, np_causal(2, 9), 1.0)), 1e-5, "query_pre_attn_scalar")


def test_float32_qk_product(rng):
    """bf16 q/k: with float32_qk_product the logits (row max) match float64 to fp32 precision; without it they
    are rounded to bf16."""
    q = jnp.asarray(rng.standard_normal((2, 6, 4, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 6, 2, 16)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, 6, 2, 16)), jnp.bfloat16)
    mask = jnp.asarray(np_causal(2, 6))
    q64, k64 = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    logits = np.einsum("bthd,bshd->bths", q64, k64) * 0.25
    ref_max = np.where(np.asarray(mask)[:, :, None], logits, -np.inf).max(-1)
    _, (row_max, _) = _dpa(q, k, v, mask, scale=0.25, float32_qk_product=True)
    assert row_max.dtype == jnp.float32
    assert_close(row_max, ref_max, 1e-6, "float32_qk_product logits")
    _, (row_max_bf16, _) = _dpa(q, k, v, mask, scale=0.25)
    assert max_rel_err(row_max_bf16, ref_max) > 1e-4, "bf16 product was not rounded: the test shows nothing"
    layer = Attention(E, H, 2, D, float32_qk_product=True, key=jax.random.key(0))
    x = _x(rng, (2, 6, E))
    assert_close(_apply(layer, x)[0], np_layer(layer, x, np_causal(2, 6)), 1e-5, "float32_qk_product layer (fp32)")


def test_full_attention_is_not_causal(getkey, rng):
    """attention_type="full": every query sees every key vs float64 NumPy with an all-True mask."""
    layer = _layer(getkey, attention_type="full")
    x = _x(rng, (2, 9, E))
    y, _ = _apply(layer, x)
    assert_close(y, np_layer(layer, x, np.ones((2, 9, 9), bool)), 1e-5, "full attention")


def _np_blocks(flags):
    ids, run, prev = [], 0, False
    for f in flags:
        run += bool(f and not prev)
        ids.append(run if f else -1)
        prev = f
    return np.array(ids)


def test_bidirectional_mask_blocks(getkey, rng):
    """Runs of True tokens (image blocks) see each other both ways, causal elsewhere, vs float64 NumPy."""
    layer = _layer(getkey)
    flags = np.array([[0, 1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]], bool)
    seq = flags.shape[1]
    x = _x(rng, (2, seq, E))
    mask = np.array(np_causal(2, seq))
    for b in range(2):
        blocks = _np_blocks(flags[b])
        mask[b] |= (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
    y, _ = _apply(layer, x, bidirectional_mask=jnp.asarray(flags))
    assert_close(y, np_layer(layer, x, mask), 1e-5, "bidirectional blocks")
    assert max_rel_err(y, np_layer(layer, x, np_causal(2, seq))) > 1e-3


def test_shared_kv_projections(getkey, rng):
    """share_kv_projections: no value weights; values are the key projection (before RoPE) vs float64 NumPy."""
    layer = _layer(getkey, share_kv_projections=True)
    assert layer.value is None
    x = _x(rng, (2, 9, E))
    q, k, raw_k = np_qkv(layer, x)
    np.testing.assert_array_equal(raw_k, np.asarray(eqx.filter_jit(layer.key)(x), np.float64))
    y, _ = _apply(layer, x)
    assert_close(y, np_out(layer, np_attention(q, k, raw_k, np_causal(2, 9), 0.25)), 1e-5, "shared kv")


def test_fused_qkv_equals_separate_projections(getkey, rng):
    """fused_qkv with kernel = concat(query, key, value kernels) on the heads axis == separate projections."""
    separate = _qwen3_like(getkey, rng)
    fused = _layer(getkey, fused_qkv=True, use_qk_norm=True, rope_theta=1e6)
    kernel = jnp.concatenate([separate.query.kernel, separate.key.kernel, separate.value.kernel], axis=1)
    fused = eqx.tree_at(
        lambda m: (m.qkv.kernel, m.out.kernel, m.query_norm.scale, m.key_norm.scale),
        fused, (kernel, separate.out.kernel, separate.query_norm.scale, separate.key_norm.scale),
    )
    x = _x(rng, (2, 9, E))
    assert_close(_apply(fused, x)[0], _apply(separate, x)[0], 1e-6, "fused vs separate qkv")


def test_value_norm(getkey, rng):
    """use_v_norm: RMSNorm (scale 1 + N(0, 0.1)) over head_dim of v vs float64 NumPy."""
    layer = _nudge(_layer(getkey, use_v_norm=True), rng)
    x = _x(rng, (2, 9, E))
    q, k, v = np_qkv(layer, x)
    w = np.asarray(layer.value_norm.scale, np.float64)
    v = v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * w
    y, _ = _apply(layer, x)
    assert_close(y, np_out(layer, np_attention(q, k, v, np_causal(2, 9), 0.25)), 1e-5, "v norm")


def test_l2_qk_norm_after_rope(getkey, rng):
    """use_l2_qk_norm: scale-less `x * rsqrt(mean(x^2) + 1e-6)` of q and k after RoPE vs float64 NumPy."""
    layer = _layer(getkey, use_l2_qk_norm=True)
    x = _x(rng, (2, 9, E))
    q, k, v = np_qkv(layer, x)
    l2 = lambda a: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
    y, _ = _apply(layer, x)
    assert_close(y, np_out(layer, np_attention(l2(q), l2(k), v, np_causal(2, 9), 0.25)), 1e-5, "L2 qk norm")


def test_nope_with_temperature_tuning(getkey, rng):
    """rotary=None (NoPE): no rotation; q *= log(floor((pos + 1) / 4) + 1) * 0.5 + 1 vs float64 NumPy."""
    layer = _layer(getkey, rotary=None, temperature_tuning=True, temperature_tuning_scale=0.5,
                   temperature_tuning_floor_scale=4.0)
    batch, seq = 2, 11
    x = _x(rng, (batch, seq, E))
    positions = np.stack([np.arange(seq), np.arange(seq) + 5])
    q, k, v = np_qkv(layer, x)
    scales = np.log(np.floor((positions + 1.0) / 4.0) + 1.0) * 0.5 + 1.0
    y, _ = _apply(layer, x, jnp.asarray(positions, jnp.int32))
    ref = np_out(layer, np_attention(q * scales[:, :, None, None], k, v, np_causal(batch, seq), 0.25))
    assert_close(y, ref, 1e-5, "NoPE + temperature tuning")
    assert max_rel_err(y, np_out(layer, np_attention(q, k, v, np_causal(batch, seq), 0.25))) > 1e-2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_single_query_form_equals_the_matmul_form(rng, dtype):
    """One query per row (decode steps) takes the multiply-and-reduce form: its output and softmax statistics
    equal the batched-matmul form's for the same query (the first row of a two-query call), with a partly masked
    cache, grouped heads, soft cap and sinks; exactly in bf16 (both round logits and output alike), 1e-6 in fp32."""
    q = _x(rng, (2, 1, 4, 16)).astype(dtype)
    k, v = _x(rng, (2, 9, 2, 16)).astype(dtype), _x(rng, (2, 9, 2, 16)).astype(dtype)
    mask = jnp.asarray(rng.random((2, 1, 9)) > 0.3).at[:, :, 0].set(True)
    kwargs = dict(scale=0.25, logits_soft_cap=5.0, sinks=jnp.asarray([0.1, -0.2, 0.3, 0.0]))
    one, (max1, sum1) = _dpa(q, k, v, mask, **kwargs)
    two, (max2, sum2) = _dpa(jnp.concatenate([q, q], 1), k, v, jnp.concatenate([mask, mask], 1), **kwargs)
    tol = 1e-6 if dtype == jnp.float32 else 0.0
    for a, b, what in ((one, two[:, :1], "output"), (max1, max2[:, :1], "row max"), (sum1, sum2[:, :1], "row sum")):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol,
                                   err_msg=what)


# ----------------------------------------------------------------------------------------------------------
# merge_attention


@pytest.mark.parametrize("with_sinks", [False, True], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "masked_keys"])
def test_merge_attention_over_key_halves(rng, masked, with_sinks):
    """Attention over two disjoint key halves merged by their (max, sum) == attention over all keys. With masking
    (causal + random holes), early queries see no key of the second half. Sinks go to the first half only."""
    batch, q_len, kv_len = 2, 8, 12
    q = _x(rng, (batch, q_len, 4, 16))
    k, v = _x(rng, (batch, kv_len, 2, 16)), _x(rng, (batch, kv_len, 2, 16))
    if masked:
        banded = np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + 4
        mask = banded[None] & (rng.random((batch, q_len, kv_len)) > 0.3)
        mask[:, :, 0] = True
    else:
        mask = np.ones((batch, q_len, kv_len), bool)
    mask = jnp.asarray(mask)
    sinks = jnp.asarray(rng.standard_normal(4), jnp.float32) if with_sinks else None
    full, (full_max, full_sum) = _dpa(q, k, v, mask, scale=0.25, sinks=sinks)
    halves = [_dpa(q, k[:, s], v[:, s], mask[:, :, s], scale=0.25, sinks=sinks if s.start == 0 else None)
              for s in (slice(0, 6), slice(6, None))]
    merged, (merged_max, merged_sum) = eqx.filter_jit(merge_attention)([o for o, _ in halves], [s for _, s in halves])
    assert_close(merged, full, 1e-6, f"merged halves masked={masked}")
    assert_close(merged_max, full_max, 1e-6, "merged row max")
    assert_close(merged_sum, full_sum, 1e-6, "merged row sum")


# ----------------------------------------------------------------------------------------------------------
# Query blocks of causal attention


def _long_mask(attention_type="global", seq=600, **kwargs):
    """Two rows: one left-padded by 37, one packing three segments (the last 20 tokens padding)."""
    segment_ids = np.ones((2, seq), np.int32)
    segment_ids[0, :37] = 0
    segment_ids[1, 250:410], segment_ids[1, 410:], segment_ids[1, -20:] = 2, 3, 0
    return AttentionMask.build(jnp.asarray(segment_ids), attention_type=attention_type, **kwargs), segment_ids


_LONG_MASKS = {
    "global": dict(),
    "sliding200": dict(attention_type="local_sliding", sliding_window=200),
    "chunk128": dict(attention_type="chunk", chunk_size=128),
}


@pytest.mark.parametrize("seq", [600, 1100, 4700])
@pytest.mark.parametrize("kwargs", _LONG_MASKS.values(), ids=_LONG_MASKS.keys())
def test_causal_blocks_skip_only_invisible_keys(kwargs, seq):
    """The query blocks partition the queries into 2-16 blocks of at least 256 each, and every key a block
    skips is masked for all its queries: with left padding, packed segments, a window or chunks counted from the
    first real token. `dense(queries, keys)` is that block of the dense mask."""
    mask, _ = _long_mask(seq=seq, **kwargs)
    dense = np.asarray(mask.dense())
    blocks = mask.causal_blocks()
    assert 2 <= len(blocks) <= 16 and min(q.stop - q.start for q, _ in blocks) >= 256
    assert [q.start for q, _ in blocks] == [0] + [q.stop for q, _ in blocks[:-1]] and blocks[-1][0].stop == seq
    for queries, keys in blocks:
        rows = dense[:, queries]
        assert not rows[:, :, : keys.start].any() and not rows[:, :, keys.stop :].any()
        np.testing.assert_array_equal(np.asarray(mask.dense(queries, keys)), rows[:, :, keys])
    if kwargs:
        assert blocks[-1][1].start > 0, "a window or chunks let the last block skip the first keys"


def test_causal_blocks_only_where_keys_can_be_skipped():
    """No blocks below 512 queries, over a cache's keys, for full attention or bidirectional blocks; at most 16."""
    ones = lambda n: jnp.ones((1, n), jnp.int32)  # noqa: E731
    assert AttentionMask.build(ones(511)).causal_blocks() is None
    assert len(AttentionMask.build(ones(512)).causal_blocks()) == 2
    assert len(AttentionMask.build(ones(9000)).causal_blocks()) == 16
    assert AttentionMask.build(ones(600), attention_type="full").causal_blocks() is None
    images = jnp.zeros((1, 600), bool).at[:, 100:300].set(True)
    assert AttentionMask.build(ones(600), bidirectional_mask=images).causal_blocks() is None
    cache = KVCache.init(1, 600, 2, D).update(jnp.zeros((1, 600, 2, D)), jnp.zeros((1, 600, 2, D)), ones(600))
    assert AttentionMask.build(ones(600), cache=cache).causal_blocks() is None


@pytest.mark.parametrize("kwargs", _LONG_MASKS.values(), ids=_LONG_MASKS.keys())
def test_blocked_attention_matches_float64(rng, kwargs):
    """`dot_product_attention` on a 600-token `AttentionMask` (two query blocks) vs float64 NumPy attention on
    the dense mask, 1e-5, on every real token, with soft cap and sinks; the softmax statistics and the gradients
    of q, k, v equal the unblocked call on the dense mask (1e-5); padding rows stay finite."""
    mask, segment_ids = _long_mask(**kwargs)
    q, k, v = _x(rng, (2, 600, 4, 8)), _x(rng, (2, 600, 2, 8)), _x(rng, (2, 600, 2, 8))
    options = dict(scale=0.35, logits_soft_cap=4.0, sinks=jnp.asarray([0.2, -0.1, 0.0, 0.4]))
    out, stats = _dpa(q, k, v, mask, **options)
    real = segment_ids != 0
    ref = np_attention(q, k, v, np.asarray(mask.dense()), 0.35, soft_cap=4.0, sinks=options["sinks"])
    assert_close(np.asarray(out)[real], ref[real], 1e-5, f"blocked {kwargs} vs float64")
    assert np.isfinite(np.asarray(out)).all()
    _, dense_stats = _dpa(q, k, v, mask.dense(), **options)
    for ours, unblocked, what in zip(stats, dense_stats, ("row max", "row sum")):
        assert_close(np.asarray(ours)[real], np.asarray(unblocked)[real], 1e-5, what)
    cotangent = jnp.asarray(rng.standard_normal(out.shape) * real[:, :, None, None], jnp.float32)
    grads = [
        eqx.filter_jit(jax.grad(lambda q, k, v, m: jnp.vdot(_dpa(q, k, v, m, **options)[0], cotangent), (0, 1, 2)))(
            q, k, v, m)
        for m in (mask, mask.dense())
    ]
    for ours, unblocked, name in zip(*grads, "qkv"):
        assert_close(ours, unblocked, 1e-5, f"d{name} blocked vs unblocked")


def test_layer_attends_in_query_blocks(getkey, rng):
    """The `Attention` layer at 520 tokens runs two query blocks (its score matmuls are [groups * 260, 260] and
    [groups * 260, 520]) and equals float64 NumPy attention of its own projections."""
    layer = _layer(getkey)
    x = _x(rng, (1, 520, E))
    jaxpr = jax.make_jaxpr(lambda x: layer(x)[0])(x)
    widths = {eqn.outvars[0].aval.shape[-2:] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "dot_general"}
    assert {(2 * 260, 260), (2 * 260, 520)} <= widths and (2 * 520, 520) not in widths
    y, _ = _apply(layer, x)
    assert_close(y, np_layer(layer, x, np_causal(1, 520)), 1e-5, "520-token layer vs float64")


# ----------------------------------------------------------------------------------------------------------
# Kernel selection


def test_select_kernel():
    """auto -> dot_product on CPU; cudnn on GPU for bf16 causal uncached; dot_product for any unsupported feature;
    an explicit cudnn request on CPU names the backend."""
    causal = AttentionMask.build(jnp.ones((1, 4), jnp.int32))
    common = dict(dtype=jnp.bfloat16, head_dim=64, mask=causal)
    assert jax.default_backend() == "cpu"
    assert select_kernel("auto", **common) == "dot_product"
    assert select_kernel("auto", **common, backend="gpu") == "cudnn"
    blocks = AttentionMask.build(jnp.ones((1, 4), jnp.int32), bidirectional_mask=jnp.asarray([[0, 1, 1, 0]], bool))
    chunk = AttentionMask.build(jnp.ones((1, 4), jnp.int32), attention_type="chunk", chunk_size=2)
    new_keys = jnp.zeros((1, 4, 2, 64))
    cache = KVCache.init(1, 8, 2, 64).update(new_keys, new_keys, jnp.ones((1, 4), jnp.int32))
    cached = AttentionMask.build(jnp.ones((1, 4), jnp.int32), cache=cache)
    unsupported = [
        dict(common, mask=cached), dict(common, logits_soft_cap=30.0), dict(common, sinks=True),
        dict(common, dropout=True), dict(common, mask=blocks), dict(common, dtype=jnp.float32),
        dict(common, mask=chunk), dict(common, float32_qk_product=True), dict(common, head_dim=20),
        dict(common, head_dim=512),
    ]
    odd = AttentionMask.build(jnp.ones((1, 5), jnp.int32))  # cuDNN's bias gradient needs even lengths
    unsupported.append(dict(common, mask=odd))
    for kwargs in unsupported:
        assert select_kernel("auto", **kwargs, backend="gpu") == "dot_product", kwargs
    unsegmented_odd = AttentionMask.build(jnp.ones((1, 5), jnp.int32), segmented=False)
    assert select_kernel("auto", **dict(common, mask=unsegmented_odd), backend="gpu") == "cudnn"
    assert select_kernel("dot_product", **common, backend="gpu") == "dot_product"
    with pytest.raises(ValueError, match="needs a GPU backend, this one is 'cpu'"):
        select_kernel("cudnn", **common)
    with pytest.raises(ValueError, match="cannot run this configuration"):
        select_kernel("cudnn", **dict(common, mask=cached), backend="gpu")


@pytest.mark.parametrize("segmented", [True, False], ids=["segmented", "unsegmented"])
@pytest.mark.parametrize(
    "attention_type,window", [("global", None), ("local_sliding", 3), ("full", None)],
    ids=["global", "sliding3", "full"],
)
def test_cudnn_mask_mapping_matches_reference(monkeypatch, rng, attention_type, window, segmented):
    """`cudnn_attention` (is_causal / local window / segment mask), run through XLA's implementation of
    `jax.nn.dot_product_attention` on CPU, == the reference kernel on the dense mask; packed + left-padded rows.
    Without segment ids no mask reaches the kernel (cuDNN would read it as a dense bias)."""
    real, masks = jax.nn.dot_product_attention, []

    def xla(*args, implementation=None, mask=None, **kwargs):
        masks.append(mask)
        return real(*args, mask=mask, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla)
    segment_ids = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    if not segmented:
        segment_ids = jnp.ones_like(segment_ids)
    mask = AttentionMask.build(segment_ids, attention_type=attention_type, sliding_window=window, segmented=segmented)
    q = _x(rng, (2, 9, 4, 16))
    k, v = _x(rng, (2, 9, 2, 16)), _x(rng, (2, 9, 2, 16))
    ours = eqx.filter_jit(cudnn_attention)(q, k, v, mask, scale=0.25)
    ref, _ = _dpa(q, k, v, mask.dense(), scale=0.25)
    real_rows = np.asarray(segment_ids) != 0
    assert_close(np.asarray(ours)[real_rows], np.asarray(ref)[real_rows], 1e-5, f"cudnn mapping {attention_type}")
    assert (masks[0] is None) == (not segmented)


def test_mask_is_unsegmented_only_without_segment_ids(getkey, rng, monkeypatch):
    """The layer marks its mask unsegmented exactly when no segment ids were given and it reads no cache (an
    empty cache is not read: the new keys are all there is)."""
    built = []
    real_build = AttentionMask.build.__func__

    def build(cls, *args, **kwargs):
        built.append(real_build(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(AttentionMask, "build", classmethod(build))
    layer = _layer(getkey)
    x = _x(rng, (1, 6, E))
    layer(x)
    layer(x, segment_ids=jnp.ones((1, 6), jnp.int32))
    _, cache = layer(x, cache=KVCache.init(1, 8, layer.num_kv_heads, layer.head_dim))
    layer(x[:, :1], cache=cache)
    assert [m.segmented for m in built] == [False, True, False, True]
    assert [m.kv_index.shape[0] for m in built] == [6, 6, 6, 8]


def test_default_kernel_runs_reference_path_on_cpu(getkey, rng):
    """The default ("auto") layer lowers without any cuDNN call on CPU and runs."""
    layer = _layer(getkey, dtype=jnp.bfloat16)
    x = _x(rng, (1, 8, E)).astype(jnp.bfloat16)
    fn = eqx.filter_jit(lambda m, x: m(x)[0])
    assert "cudnn" not in fn.lower(layer, x).as_text().lower()
    y = fn(layer, x)
    assert y.shape == (1, 8, E) and bool(jnp.all(jnp.isfinite(y)))
    forced = _layer(getkey, dtype=jnp.bfloat16, attention_kernel="cudnn")
    with pytest.raises(ValueError, match="needs a GPU backend, this one is 'cpu'"):
        fn(forced, x)


# ----------------------------------------------------------------------------------------------------------
# Dropout


def test_attention_dropout(getkey, rng):
    """dropout_rate 0.3, not inference: exactly float64 NumPy attention with `keep * probs / 0.7`, `keep` the
    layer's draw `bernoulli(key, 0.7)` over `[batch, kv_heads, groups, q, kv]` (query head `j * groups + g`),
    1e-5; ~70% kept; deterministic per key; no key -> ValueError; at inference no dropout."""
    rate, batch, seq = 0.3, 2, 9
    layer = _layer(getkey, dropout_rate=rate)
    x = _x(rng, (batch, seq, E))
    key = getkey()
    a, _ = _apply(layer, x, key=key)
    b, _ = _apply(layer, x, key=key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, (batch, 2, H // 2, seq, seq))).reshape(batch, H, seq, seq)
    assert abs(keep.mean() - (1.0 - rate)) < 0.1
    q, k, v = np_qkv(layer, x)
    expected = np_out(layer, np_attention(q, k, v, np_causal(batch, seq), 1.0 / math.sqrt(D), keep=keep,
                                          dropout_rate=rate))
    assert_close(a, expected, 1e-5, "attention dropout 0.3 vs float64 NumPy with the same keep mask")
    clean, _ = _apply(layer, x, inference=True)
    assert_close(clean, np_layer(layer, x, np_causal(batch, seq)), 1e-5, "dropout layer at inference")
    assert max_rel_err(a, clean) > 1e-2
    with pytest.raises(ValueError, match="dropout needs a key"):
        _apply(layer, x)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_construction_raises(getkey):
    """Indivisible heads, a rotary for another head_dim, a bad attention_type, missing window/chunk size."""
    with pytest.raises(ValueError, match=r"num_query_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        Attention(E, 4, 3, D, key=getkey())
    with pytest.raises(ValueError, match="rotary embedding is built for head_dim 32, attention head_dim is 16"):
        Attention(E, H, 2, D, rotary=RotaryEmbedding(32), key=getkey())
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="attention_type"):
        Attention(E, H, 2, D, attention_type="sliding", key=getkey())
    with pytest.raises(ValueError, match=r"local_sliding attention needs sliding_window >= 1 \(an int\), got None"):
        Attention(E, H, 2, D, attention_type="local_sliding", key=getkey())
    with pytest.raises(ValueError, match="chunk attention needs chunk_size >= 1 \\(an int\\), got 0"):
        Attention(E, H, 2, D, attention_type="chunk", chunk_size=0, key=getkey())
    with pytest.raises(ValueError, match=r"local_sliding attention needs sliding_window >= 1 \(an int\), got 2.5"):
        inspect.unwrap(_check_attention_type)("local_sliding", 2.5, None)  # what callers without the hook reach
    with pytest.raises(ValueError, match="sliding_window applies to 'local_sliding' attention only, not 'global'"):
        Attention(E, H, 2, D, sliding_window=3, key=getkey())
    with pytest.raises(ValueError, match="chunk_size applies to 'chunk' attention only, not 'local_sliding'"):
        Attention(E, H, 2, D, attention_type="local_sliding", sliding_window=2, chunk_size=3, key=getkey())
    with pytest.raises(ValueError, match="fused_qkv cannot be combined with share_kv_projections or output_gate"):
        Attention(E, H, 2, D, fused_qkv=True, output_gate=True, key=getkey())
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got 1.0"):
        Attention(E, H, 2, D, dropout_rate=1.0, key=getkey())
    with pytest.raises(ValueError, match="logits_soft_cap must be positive, got 0.0"):
        Attention(E, H, 2, D, logits_soft_cap=0.0, key=getkey())
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="attention_kernel"):
        Attention(E, H, 2, D, attention_kernel="flash", key=getkey())
    with pytest.raises(ValueError, match="attention_type must be one of"):
        AttentionMask.build(jnp.ones((1, 3), jnp.int32), attention_type="banana")


def test_positions_shape_mismatch_raises(getkey):
    """Positions, segment ids or a bidirectional mask not (batch, seq): named by the shape checker at the call;
    the undecorated method's ValueError (what users without the hook see) names the argument and both shapes."""
    layer = _layer(getkey)
    x, bad = jnp.ones((2, 4, E)), jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(jaxtyping.TypeCheckError, match="positions"):
        layer(x, bad)
    raw = getattr(Attention.__call__, "__wrapped__", Attention.__call__)
    with pytest.raises(ValueError, match=r"positions \(2, 5\) do not match input \(batch, seq\) = \(2, 4\)"):
        raw(layer, x, bad)
    with pytest.raises(ValueError, match=r"segment_ids \(2, 5\) do not match input"):
        raw(layer, x, segment_ids=bad)
    with pytest.raises(ValueError, match=r"bidirectional_mask \(2, 5\) do not match input"):
        raw(layer, x, bidirectional_mask=bad.astype(bool))


def test_attention_mask_of_other_lengths_raises():
    """An `AttentionMask` built for other lengths than the queries and keys is named, not sliced into blocks."""
    q, kv = jnp.zeros((1, 520, 4, 8)), jnp.zeros((1, 520, 2, 8))
    mask = AttentionMask.build(jnp.ones((1, 600), jnp.int32))
    with pytest.raises(ValueError, match=r"mask is for \(queries, keys\) = \(600, 600\), attention has \(520, 520\)"):
        dot_product_attention(q, kv, kv, mask, scale=1.0)


def test_bad_dense_mask_empty_query_and_cache_segments_raise():
    """Checks that hold without the jaxtyping hook (the undecorated functions): a 2-D `[q, kv]` mask, which
    broadcast over the key/value heads when q == kv_heads and silently masked head r for query r; zero queries
    (a ZeroDivisionError before); segment ids not `[batch, seq]` of the keys written to a cache, whose extra
    tokens were left in segment 0, unseen by later queries."""
    attention = inspect.unwrap(dot_product_attention)
    q, kv = jnp.ones((1, 2, 4, 8)), jnp.ones((1, 6, 2, 8))
    with pytest.raises(ValueError, match=r"a dense mask must be \[batch, queries, keys\] = \[1, 2, 6\].*got \[2, 6\]"):
        attention(q, kv, kv, jnp.ones((2, 6), bool), scale=1.0)
    with pytest.raises(ValueError, match=r"got \[1, 2, 5\]"):
        attention(q, kv, kv, jnp.ones((1, 2, 5), bool), scale=1.0)
    with pytest.raises(ValueError, match=r"attention needs at least one query, got query shape \(1, 0, 4, 8\)"):
        attention(q[:, :0], kv, kv, jnp.ones((1, 0, 6), bool), scale=1.0)
    update = inspect.unwrap(KVCache.update)
    with pytest.raises(ValueError, match=r"segment_ids \(1, 1\) must be \[batch, seq\] of the new keys \(1, 6, 2, 8\)"):
        update(KVCache.init(1, 8, 2, 8), kv, kv, jnp.ones((1, 1), jnp.int32))


def test_cache_overflow_raises_eagerly_and_under_jit(getkey, rng):
    """Writing past max_length raises "KV cache is full" eagerly; under filter_jit the result raises on use."""
    layer = _layer(getkey)
    x = _x(rng, (2, 9, E))
    _, cache = _apply(layer, x[:, :7], cache=KVCache.init(2, 8, 2, D))
    with pytest.raises(ValueError, match="KV cache is full: 7 tokens held, 2 more do not fit in max_length=8"):
        layer(x[:, 7:9], cache=cache)
    with pytest.raises(ValueError, match="KV cache is full: cannot write 9 tokens into max_length=8"):
        _apply(layer, x, cache=KVCache.init(2, 8, 2, D))
    step = eqx.filter_jit(lambda m, xt, c: m(xt, cache=c))
    _, cache = step(layer, x[:, 7:8], cache)
    assert int(cache.end_index) == 8
    with pytest.raises(Exception) as info:
        y, cache = step(layer, x[:, 8:9], cache)
        jax.block_until_ready((y, cache))
    assert "KV cache is full" in str(info.value)


def test_cache_from_init_empty_false_is_a_scan_carry(getkey, rng):
    """A cache straight from `init(..., empty=False)` has the structure `update` returns, so a decode loop written
    as `lax.scan` can carry it from the first token; it equals the full forward."""
    layer = _layer(getkey)
    x = _x(rng, (2, 6, E))

    def step(cache, xt):
        y, cache = layer(xt[:, None], jnp.broadcast_to(cache.end_index, (2, 1)), cache=cache)
        return cache, y[:, 0]

    for quantized, tol in ((False, 1e-5), (True, 3e-2)):
        cache = KVCache.init(2, 8, 2, D, quantized=quantized, empty=False)
        cache, ys = jax.lax.scan(step, cache, jnp.swapaxes(x, 0, 1))
        assert int(cache.end_index) == 6 and not cache.empty
        assert_close(jnp.swapaxes(ys, 0, 1), _apply(layer, x)[0], tol, f"scanned decode (int8 {quantized})")


def test_cache_marked_empty_that_holds_tokens_raises(getkey, rng):
    """A filled cache rebuilt on `KVCache.init`'s structure is marked empty (static) and would be read as empty,
    its keys ignored; it raises instead, eagerly and under jit."""
    layer = _layer(getkey)
    x = _x(rng, (2, 5, E))
    _, filled = _apply(layer, x[:, :4], cache=KVCache.init(2, 8, 2, D))
    rebuilt = jax.tree.unflatten(jax.tree.structure(KVCache.init(2, 8, 2, D)), jax.tree.leaves(filled))
    assert rebuilt.empty and int(rebuilt.end_index) == 4
    with pytest.raises(ValueError, match=r"KVCache marked empty .* holds tokens.*KVCache.init\(..., empty=False\)"):
        layer(x[:, 4:], cache=rebuilt)
    with pytest.raises(Exception) as info:
        jax.block_until_ready(_apply(layer, x[:, 4:], cache=rebuilt))
    assert "KVCache marked empty" in str(info.value)


def test_int8_cache_can_be_donated(getkey, rng):
    """The int8 cache's key and value scales are separate buffers, so the cache can be donated."""
    layer = _layer(getkey)
    step = eqx.filter_jit(lambda m, xt, c: m(xt, cache=c), donate="all-except-first")
    jax.block_until_ready(step(layer, _x(rng, (1, 3, E)), KVCache.init(1, 8, 2, D, quantized=True)))


def test_cache_head_shape_mismatch_raises(getkey, rng):
    """A cache built for other (kv_heads, head_dim) is rejected, naming both."""
    layer = _layer(getkey)
    x = _x(rng, (2, 3, E))
    for kv_heads, head_dim in [(3, D), (2, 8)]:
        with pytest.raises(ValueError, match=rf"cache holds \(kv_heads, head_dim\) = \({kv_heads}, {head_dim}\)"):
            layer(x, cache=KVCache.init(2, 8, kv_heads, head_dim))
