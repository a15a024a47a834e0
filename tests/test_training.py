"""`eqx_models.training`: the chunked LM-head loss equals a naive full-logits loss in value (1e-6 relative)
and gradient (1e-5), next-token targets match a NumPy reference, z-loss / MoE aux / MTP terms are added as
documented (also for the Qwen3-Omni thinker's text path, padded, vs its own forward and float64 NumPy), MTP depths
(dense Qwen3; around the layer for Qwen3-MoE and Qwen3-Next) and their loss match float64 NumPy, and the train
step trains (loss falls, gradient accumulation == one full batch, MTP included, mixed precision keeps float32
master weights, donation); bad chunk sizes raise; `make_optimizer`'s warm-up + cosine schedule matches its
formula."""

import inspect
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eqx_models as em
from eqx_models.config import Qwen3OmniAudioConfig, Qwen3OmniThinkerTextConfig, Qwen3OmniVisionConfig
from eqx_models.models.qwen3 import Qwen3MoeDecoderLayer, Qwen3NextFullAttention
from eqx_models.training import (
    chunked_cross_entropy,
    lm_loss,
    make_optimizer,
    make_train_step,
    next_token_targets,
)
from tests.reference import assert_close, max_rel_err, numpy_cross_entropy, numpy_next_token_targets

VOCAB, SEQ = 64, 21
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
            tie_word_embeddings=False)
TINY_MOE = dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                router_aux_loss_coef=0.5)
TINY_NEXT = dict(TINY_MOE, num_hidden_layers=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                 linear_num_value_heads=4, shared_expert_intermediate_size=16)


def _random_model(cfg, seed: int = 0, norm_std: float = 0.0):
    """Our model with NumPy-random parameters (every weight N(0, 0.15^2); norm scales at their init, 1 or 0 for
    the zero-centred `1 + w` norms, plus N(0, norm_std^2)), built from `filter_eval_shape`: the real initialiser
    compiles for seconds even at this size."""
    if isinstance(cfg, em.Qwen3OmniThinkerConfig):
        cls = em.Qwen3OmniThinkerForConditionalGeneration
    elif isinstance(cfg, em.Qwen3NextConfig):
        cls = em.Qwen3NextForCausalLM
    else:
        cls = em.Qwen3MoeForCausalLM if isinstance(cfg, em.Qwen3MoeConfig) else em.Qwen3ForCausalLM
    skeleton = eqx.filter_eval_shape(cls, cfg, key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith(".scale"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.15 * rng.standard_normal(leaf.shape), leaf.dtype)

    def is_norm(x):
        return isinstance(x, eqx.Module) and eqx.is_array(getattr(x, "scale", None))

    def nudge(x):
        if not is_norm(x):
            return x
        scale = (0.0 if getattr(x, "scale_offset", 0.0) else 1.0) + norm_std * rng.standard_normal(x.scale.shape)
        return eqx.tree_at(lambda n: n.scale, x, jnp.asarray(scale, x.scale.dtype))

    return jax.tree.map(nudge, jax.tree_util.tree_map_with_path(fill, skeleton), is_leaf=is_norm)


def _segments() -> np.ndarray:
    """[4, SEQ] segment ids: one full row, one left-padded, one packed (3 docs) with right padding, one
    with a single-token document between two others."""
    seg = np.ones((4, SEQ), np.int32)
    seg[1, :6] = 0
    seg[2, 7:15], seg[2, 15:18], seg[2, 18:] = 2, 3, 0
    seg[3, 9], seg[3, 10:] = 2, 3
    return seg


def _batch(seed: int = 1, seg: np.ndarray | None = None) -> dict:
    seg = _segments() if seg is None else seg
    ids = np.random.default_rng(seed).integers(0, VOCAB, seg.shape).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg)}


@pytest.fixture(scope="module")
def model():
    return _random_model(em.Qwen3Config(**TINY))


def _grad_leaves(grads):
    return jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_inexact_array))


# ----------------------------------------------------------------------------------------- targets


def _check_targets(ids, seg, shift):
    targets, valid = next_token_targets(jnp.asarray(ids), jnp.asarray(seg), shift=shift)
    ref_targets, ref_valid = numpy_next_token_targets(ids, seg, shift)
    np.testing.assert_array_equal(np.asarray(valid), ref_valid)
    np.testing.assert_array_equal(np.asarray(targets)[ref_valid], ref_targets[ref_valid])
    targets = np.asarray(targets)
    assert ((targets >= 0) & (targets < VOCAB)).all(), "invalid positions must still hold gatherable ids"


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_next_token_targets_packed_and_padded(shift):
    """Exact equality with the NumPy reference on packed, left- and right-padded rows."""
    batch = _batch()
    _check_targets(np.asarray(batch["input_ids"]), _segments(), shift)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=12, max_size=12), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_next_token_targets_random_layouts(seg_row, shift, seed):
    """Exact equality with the NumPy reference for arbitrary segment-id rows (including id reuse and
    interior padding)."""
    seg = np.array([seg_row, sorted(seg_row)], np.int32)
    ids = np.random.default_rng(seed).integers(0, VOCAB, seg.shape).astype(np.int32)
    _check_targets(ids, seg, shift)


