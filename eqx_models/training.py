"""Losses and the training step.

The LM head and cross-entropy run over sequence chunks under `jax.checkpoint`, so float32 logits for a whole
batch never exist at once, in the forward or the backward pass; value and gradient equal the unchunked loss.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from eqx_models.models.transformer import roll_and_mask_by_segment

Batch = dict[str, Array]


def chunked_cross_entropy(
    logits_fn: Callable[[Array], Array],
    hidden: Float[Array, "batch seq embed"],
    targets: Int[Array, "batch seq"],
    mask: Bool[Array, "batch seq"],
    *,
    chunk_size: int = 512,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`(sum of masked token cross-entropies, sum of masked logsumexp^2)`; `logits_fn` maps `[..., embed]` to
    float32 `[..., vocab]`. Chunks of `chunk_size` positions are materialised one at a time."""
    batch, seq, embed = hidden.shape
    chunk = min(chunk_size, seq)
    pad = -seq % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = (seq + pad) // chunk
    split = lambda x: jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one_chunk(xs):
        h, t, m = xs
        logits = logits_fn(h)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        m = m.astype(jnp.float32)
        return jnp.sum((lse - target_logit) * m), jnp.sum(lse * lse * m)

    xent, z = jax.lax.map(one_chunk, (split(hidden), split(targets), split(mask)))
    return jnp.sum(xent), jnp.sum(z)


def next_token_targets(
    input_ids: Int[Array, "batch seq"], segment_ids: Int[Array, "batch seq"], shift: int = 1
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """Targets `shift` tokens ahead and whether each exists inside the same (non-padding) segment."""
    targets, valid = input_ids, segment_ids > 0
    for _ in range(shift):
        targets, valid = roll_and_mask_by_segment(targets, valid, segment_ids)
    return targets, valid


def lm_loss(
    model: eqx.Module,
    batch: Batch,
    *,
    key: PRNGKeyArray | None = None,
    z_loss: float = 0.0,
    chunk_size: int = 512,
    inference: bool = False,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean next-token cross-entropy over real tokens, plus `z_loss * mean(logsumexp^2)`, the MoE
    load-balancing loss times `router_aux_loss_coef`, and the MTP loss times `mtp_loss_scaling_factor`.

    `batch` holds `input_ids` and optionally `segment_ids` (0 = padding) and `positions`.
    """
    input_ids = batch["input_ids"]
    segment_ids = batch.get("segment_ids")
    out = model.forward(input_ids, batch.get("positions"), segment_ids, key=key, inference=inference)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    targets, mask = next_token_targets(input_ids, segment_ids)
    tokens = jnp.sum(mask).astype(jnp.float32)
    count = jnp.maximum(tokens, 1.0)
    xent, z = chunked_cross_entropy(model.logits, out.hidden, targets, mask, chunk_size=chunk_size)
    metrics = {"cross_entropy": xent / count, "tokens": tokens}
    loss = xent / count + z_loss * z / count
    cfg = model.config
    if getattr(cfg, "num_experts", 0):
        aux = model.aux_loss(out.stats)
        metrics["moe_aux_loss"] = aux
        loss = loss + cfg.router_aux_loss_coef * aux
    if out.mtp_hidden:
        mtp_terms = []
        for depth, hidden in enumerate(out.mtp_hidden, start=1):
            mtp_targets, mtp_mask = next_token_targets(input_ids, segment_ids, shift=depth + 1)
            mtp_xent, _ = chunked_cross_entropy(model.logits, hidden, mtp_targets, mtp_mask, chunk_size=chunk_size)
            mtp_terms.append((mtp_xent, jnp.sum(mtp_mask)))
        mtp = sum(x for x, _ in mtp_terms) / jnp.maximum(sum(n for _, n in mtp_terms), 1).astype(jnp.float32)
        metrics["mtp_loss"] = mtp
        loss = loss + cfg.mtp_loss_scaling_factor * mtp
    metrics["loss"] = loss
    return loss, metrics


def make_optimizer(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 10%, after global-norm clipping."""
    if warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), learning_rate * 0.1
        )
    else:
        schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1), alpha=0.1)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)
    return adamw if max_grad_norm is None else optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: Callable[..., tuple[Array, dict[str, Array]]] = lm_loss,
    grad_accum_steps: int = 1,
    **loss_kwargs: Any,
) -> Callable:
    """`step(model, opt_state, batch, key) -> (model, opt_state, metrics)`, jitted with the model and optimizer
    state donated. With `grad_accum_steps > 1` the batch is split into that many micro-batches along the batch
    axis and their float32 gradients averaged, weighted by real tokens. Parameters stay in their `param_dtype` (fp32 master weights with
    `dtype="bfloat16"` compute is the mixed-precision set-up)."""
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

    def grads_of(model, batch, key):
        (_, metrics), grads = eqx.filter_value_and_grad(
            lambda m: loss_fn(m, batch, key=key, **loss_kwargs), has_aux=True
        )(model)
        return grads, metrics

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, model, opt_state, key):
        if grad_accum_steps == 1:
            grads, metrics = grads_of(model, batch, key)
        else:
            size = batch["input_ids"].shape[0]
            if size % grad_accum_steps:
                raise ValueError(f"batch size {size} is not divisible by grad_accum_steps {grad_accum_steps}")
            micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, size // grad_accum_steps, *x.shape[1:]), batch)
            params = eqx.filter(model, eqx.is_inexact_array)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

            # Micro-batches are weighted by their real-token counts, so the result equals the full-batch
            # per-token mean even when padding is uneven across them.
            def accumulate(total, xs):
                micro_batch, micro_key = xs
                grads, metrics = grads_of(model, micro_batch, micro_key)
                weight = metrics.get("tokens", jnp.ones((), jnp.float32))
                return jax.tree.map(lambda t, g: t + weight * g.astype(jnp.float32), total, grads), metrics

            total, metrics = jax.lax.scan(accumulate, zeros, (micro, jax.random.split(key, grad_accum_steps)))
            weights = metrics.get("tokens", jnp.ones((grad_accum_steps,), jnp.float32))
            total_weight = jnp.maximum(jnp.sum(weights), 1.0)
            grads = jax.tree.map(lambda g, p: (g / total_weight).astype(p.dtype), total, params)
            metrics = jax.tree.map(lambda m: jnp.sum(m * weights) / total_weight, metrics)
            metrics["tokens"] = jnp.sum(weights)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model = eqx.apply_updates(model, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return model, opt_state, metrics

    def train_step(model, opt_state, batch: Batch, key: PRNGKeyArray):
        return step(batch, model, opt_state, key)

    return train_step