# --------------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("chunk", [1, 5, 21, 64])
def test_chunked_cross_entropy_value_and_grad(chunk):
    """`chunked_cross_entropy` with a linear head: both sums equal float64 NumPy (1e-6 relative) and the
    gradients wrt hidden and head equal the unchunked JAX loss (1e-5), for chunks that do and do not divide
    seq (21) and one longer than it."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, SEQ, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((16, VOCAB)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (3, SEQ)), jnp.int32)
    mask = jnp.asarray(rng.random((3, SEQ)) < 0.7)

    def chunked(h, w):
        xent, z = chunked_cross_entropy(lambda x: x @ w, h, targets, mask, chunk_size=chunk)
        return xent + 0.1 * z, (xent, z)

    def naive(h, w):
        logits = h @ w
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        m = mask.astype(jnp.float32)
        return jnp.sum((lse - tgt) * m) + 0.1 * jnp.sum(lse * lse * m)

    (_, (xent, z)), grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    ref_grads = jax.grad(naive, argnums=(0, 1))(hidden, head)
    logits64 = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    ref_xent, ref_z, _ = numpy_cross_entropy(logits64, np.asarray(targets), np.asarray(mask))
    assert_close(xent, ref_xent, 1e-6, f"xent sum, chunk {chunk}")
    assert_close(z, ref_z, 1e-6, f"lse^2 sum, chunk {chunk}")
    for name, g, r in zip(("d hidden", "d head"), grads, ref_grads):
        assert_close(g, r, 1e-5, f"{name}, chunk {chunk}")


def _naive_lm_loss(model, batch, shift=1, hidden=None):
    """Mean next-token cross-entropy over valid targets from full float32 logits (no chunking)."""
    if hidden is None:
        hidden = model.forward(batch["input_ids"], None, batch["segment_ids"]).hidden
    targets, mask = next_token_targets(batch["input_ids"], batch["segment_ids"], shift=shift)
    logp = jax.nn.log_softmax(model.logits(hidden))
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.sum(mask)


@pytest.fixture(scope="module")
def sgd_steps():
    """SGD(lr=1) train steps (update = -grad) with grad_accum_steps 1 and 2 and loss chunk size 4, compiled
    once for the module."""
    opt = optax.sgd(1.0)
    return opt, {accum: make_train_step(opt, grad_accum_steps=accum, chunk_size=4) for accum in (1, 2)}


def _sgd_step(sgd_steps, model, batch, accum):
    """One SGD(lr=1) step; returns (parameter delta = -grad, metrics)."""
    opt, steps = sgd_steps
    m = _copy(model)
    before = jax.tree.map(np.asarray, _params(m))
    new, _, metrics = steps[accum](m, opt.init(_params(m)), batch, jax.random.key(7))
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, _params(new), before)
    return delta, metrics


@pytest.mark.slow
def test_lm_loss_equals_naive_loss(sgd_steps, model):
    """`lm_loss` (chunk size 4, not dividing 21) inside `make_train_step` with SGD(lr=1): the loss equals the
    naive full-logits loss (1e-6 relative) and the update equals minus its gradient, leaf by leaf (1e-5
    relative to the leaf's scale), on a packed + padded batch. Other chunk sizes are covered on
    `chunked_cross_entropy` directly."""
    batch = _batch()
    ref, ref_grads = eqx.filter_jit(eqx.filter_value_and_grad(_naive_lm_loss))(model, batch)
    delta, metrics = _sgd_step(sgd_steps, model, batch, 1)
    assert_close(metrics["loss"], ref, 1e-6, "loss")
    assert_close(metrics["cross_entropy"], ref, 1e-6, "cross_entropy metric")
    assert float(metrics["tokens"]) == np.sum(np.asarray(next_token_targets(batch["input_ids"],
                                                                            batch["segment_ids"])[1]))
    for (path, d), (_, r) in zip(jax.tree_util.tree_leaves_with_path(delta), _grad_leaves(ref_grads),
                                 strict=True):
        assert_close(-d, r, 1e-5, f"grad {jax.tree_util.keystr(path)}")


def test_grad_norm_metric_is_the_gradient_norm(model):
    """`grad_norm` is the global norm of the gradient (the naive loss's, 1e-5), not of the update: SGD at
    lr 0.5 makes the update half as long."""
    batch = _batch()
    ref_grads = eqx.filter_jit(eqx.filter_grad(_naive_lm_loss))(model, batch)
    ref = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for _, g in _grad_leaves(ref_grads)))
    opt = optax.sgd(0.5)
    m = _copy(model)
    _, _, metrics = make_train_step(opt, chunk_size=4)(m, opt.init(_params(m)), batch, jax.random.key(0))
    assert_close(metrics["grad_norm"], ref, 1e-5, "grad_norm metric")


def test_lm_loss_jit_closure_and_default_segments(sgd_steps, model):
    """`lm_loss` traced with the batch closed over (a constant, not an argument), as in
    `jax.jit(lambda m: lm_loss(m, batch))`, and without `segment_ids`, equals the train step's loss with
    segment_ids = 1 everywhere (1e-6)."""
    ids = _batch()["input_ids"]
    jitted = eqx.filter_jit(lambda m: lm_loss(m, {"input_ids": ids}, chunk_size=4, inference=True)[0])(model)
    _, metrics = _sgd_step(sgd_steps, model, {"input_ids": ids, "segment_ids": jnp.ones_like(ids)}, 1)
    assert_close(jitted, metrics["loss"], 1e-6, "jit with closed-over batch, default segments vs train step")


def test_z_loss(model):
    """`lm_loss(z_loss=z)` = cross-entropy + z * mean over valid targets of logsumexp(logits)^2, both
    recomputed in float64 NumPy from the full logits (1e-5 relative)."""
    batch = _batch()
    z = 1e-2

    @eqx.filter_jit
    def run(m, b):
        return lm_loss(m, b, z_loss=z, inference=True), m(b["input_ids"], None, b["segment_ids"])

    (loss, metrics), logits = run(model, batch)
    targets, mask = (np.asarray(x) for x in next_token_targets(batch["input_ids"], batch["segment_ids"]))
    xent, zsum, _ = numpy_cross_entropy(np.asarray(logits), targets, mask)
    count = mask.sum()
    assert_close(metrics["cross_entropy"], xent / count, 1e-5, "cross-entropy vs NumPy")
    assert_close(loss, xent / count + z * zsum / count, 1e-5, "loss with z-loss vs NumPy")
    assert_close(loss - metrics["cross_entropy"], z * zsum / count, 1e-4, "z-loss term alone")


@pytest.mark.slow
def test_moe_loss_adds_router_aux_loss():
    """MoE model: metrics carry `moe_aux_loss` = `model.aux_loss(forward stats)` (1e-6) and loss =
    cross-entropy + router_aux_loss_coef * aux (1e-6); cross-entropy equals the naive loss (1e-6)."""
    cfg = em.Qwen3MoeConfig(**TINY_MOE)

    @eqx.filter_jit
    def run(moe, b):
        out = moe.forward(b["input_ids"], None, b["segment_ids"])
        naive = _naive_lm_loss(moe, b, hidden=out.hidden)
        return lm_loss(moe, b, inference=True), moe.aux_loss(out.stats), naive

    (loss, metrics), aux, naive = run(_random_model(cfg, seed=1), _batch())
    assert float(aux) > 0.5  # E * sum f_e p_e is ~1 for balanced routing
    assert_close(metrics["moe_aux_loss"], aux, 1e-6, "moe_aux_loss metric")
    assert_close(metrics["cross_entropy"], naive, 1e-6, "MoE cross-entropy")
    assert_close(loss, metrics["cross_entropy"] + cfg.router_aux_loss_coef * aux, 1e-6,
                 "loss = ce + coef * aux")


def _thinker_config() -> em.Qwen3OmniThinkerConfig:
    """Tiny Qwen3-Omni thinker (MoE text decoder with interleaved MRoPE; minimal encoders, unused here)."""
    text = Qwen3OmniThinkerTextConfig(**{k: v for k, v in TINY_MOE.items() if k != "tie_word_embeddings"},
                                      mrope_section=(2, 1, 1))
    vision = Qwen3OmniVisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                                   out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=(0,))
    audio = Qwen3OmniAudioConfig(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                 d_model=16, max_source_positions=64, downsample_hidden_size=8, output_dim=32)
    return em.Qwen3OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio, audio_token_id=59,
                                     image_token_id=60, video_token_id=61, audio_start_token_id=62,
                                     vision_start_token_id=63)


def _thinker_reference(model, ids: np.ndarray, seg: np.ndarray):
    """Float64 NumPy mean cross-entropy over valid next-token targets (`numpy_next_token_targets`) of the thinker's own
    logits with `attention_mask = seg`, its router aux loss on that forward, and the target count."""
    mask = jnp.asarray(seg)
    logits, aux = eqx.filter_jit(lambda m, i, a: (m(i, attention_mask=a),
                                                  m.aux_loss(m.forward(i, attention_mask=a).stats)))(
        model, jnp.asarray(ids), mask)
    targets, valid = numpy_next_token_targets(ids, seg, 1)
    xent, _, _ = numpy_cross_entropy(np.asarray(logits), targets, valid)
    return xent / valid.sum(), float(aux), float(valid.sum())


@pytest.mark.slow
def test_thinker_loss_adds_router_aux_loss():
    """Qwen3-Omni thinker (loss settings under `config.text_config`), no padding: `moe_aux_loss` = its
    `aux_loss` of the forward stats (1e-6), cross-entropy = float64 NumPy over its logits (1e-5), and loss =
    ce + router_aux_loss_coef (0.5) * aux (1e-5)."""
    model = _random_model(_thinker_config(), seed=6)
    ids = np.asarray(_batch(seed=4)["input_ids"])
    loss, metrics = eqx.filter_jit(lambda m, i: lm_loss(m, {"input_ids": i}, chunk_size=8))(model, jnp.asarray(ids))
    ce, aux, tokens = _thinker_reference(model, ids, np.ones_like(ids))
    assert aux > 0.5
    assert float(metrics["tokens"]) == tokens
    assert_close(metrics["moe_aux_loss"], aux, 1e-6, "thinker moe_aux_loss metric")
    assert_close(metrics["cross_entropy"], ce, 1e-5, "thinker cross-entropy vs NumPy")
    assert_close(loss, ce + 0.5 * aux, 1e-5, "thinker loss = ce + 0.5 * aux")


@pytest.mark.slow
def test_thinker_loss_padded_and_packed_under_jit():
    """Thinker text path under `jit` + `value_and_grad` on left-padded, right-padded and packed rows (its
    `segment_ids`): cross-entropy = float64 NumPy over each document run alone through the thinker (1e-5), loss
    = ce + 0.5 * the `moe_aux_loss` metric, gradients reach the decoder."""
    model = _random_model(_thinker_config(), seed=7)
    batch = _batch(seed=5)
    ids, seg = np.asarray(batch["input_ids"]), np.asarray(batch["segment_ids"])
    run = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, b: lm_loss(m, b, chunk_size=8), has_aux=True))
    (loss, metrics), grads = run(model, batch)
    alone = eqx.filter_jit(lambda m, i: m(i))
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        for doc in set(seg[row][seg[row] > 0].tolist()):
            tokens = ids[row][seg[row] == doc][None]
            targets, valid = numpy_next_token_targets(tokens, np.ones_like(tokens), 1)
            total += numpy_cross_entropy(np.asarray(alone(model, jnp.asarray(tokens))), targets, valid)[0]
            count += int(valid.sum())
    assert float(metrics["tokens"]) == count
    assert_close(metrics["cross_entropy"], total / count, 1e-5, "thinker cross-entropy vs documents run alone")
    assert_close(loss, metrics["cross_entropy"] + 0.5 * metrics["moe_aux_loss"], 1e-6, "loss = ce + 0.5 * aux")
    head = np.asarray(grads.transformer.lm_head.kernel)
    assert np.isfinite(head).all() and np.abs(head).max() > 0


# ----------------------------------------------------------------------------------- multi-token prediction


def _np_rms(x, scale, eps: float, offset: float = 0.0) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (np.asarray(scale, np.float64) + offset)


def _np_qwen3_layer(layer, x: np.ndarray, positions: np.ndarray, seg: np.ndarray, cfg) -> np.ndarray:
    """Float64 HF `Qwen3DecoderLayer` on `layer`'s arrays: pre-norm GQA attention with per-head q/k norms and
    half-split RoPE at `positions`, causal within segments, then the SwiGLU MLP on the post-attention norm."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    attn, eps, half = layer.attention.self_attention, cfg.rms_norm_eps, cfg.head_dim // 2
    h = _np_rms(x, layer.attention.pre_self_attention_layer_norm.scale, eps)
    q = _np_rms(np.einsum("bte,ehd->bthd", h, f64(attn.query.kernel)), attn.query_norm.scale, eps)
    k = _np_rms(np.einsum("bte,ehd->bthd", h, f64(attn.key.kernel)), attn.key_norm.scale, eps)
    v = np.einsum("bte,ehd->bthd", h, f64(attn.value.kernel))
    angles = np.asarray(positions, np.float64)[..., None, None] * cfg.rope_theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(a):
        first, second = a[..., :half], a[..., half:]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)

    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    q, k, v = rope(q), np.repeat(rope(k), groups, axis=2), np.repeat(v, groups, axis=2)
    t = np.arange(x.shape[1])
    allowed = (t[:, None] >= t[None, :]) & (seg[:, :, None] == seg[:, None, :])
    logits = np.where(allowed[:, None], np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(cfg.head_dim), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    h = x + np.einsum("bhts,bshd,hde->bte", probs, v, f64(attn.out.kernel), optimize=True)
    up = np.einsum("bte,eif->btif", _np_rms(h, layer.attention.post_self_attention_layer_norm.scale, eps),
                   f64(layer.mlp.wi.kernel))
    gate = up[..., 0, :] / (1 + np.exp(-up[..., 0, :]))
    return h + (gate * up[..., 1, :]) @ f64(layer.mlp.wo.kernel)


def _np_mtp_combine(mtp, depth: int, embedded: np.ndarray, hidden: np.ndarray, eps: float,
                    offset: float = 0.0) -> np.ndarray:
    """Float64 input of MTP depth `depth + 1`'s layer (MaxText `MultiTokenPredictionLayer`):
    `W [embedding_norm(e(t + k)); hidden_state_norm(h_(k-1))]`, from the module's arrays."""
    combined = np.concatenate([_np_rms(embedded, mtp.embedding_norms[depth].scale, eps, offset),
                               _np_rms(hidden, mtp.hidden_norms[depth].scale, eps, offset)], -1)
    return combined @ np.asarray(mtp.projections[depth].kernel, np.float64)


def _np_mtp_model(model, ids: np.ndarray, positions: np.ndarray, seg: np.ndarray):
    """Float64 dense Qwen3 with MTP from its arrays: `[final-normed hidden of the main stack, of depth 1, ...]`
    and each one's logits. Depth k embeds token t + k (`numpy_next_token_targets`) and runs its layer on depth k-1's
    pre-norm hidden state at the main positions; every depth reads out through the shared final norm and head.
    Rows of depth k are meaningful where token t + k exists in t's document (elsewhere MaxText's roll fills)."""
    t, cfg = model.transformer, model.config
    embedding = np.asarray(t.embed.embedding, np.float64)
    hidden = embedding[ids]
    for i in range(t.num_layers):
        hidden = _np_qwen3_layer(t.layer(i), hidden, positions, seg, cfg)
    depths = [hidden]
    for depth, layer in enumerate(t.mtp.layers):
        combined = _np_mtp_combine(t.mtp, depth, embedding[numpy_next_token_targets(ids, seg, depth + 1)[0]], hidden,
                                   cfg.rms_norm_eps)
        hidden = _np_qwen3_layer(layer, combined, positions, seg, cfg)
        depths.append(hidden)
    normed = [_np_rms(h, t.norm.scale, cfg.rms_norm_eps) for h in depths]
    return normed, [h @ np.asarray(t.lm_head.kernel, np.float64) for h in normed]


def test_mtp_depths_run_at_the_main_positions():
    """Dense Qwen3 with 2 MTP depths and every norm scale nudged to its own value (1 + N(0, 0.1^2)): the main
    and each depth's final-normed hidden states equal the float64 NumPy model `_np_mtp_model` (1e-5) wherever
    the depth's input token exists, on packed + padded rows at positions with a gap (where positions shifted
    with the tokens, or the embedding and hidden-state norms swapped, would differ)."""
    model = _random_model(em.Qwen3Config(**TINY, mtp_num_layers=2), seed=5, norm_std=0.1)
    batch = _batch()
    ids, seg = np.asarray(batch["input_ids"]), _segments()
    positions = np.broadcast_to(np.where(np.arange(SEQ) >= 7, 40, 0) + np.arange(SEQ), ids.shape).astype(np.int32)
    out = jax.jit(lambda m: m.forward(batch["input_ids"], jnp.asarray(positions), batch["segment_ids"],
                                      inference=False))(model)
    ref, _ = _np_mtp_model(model, ids, positions, seg)
    assert len(out.mtp_hidden) == 2
    for depth, ours in enumerate((out.hidden, *out.mtp_hidden)):
        exists = numpy_next_token_targets(ids, seg, depth)[1]
        assert_close(np.asarray(ours)[exists], ref[depth][exists], 1e-5, f"final-normed hidden, depth {depth}")


@pytest.mark.slow
def test_mtp_loss():
    """MTP model (2 depths, norm scales nudged by N(0, 0.1^2)) vs a plain model with the same main weights:
    final hidden states and logits are equal (1e-6); metrics hold `mtp_loss` = token-weighted mean of the
    depth-k cross-entropies on targets k+1 ahead (naive, 1e-6; float64 NumPy `_np_mtp_model`, 1e-5); ce equals
    the plain model's naive loss (1e-6) and NumPy's (1e-5); loss = ce + 0.1 * mtp (1e-6)."""
    mtp_cfg = em.Qwen3Config(**TINY, mtp_num_layers=2)
    model = _random_model(em.Qwen3Config(**TINY), seed=3, norm_std=0.1)

    def main(m):
        return m.transformer.embed, m.transformer.blocks, m.transformer.norm, m.transformer.lm_head

    mtp = eqx.tree_at(main, _random_model(mtp_cfg, seed=4, norm_std=0.1), main(model))
    batch = _batch()
    ids, seg = batch["input_ids"], batch["segment_ids"]

    @eqx.filter_jit
    def run(mtp, model, b):
        out = mtp.forward(b["input_ids"], None, b["segment_ids"], inference=False)
        plain = model.forward(b["input_ids"], None, b["segment_ids"])
        naive_mtp = [_naive_lm_loss(mtp, b, shift=depth + 1, hidden=h)
                     for depth, h in enumerate(out.mtp_hidden, start=1)]
        return (out, plain, mtp.logits(out.hidden), model.logits(plain.hidden), lm_loss(mtp, b),
                _naive_lm_loss(model, b, hidden=plain.hidden), naive_mtp)

    out, plain, logits, plain_logits, (loss, metrics), naive, naive_mtp = run(mtp, model, batch)
    assert_close(out.hidden, plain.hidden, 1e-6, "final hidden with vs without MTP")
    assert_close(logits, plain_logits, 1e-6, "logits with vs without MTP")
    assert len(out.mtp_hidden) == len(naive_mtp) == 2
    assert "mtp_loss" in metrics
    assert_close(metrics["cross_entropy"], naive, 1e-6, "main ce unchanged by MTP")
    counts = [float(jnp.sum(next_token_targets(ids, seg, shift=d + 1)[1])) for d in (1, 2)]
    expected = sum(float(x) * n for x, n in zip(naive_mtp, counts)) / sum(counts)
    assert_close(metrics["mtp_loss"], expected, 1e-6, "mtp_loss vs naive")
    np_ids, np_seg = np.asarray(ids), np.asarray(seg)
    _, np_logits = _np_mtp_model(mtp, np_ids, np.broadcast_to(np.arange(SEQ), np_ids.shape), np_seg)
    np_targets = [numpy_next_token_targets(np_ids, np_seg, shift) for shift in (1, 2, 3)]
    np_xent = [numpy_cross_entropy(lg, *tv)[0] for lg, tv in zip(np_logits, np_targets, strict=True)]
    np_counts = [valid.sum() for _, valid in np_targets]
    assert_close(metrics["cross_entropy"], np_xent[0] / np_counts[0], 1e-5, "main ce vs float64 NumPy")
    assert_close(metrics["mtp_loss"], sum(np_xent[1:]) / sum(np_counts[1:]), 1e-5, "mtp_loss vs float64 NumPy")
    assert mtp_cfg.mtp_loss_scaling_factor == 0.1
    assert_close(loss, metrics["cross_entropy"] + 0.1 * metrics["mtp_loss"], 1e-6, "loss = ce + 0.1 * mtp")


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "norm_offset", "layer_type"), [
    (em.Qwen3MoeConfig(**TINY_MOE, mtp_num_layers=1), 0.0, Qwen3MoeDecoderLayer),
    (em.Qwen3NextConfig(**TINY_NEXT, mtp_num_layers=1), 1.0, Qwen3NextFullAttention),
], ids=["qwen3_moe", "qwen3_next"])
def test_mtp_on_moe_and_next(cfg, norm_offset, layer_type):
    """Qwen3-MoE and Qwen3-Next with one MTP depth, every norm scale nudged by N(0, 0.1^2): the depth's layer is
    the last layer's kind (MoE; Next's gated full attention with MoE); around that layer (compared with HF in
    tests/models) the depth equals float64 NumPy where token t + 1 exists: its output from `_np_mtp_combine`'s
    input (1e-5), and `mtp_loss` from its final norm and head (1e-5; Next's norms zero-centred `1 + w` like its
    others). Under `value_and_grad`, loss = ce + 0.5 * moe_aux_loss + 0.1 * mtp_loss (1e-6) and every MTP
    parameter gets a finite, non-zero gradient."""
    model = _random_model(cfg, seed=9, norm_std=0.1)
    t, batch = model.transformer, _batch()
    ids, seg = np.asarray(batch["input_ids"]), _segments()
    layer = t.mtp.layers[0]
    assert isinstance(layer if layer_type is Qwen3MoeDecoderLayer else layer.mixer, layer_type)

    @eqx.filter_jit
    def run(m, b):
        (loss, metrics), grads = eqx.filter_value_and_grad(lambda m: lm_loss(m, b, chunk_size=8), has_aux=True)(m)
        unnormed = eqx.tree_at(lambda m: m.transformer.norm, m, eqx.nn.Identity())
        return loss, metrics, grads, unnormed.forward(b["input_ids"], None, b["segment_ids"], inference=False)

    loss, metrics, grads, out = run(model, batch)
    embedding = np.asarray(t.embed.embedding, np.float64)
    next_ids, exists = numpy_next_token_targets(ids, seg, 1)
    combined = _np_mtp_combine(t.mtp, 0, embedding[next_ids], np.asarray(out.hidden), cfg.rms_norm_eps, norm_offset)
    depth, _, _ = eqx.filter_jit(layer)(jnp.asarray(combined, jnp.float32), positions=jnp.broadcast_to(
        jnp.arange(SEQ), ids.shape), segment_ids=batch["segment_ids"], cache=None, key=None, inference=True)
    ours = np.asarray(out.mtp_hidden[0])
    assert_close(ours[exists], np.asarray(depth)[exists], 1e-5, "MTP depth 1 (before the final norm) vs NumPy input")
    logits = _np_rms(depth, t.norm.scale, cfg.rms_norm_eps, norm_offset) @ np.asarray(t.lm_head.kernel, np.float64)
    targets, valid = numpy_next_token_targets(ids, seg, 2)
    assert_close(metrics["mtp_loss"], numpy_cross_entropy(logits, targets, valid)[0] / valid.sum(), 1e-5,
                 "mtp_loss vs float64 NumPy")
    assert {"cross_entropy", "moe_aux_loss"} <= set(metrics)
    assert_close(loss, metrics["cross_entropy"] + 0.5 * metrics["moe_aux_loss"] + 0.1 * metrics["mtp_loss"], 1e-6,
                 "loss = ce + 0.5 * aux + 0.1 * mtp")
    mtp_grads = _grad_leaves(grads.transformer.mtp)
    assert mtp_grads
    for path, g in mtp_grads:
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, f"MTP gradient {jax.tree_util.keystr(path)}: {g}"


# ----------------------------------------------------------------------------------------- train step


def _standard_promotion(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """`opt` traced under standard dtype promotion: optax's Adam bias correction computes
    `float ** int32 count`, which the suite's strict promotion rejects. The model stays strict."""

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return opt.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return opt.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def _optimizer(*args, **kwargs) -> optax.GradientTransformation:
    return _standard_promotion(make_optimizer(*args, **kwargs))


def _copy(tree):
    """Fresh buffers for every array (train steps donate their model and optimizer state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _params(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


@pytest.fixture(scope="module")
def trained():
    """30 AdamW steps of the mixed-precision set-up (dtype bfloat16, param_dtype float32; same parameters as
    `model`) on one fixed packed/padded batch; records losses and donation state after step 1."""
    batch = _batch()
    opt = _optimizer(3e-3, total_steps=30, warmup_steps=3)
    m = _random_model(em.Qwen3Config(**TINY, dtype="bfloat16", param_dtype="float32"))
    state = opt.init(_params(m))
    step = make_train_step(opt)
    key = jax.random.key(2)
    losses, record = [], {}
    for i in range(30):
        previous = m
        m, state, metrics = step(m, state, batch, key)
        if i == 0:
            record["old_deleted"] = [leaf.is_deleted() for leaf in jax.tree.leaves(_params(previous))]
            record["batch_deleted"] = [x.is_deleted() for x in batch.values()]
            record["key_deleted"] = key.is_deleted()
            record["metrics"] = metrics
        losses.append(float(metrics["loss"]))
    return losses, record, m, state


@pytest.mark.slow
def test_train_step_reduces_loss(trained):
    """30 steps on a fixed batch: loss falls below 60% of its start, monotone at the end, all finite."""
    losses, record, _, _ = trained
    print("losses", losses[0], losses[9], losses[-1])
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0]
    assert losses[-1] < losses[-10]
    assert {"loss", "cross_entropy", "tokens", "grad_norm"} <= set(record["metrics"])


@pytest.mark.slow
def test_train_step_donates_model_not_batch(trained):
    """After a step the previous model's parameter buffers are donated (deleted); the batch and the key are
    not, so a fixed batch and a reused key keep working (no donation warning either: warnings are errors)."""
    _, record, _, _ = trained
    assert all(record["old_deleted"]), "model parameters were not donated"
    assert not any(record["batch_deleted"])
    assert not record["key_deleted"]


def _check_same_update(sgd_steps, model, batch):
    full, full_metrics = _sgd_step(sgd_steps, model, batch, 1)
    accum, accum_metrics = _sgd_step(sgd_steps, model, batch, 2)
    assert_close(accum_metrics["loss"], full_metrics["loss"], 1e-6, "loss, accum 2 vs full batch")
    for (path, a), (_, f) in zip(jax.tree_util.tree_leaves_with_path(accum),
                                 jax.tree_util.tree_leaves_with_path(full), strict=True):
        assert_close(a, f, 1e-5, f"update {jax.tree_util.keystr(path)}, accum 2 vs full batch")


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(sgd_steps, model):
    """grad_accum_steps=2 gives the full-batch update (SGD, so update = -grad; 1e-5 relative per leaf) and
    loss (1e-6) when both micro-batches hold the same number of target tokens."""
    seg = np.ones((4, SEQ), np.int32)
    seg[0, 11:] = 2  # packed, same token count as row 2
    seg[2, :10] = 3
    _check_same_update(sgd_steps, model, _batch(seg=seg))


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch_uneven_tokens(sgd_steps, model):
    """grad_accum_steps=2 with micro-batches of different target-token counts (rows 0-1: 20 + 14, rows 2-3:
    4 + 4 targets) still gives the full-batch update (1e-5) and loss (1e-6): the per-token mean is over the
    whole batch, as in MaxText's gradient accumulation (token-weighted), not a mean of micro-batch means."""
    seg = np.zeros((4, SEQ), np.int32)
    seg[0, :] = 1
    seg[1, 6:] = 1
    seg[2, 16:] = 1
    seg[3, :5] = 1
    _check_same_update(sgd_steps, model, _batch(seg=seg))


@pytest.mark.slow
def test_grad_accumulation_with_an_all_padding_micro_batch(sgd_steps, model):
    """grad_accum_steps=2 where the first micro-batch is all padding (segment 0): the update and loss equal
    the full batch's (1e-5 / 1e-6); the empty micro-batch must weigh 0, not 1."""
    seg = np.zeros((4, SEQ), np.int32)
    seg[2, :] = 1
    seg[3, 4:] = 2
    _check_same_update(sgd_steps, model, _batch(seg=seg))


@pytest.mark.slow
def test_grad_accumulation_with_mtp_equals_full_batch(sgd_steps):
    """MTP model, grad_accum_steps=2 vs 1 on a batch whose micro-batches hold different main and MTP target
    counts (rows 0-1: 20 + 14 main, 19 + 13 MTP; rows 2-3: 4 + 12, 3 + 9): loss, cross_entropy, mtp_loss (sum of
    MTP token losses over all MTP targets, as MaxText), tokens and grad_norm agree to 1e-6; the update to
    5e-6 of the whole gradient's scale and 1e-4 per leaf (float32 sums in another order: leaves with heavy
    cancellation, such as norm scales, differ by ~1e-5 even between row permutations of the full batch)."""
    model = _random_model(em.Qwen3Config(**TINY, mtp_num_layers=1), seed=8)
    seg = np.zeros((4, SEQ), np.int32)
    seg[0, :] = 1
    seg[1, 6:] = 1
    seg[2, 16:] = 1
    seg[3, :5], seg[3, 5:] = 1, 2
    full, full_metrics = _sgd_step(sgd_steps, model, _batch(seed=6, seg=seg), 1)
    accum, accum_metrics = _sgd_step(sgd_steps, model, _batch(seed=6, seg=seg), 2)
    assert set(accum_metrics) == set(full_metrics) >= {"loss", "cross_entropy", "mtp_loss", "tokens", "grad_norm"}
    for name in sorted(full_metrics):
        assert_close(accum_metrics[name], full_metrics[name], 1e-6, f"metric {name}, accum 2 vs full batch")
    flat = [np.concatenate([x.ravel() for x in jax.tree.leaves(d)]) for d in (accum, full)]
    assert_close(*flat, 5e-6, "whole update, accum 2 vs full batch")
    for (path, a), (_, f) in zip(jax.tree_util.tree_leaves_with_path(accum),
                                 jax.tree_util.tree_leaves_with_path(full), strict=True):
        assert_close(a, f, 1e-4, f"update {jax.tree_util.keystr(path)}, accum 2 vs full batch")


def test_grad_accumulation_weights_each_micro_batch_moe_loss_by_its_tokens(sgd_steps):
    """MoE model, grad_accum_steps=2 with uneven micro-batches (34 and 8 targets): cross-entropy and tokens equal
    the full batch's (1e-6); the load-balancing loss, not separable over micro-batches, is the token-weighted
    mean of each micro-batch's own `lm_loss` value (1e-6), and the loss is cross-entropy + coef * that."""
    model = _random_model(em.Qwen3MoeConfig(**TINY_MOE), seed=3)
    seg = np.zeros((4, SEQ), np.int32)
    seg[0, :] = 1
    seg[1, 6:] = 1
    seg[2, 16:] = 1
    seg[3, :5] = 1
    batch = _batch(seg=seg)
    _, full = _sgd_step(sgd_steps, model, batch, 1)
    _, accum = _sgd_step(sgd_steps, model, batch, 2)
    halves = [jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], batch) for i in range(2)]
    parts = [eqx.filter_jit(lambda m, b: lm_loss(m, b, chunk_size=4)[1])(model, half) for half in halves]
    tokens = [float(part["tokens"]) for part in parts]
    weighted = sum(float(part["moe_aux_loss"]) * n for part, n in zip(parts, tokens, strict=True)) / sum(tokens)
    for name in ("cross_entropy", "tokens"):
        assert_close(accum[name], full[name], 1e-6, f"metric {name}, accum 2 vs full batch")
    assert_close(accum["moe_aux_loss"], weighted, 1e-6, "accumulated moe_aux_loss vs token-weighted mean")
    assert abs(float(accum["moe_aux_loss"]) - float(full["moe_aux_loss"])) > 1e-5 * float(full["moe_aux_loss"])
    coef = TINY_MOE["router_aux_loss_coef"]
    assert_close(accum["loss"], float(accum["cross_entropy"]) + coef * weighted, 1e-6, "accumulated loss")


def test_grad_accumulation_bad_batch(model):
    """A batch not divisible by grad_accum_steps, or grad_accum_steps not an int >= 1, raises ValueError."""
    opt = optax.sgd(1.0)
    m = _copy(model)
    step = make_train_step(opt, grad_accum_steps=3)
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps"):
        step(m, opt.init(_params(m)), _batch(), jax.random.key(0))
    unchecked = inspect.unwrap(make_train_step)  # as called without the type-check hook
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="grad_accum_steps must be an int >= 1"):
            unchecked(opt, grad_accum_steps=bad)


def test_all_padding_batch_gives_zero_loss_and_finite_parameters(sgd_steps, model):
    """A batch with no target token (segment ids all 0): loss and gradients are 0, not 0/0 = NaN spreading
    into every parameter."""
    batch = _batch(seg=np.zeros((4, SEQ), np.int32))
    delta, metrics = _sgd_step(sgd_steps, model, batch, 1)
    assert float(metrics["loss"]) == 0.0 and float(metrics["tokens"]) == 0.0
    assert all(np.all(d == 0) for d in jax.tree.leaves(delta))


@pytest.mark.slow
def test_mixed_precision_keeps_float32_params(trained, sgd_steps, model):
    """dtype=bfloat16 compute with param_dtype=float32 (the `trained` run): parameters and Adam moments stay
    float32, the loss is float32 and within 5e-2 of the float32 model's, and it really is computed in bfloat16:
    the logits of the same parameters differ from float32 compute's by 1e-4..5e-2 relative (float32 would agree
    to ~1e-7). The first losses differ by only ~1e-5: the per-token rounding errors average out over the batch."""
    losses, record, m, state = trained
    assert {leaf.dtype for leaf in jax.tree.leaves(_params(m))} == {jnp.dtype(jnp.float32)}
    assert record["metrics"]["loss"].dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}
    _, f32 = _sgd_step(sgd_steps, model, _batch(), 1)
    rel = abs(losses[0] - float(f32["loss"])) / float(f32["loss"])
    print(f"bf16 vs f32 first loss: {losses[0]:.6f} vs {float(f32['loss']):.6f} (rel {rel:.2e})")
    assert rel < 5e-2
    ids = _batch()["input_ids"]
    bf16 = _random_model(em.Qwen3Config(**TINY, dtype="bfloat16", param_dtype="float32"))
    forward = eqx.filter_jit(lambda m, x: m(x))
    logits_rel = max_rel_err(forward(bf16, ids), forward(model, ids))
    print(f"bf16 vs f32 logits: rel {logits_rel:.2e}")
    assert 1e-4 < logits_rel < 5e-2


@pytest.mark.parametrize("family", ["qwen3", "moe", "next"])
def test_bf16_train_step_sums_nothing_in_bf16(family):
    """The lowered bf16-compute train step (float32 parameters) has no sum-reduction that accumulates in bf16.
    Such a sum, e.g. a norm scale's gradient over the batch, the embedding gradient's scatter-add or the Qwen3-Next
    shared-expert gate's gradient over `embed`, lost 1e-2 (norms) to 0.5 (embedding) relative."""
    cfg = {"qwen3": em.Qwen3Config(**TINY), "moe": em.Qwen3MoeConfig(**TINY_MOE),
           "next": em.Qwen3NextConfig(**TINY_NEXT)}[family].replace(dtype="bfloat16")
    model = _random_model(cfg)
    optimizer = make_optimizer(1e-3, total_steps=10, warmup_steps=2)
    step = make_train_step(optimizer)
    params, static = eqx.partition(model, eqx.is_array)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
        text = jax.jit(lambda p, s, b: step(eqx.combine(p, static), s, b, jax.random.key(0))).trace(
            params, opt_state, _batch()).lower().as_text()
    sums = re.findall(r"stablehlo\.reduce\(.*applies stablehlo\.add .*: \((tensor<[^>]+>)", text)
    scatters = re.findall(r'"stablehlo\.scatter"\(.*: \((tensor<[^>]+>)', text)
    assert len(sums) > 10, len(sums)
    assert not [t for t in sums + scatters if t.endswith("xbf16>")], [t for t in sums + scatters if "bf16" in t]


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_bad_chunk_size_raises(model, chunk_size):
    """A chunk size below 1 raises a ValueError naming chunk_size (not a ZeroDivisionError), wherever it is
    passed: `chunked_cross_entropy`, `lm_loss`, and `make_train_step`'s loss keywords (when the step is made)."""
    match = f"chunk_size must be a positive int .*, got {chunk_size}"
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(lambda x: x, jnp.zeros((1, 4, 8), jnp.float32), jnp.zeros((1, 4), jnp.int32),
                              jnp.ones((1, 4), bool), chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        lm_loss(model, _batch(), chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        make_train_step(optax.sgd(1.0), chunk_size=chunk_size)


@pytest.mark.parametrize("z_loss", [float("nan"), -1.0, float("inf")])
def test_bad_z_loss_raises(model, z_loss):
    """A NaN, infinite or negative z-loss weight raises naming z_loss, in `lm_loss` and when `make_train_step`
    is made (NaN made the loss NaN and so every parameter after one step; -1 rewarded large logits)."""
    match = f"z_loss must be a finite number >= 0, got {z_loss}"
    with pytest.raises(ValueError, match=match):
        lm_loss(model, _batch(), z_loss=z_loss)
    with pytest.raises(ValueError, match=match):
        make_train_step(optax.sgd(1.0), z_loss=z_loss)


def test_chunked_cross_entropy_edge_inputs():
    """A NumPy int chunk size is taken like an int (without the type-check hook); an empty sequence is a
    ValueError naming seq (it was a ZeroDivisionError); a one-token batch has no next-token target, so no valid
    target (it was a reshape error)."""
    args = (lambda x: x, jnp.zeros((1, 4, 8), jnp.float32), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    xent, _ = inspect.unwrap(chunked_cross_entropy)(*args, chunk_size=np.int64(3))  # without the type-check hook
    assert_close(xent, 4 * np.log(8.0), 1e-6, "uniform logits, 4 targets")
    with pytest.raises(ValueError, match="needs seq >= 1"):
        chunked_cross_entropy(lambda x: x, jnp.zeros((1, 0, 8)), jnp.zeros((1, 0), jnp.int32),
                              jnp.ones((1, 0), bool))
    targets, valid = next_token_targets(jnp.ones((2, 1), jnp.int32), jnp.ones((2, 1), jnp.int32))
    assert targets.shape == valid.shape == (2, 1) and not bool(valid.any())


# ----------------------------------------------------------------------------------------- optimizer


def _expected_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up 0 -> peak over `warmup` steps, then cosine peak -> peak / 10 at `total`, then flat."""
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    end = 0.1 * peak
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _observed_lrs(opt, steps: int, grad: float = 1.0, param: float = 0.0) -> np.ndarray:
    """Update magnitudes under a constant gradient: Adam's bias-corrected m/sqrt(v) is exactly 1, so
    |update| is the learning rate (up to eps = 1e-8 relative)."""
    params = {"w": jnp.full((3,), param, jnp.float32)}
    state = opt.init(params)
    grads = {"w": jnp.full((3,), grad, jnp.float32)}
    out = []
    for _ in range(steps):
        updates, state = opt.update(grads, state, params)
        out.append(-float(updates["w"][0]))
    return np.array(out)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_schedule_warmup_then_cosine(max_grad_norm):
    """Learning rate per step (read off AdamW updates) = linear warm-up over 5 steps then cosine to 10% at
    step 20, flat after (1e-5 relative); clipping does not change it (Adam is scale-invariant)."""
    peak, warmup, total = 1e-2, 5, 20
    opt = _optimizer(peak, total_steps=total, warmup_steps=warmup, weight_decay=0.0,
                     max_grad_norm=max_grad_norm)
    lrs = _observed_lrs(opt, 25)
    expected = np.array([_expected_lr(t, peak, warmup, total) for t in range(25)])
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)
    assert lrs[0] == 0.0 and np.argmax(lrs) == warmup
    assert np.all(np.diff(lrs[:warmup + 1]) > 0) and np.all(np.diff(lrs[warmup:total + 1]) < 0)


def test_schedule_without_warmup_starts_at_peak():
    """warmup_steps=0 means no warm-up: the very first update already uses the peak learning rate (1e-5),
    then cosine decay to 10% at total_steps."""
    peak, total = 1e-2, 10
    opt = _optimizer(peak, total_steps=total, warmup_steps=0, weight_decay=0.0, max_grad_norm=None)
    lrs = _observed_lrs(opt, 12)
    expected = np.array([_expected_lr(t, peak, 0, total) for t in range(12)])
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


def test_warmup_as_long_as_the_run():
    """warmup_steps == total_steps is allowed: the rate rises linearly to the peak, which it reaches at the last
    step (1e-5), instead of optax raising for a cosine phase of 0 steps."""
    peak, total = 1e-2, 6
    opt = _optimizer(peak, total_steps=total, warmup_steps=total, weight_decay=0.0, max_grad_norm=None)
    lrs = _observed_lrs(opt, total + 1)
    np.testing.assert_allclose(lrs, peak * np.arange(total + 1) / total, rtol=1e-5, atol=1e-9)


def test_adamw_matches_a_float64_reference():
    """15 steps on random gradients (past total_steps = 12) vs a hand-written float64 AdamW (b1 0.9, b2 0.95,
    eps 1e-8, decoupled weight decay 0.1) after global-norm clipping at 0.5 and with the warm-up + cosine
    schedule: parameters within 2e-6 absolute (float32 arithmetic; measured 5e-7). A constant gradient, as the
    schedule tests use, cannot tell clipping or b1 / b2 apart."""
    peak, warmup, total, wd, clip = 1e-2, 3, 12, 0.1, 0.5
    opt = _optimizer(peak, total_steps=total, warmup_steps=warmup, weight_decay=wd, max_grad_norm=clip)
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    state = opt.init(params)
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu, nu = ({k: np.zeros_like(v) for k, v in ref.items()} for _ in range(2))
    for step in range(15):
        grads = {k: rng.standard_normal(v.shape) for k, v in ref.items()}
        updates, state = opt.update({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        grads64 = {k: np.asarray(np.asarray(g, np.float32), np.float64) for k, g in grads.items()}
        scale = min(1.0, clip / math.sqrt(sum(np.sum(g**2) for g in grads64.values())))
        lr = _expected_lr(step, peak, warmup, total)
        for k, g in grads64.items():
            mu[k] = 0.9 * mu[k] + 0.1 * g * scale
            nu[k] = 0.95 * nu[k] + 0.05 * (g * scale) ** 2
            m_hat, v_hat = mu[k] / (1 - 0.9 ** (step + 1)), nu[k] / (1 - 0.95 ** (step + 1))
            ref[k] = ref[k] - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + wd * ref[k])
        for k in ref:
            np.testing.assert_allclose(np.asarray(params[k], np.float64), ref[k], rtol=0, atol=2e-6,
                                       err_msg=f"step {step}, {k}")


def test_weight_decay_is_decoupled():
    """With zero gradient the AdamW update is -lr_t * weight_decay * param (1e-6 relative), lr_t from the
    schedule."""
    peak, warmup, total, wd = 1e-2, 2, 10, 0.1
    opt = _optimizer(peak, total_steps=total, warmup_steps=warmup, weight_decay=wd, max_grad_norm=None)
    lrs = _observed_lrs(opt, 6, grad=0.0, param=3.0)
    expected = np.array([_expected_lr(t, peak, warmup, total) * wd * 3.0 for t in range(6)])
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-12)


def test_weight_decay_mask_spares_what_it_excludes():
    """`weight_decay_mask` (here: not the RMSNorm scales, chosen by path) keeps decay off what it excludes: with
    zero gradients every norm scale's update is exactly 0 and the embedding's is -lr * wd * param (1e-6)."""
    model = _random_model(em.Qwen3Config(**TINY))
    params = _params(model)

    def no_norms(params):
        keep = lambda path, _: not jax.tree_util.keystr(path).endswith(".scale")  # noqa: E731
        return jax.tree_util.tree_map_with_path(keep, params)

    peak, wd = 1e-2, 0.1
    opt = _optimizer(peak, total_steps=10, weight_decay=wd, max_grad_norm=None, weight_decay_mask=no_norms)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(updates)
              if jax.tree_util.keystr(path).endswith(".scale")]
    assert scales and not any(np.any(np.asarray(s)) for s in scales)
    assert_close(updates.transformer.embed.embedding,
                 -peak * wd * np.asarray(model.transformer.embed.embedding, np.float64), 1e-6, "decayed embedding")


def test_bad_batches_raise_before_the_step_and_keep_the_model(model):
    """A batch with keys the loss would silently ignore (an HF `attention_mask`: padding would be trained on; an
    image), an id outside the vocabulary (an NaN embedding row that would poison every parameter) or a negative
    segment id (padding in the loss, a document in attention) raises a
    ValueError naming it before the step runs, so nothing is donated; a NumPy batch is taken."""
    opt = _optimizer(1e-3, total_steps=4)
    step, m = make_train_step(opt), _copy(model)
    state = opt.init(_params(m))
    batch = {k: np.asarray(v) for k, v in _batch().items()}
    bad_id = dict(batch, input_ids=np.where(np.arange(batch["input_ids"].size).reshape(batch["input_ids"].shape) == 3,
                                            VOCAB, batch["input_ids"]))
    cases = [({"input_ids": batch["input_ids"], "attention_mask": batch["segment_ids"] > 0},
              "got also attention_mask .segment_ids are an attention mask too"),
             (dict(batch, pixel_values=np.zeros((4, 8), np.float32)), "got also pixel_values"),
             ({"segment_ids": batch["segment_ids"]}, "needs input_ids"),
             (bad_id, rf"token ids must lie in \[0, {VOCAB}\)"),
             (dict(batch, segment_ids=-batch["segment_ids"]), r"segment_ids must be >= 0")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            step(m, state, bad, jax.random.key(0))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(_params(m)))
    with pytest.raises(ValueError, match="got also attention_mask"):
        lm_loss(m, {"input_ids": batch["input_ids"], "attention_mask": batch["segment_ids"]})
    m, state, metrics = step(m, state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))


def test_a_custom_loss_may_read_its_own_batch_keys(model):
    """The batch-key check is `lm_loss`'s, not the step's: a custom `loss_fn` reading a key of its own (per-row
    weights here) trains on it."""
    def weighted_loss(m, batch, *, key):
        loss, metrics = lm_loss(m, {k: v for k, v in batch.items() if k != "row_weights"}, key=key)
        return loss * jnp.mean(batch["row_weights"]), metrics

    opt = _optimizer(1e-3, total_steps=4)
    m = _copy(model)
    batch = dict(_batch(), row_weights=jnp.full((_segments().shape[0],), 2.0))
    _, _, metrics = make_train_step(opt, loss_fn=weighted_loss)(m, opt.init(_params(m)), batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))


def test_a_custom_loss_may_train_a_wrapped_model_without_a_key(model):
    """The step's token-id check reads the vocabulary of an eqx_models model; a model of the user's own (an
    adapter around one here) trains through a custom `loss_fn` as well (gradient accumulation, which reads the
    loss normalizers from the model's config, says it needs one), and `key=None` (nothing random) works with
    gradient accumulation too, giving the full batch's loss."""
    class Scaled(eqx.Module):
        inner: eqx.Module
        scale: jax.Array

    def loss_fn(m, batch, *, key, **kwargs):
        return lm_loss(eqx.tree_at(lambda inner: inner.transformer.norm.scale, m.inner,
                                   m.inner.transformer.norm.scale * m.scale), batch, key=key, **kwargs)

    opt = optax.sgd(1e-2)
    wrapped = Scaled(_copy(model), jnp.ones(()))
    wrapped, _, metrics = make_train_step(opt, loss_fn=loss_fn)(wrapped, opt.init(_params(wrapped)), _batch(), None)
    assert float(wrapped.scale) != 1.0
    assert_close(metrics["loss"], lm_loss(model, _batch())[0], 1e-6, "wrapped vs plain loss")
    with pytest.raises(ValueError, match="grad_accum_steps > 1 reads .* config; Scaled has none"):
        make_train_step(opt, loss_fn=loss_fn, grad_accum_steps=2)(wrapped, opt.init(_params(wrapped)), _batch(), None)

    m = _copy(model)
    _, _, accumulated = make_train_step(opt, grad_accum_steps=2)(m, opt.init(_params(m)), _batch(), None)
    assert_close(accumulated["loss"], metrics["loss"], 1e-6, "accumulated without a key vs one batch")


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-1e-3), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number > 0"),
    (dict(total_steps=0), "total_steps must be an int >= 1"),
    (dict(warmup_steps=20), r"warmup_steps must be an int in \[0, total_steps\]"),
    (dict(max_grad_norm=0), "max_grad_norm must be None or a number > 0"),
    (dict(b2=1.0), r"b2 must be in \[0, 1\)"),
    (dict(weight_decay=-0.1), "weight_decay must be a number >= 0"),
], ids=["neg-lr", "nan-lr", "inf-lr", "no-steps", "warmup-past-total", "clip-0", "b2-1", "neg-decay"])
def test_make_optimizer_rejects_nonsense(kwargs, message):
    args = dict(learning_rate=1e-3, total_steps=10) | kwargs
    with pytest.raises(ValueError, match=message):
        make_optimizer(args.pop("learning_rate"), **args)


def test_make_optimizer_takes_int_literals():
    """Under the jaxtyping + beartype hook, ints are fine where a float is meant (Python's numeric tower)."""
    make_optimizer(1, total_steps=10, weight_decay=0, b1=0, max_grad_norm=1)
