"""Losses and the training step.

The LM head and cross-entropy run over sequence chunks under `jax.checkpoint`, so float32 logits for a whole
batch never exist at once, in the forward or the backward pass; value and gradient equal the unchunked loss.
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from eqx_models.config import is_a
from eqx_models.layers.embeddings import check_segment_ids, check_token_ids
from eqx_models.models.transformer import roll_and_mask_by_segment

Batch = dict[str, ArrayLike]
BATCH_KEYS = ("input_ids", "segment_ids", "positions")


def check_batch(batch: Batch) -> None:
    """A batch holds `input_ids` and optionally `segment_ids` and `positions`; anything else would be silently
    ignored (an HF `attention_mask` leaving padding in the loss, an image never seen), so it is an error."""
    if "input_ids" not in batch:
        raise ValueError(f"the batch needs input_ids; got {sorted(batch)}")
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        hint = (" (segment_ids are an attention mask too: 0 = padding, 1.. = document)"
                if "attention_mask" in unknown else "")
        raise ValueError(f"the batch may hold only {', '.join(BATCH_KEYS)}; got also {', '.join(unknown)}{hint}")


def _ready(x: Any) -> bool:
    """Whether `x` can be read without waiting: data still being computed on the device is not checked."""
    return not (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_ready())


def _check_chunk_size(chunk_size: object) -> None:
    """Rejects a loss chunk size that is not a positive int (0 would divide by zero when splitting)."""
    if not is_a(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (positions per loss chunk), got {chunk_size!r}")


def _check_z_loss(z_loss: object) -> None:
    """Rejects a z-loss weight that is not a finite number >= 0 (NaN would turn every parameter into NaN; a
    negative one rewards large logits)."""
    if not (is_a(z_loss, float) and 0 <= z_loss < math.inf):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")


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
    _check_chunk_size(chunk_size)
    batch, seq, embed = hidden.shape
    if seq == 0:
        raise ValueError(f"chunked_cross_entropy needs seq >= 1, got hidden states of shape {hidden.shape}")
    chunk_size = int(chunk_size)
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


def _text_config(model: eqx.Module) -> Any:
    """The config holding the decoder's loss settings (`num_experts`, `mtp_num_layers`, coefficients): the Omni
    thinker's `text_config`, else the model's own."""
    return getattr(model.config, "text_config", model.config)


def _targets(
    input_ids: Int[Array, "batch seq"], segment_ids: Int[Array, "batch seq"] | None, depths: int
) -> list[tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]]:
    """`next_token_targets` 1 (main loss) to `depths + 1` (MTP depths) tokens ahead."""
    segment_ids = jnp.ones_like(input_ids) if segment_ids is None else segment_ids
    return [next_token_targets(input_ids, segment_ids, shift=shift) for shift in range(1, depths + 2)]


def _counts(targets: list[tuple[Array, Array]]) -> dict[str, Float[Array, ""]]:
    """Valid main targets (`tokens`) and valid MTP targets over all depths (`mtp_tokens`) of `_targets`."""
    tokens = [jnp.sum(mask).astype(jnp.float32) for _, mask in targets]
    return {"tokens": tokens[0], "mtp_tokens": sum(tokens[1:], jnp.zeros((), jnp.float32))}


def loss_normalizers(model: eqx.Module, batch: Batch) -> dict[str, Float[Array, ""]]:
    """The denominators of `lm_loss` over `batch`: `tokens` (valid next-token targets) and `mtp_tokens` (valid
    targets 2 .. `mtp_num_layers` + 1 ahead, summed over the MTP depths)."""
    depths = getattr(_text_config(model), "mtp_num_layers", 0)
    return _counts(_targets(batch["input_ids"], batch.get("segment_ids"), depths))


def lm_loss(
    model: eqx.Module,
    batch: Batch,
    *,
    key: PRNGKeyArray | None = None,
    z_loss: float | int = 0.0,
    chunk_size: int = 512,
    inference: bool = False,
    normalizers: dict[str, Array] | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean next-token cross-entropy over real tokens, plus `z_loss * mean(logsumexp^2)`, the MoE
    load-balancing loss times `router_aux_loss_coef`, and the MTP loss (sum of the MTP token losses over the
    MTP targets) times `mtp_loss_scaling_factor`.

    `batch` holds `input_ids` and optionally `segment_ids` (0 = padding) and `positions` (the Qwen3-Omni
    thinker's text path included); other keys raise (`check_batch`).

    `normalizers`: the whole batch's `loss_normalizers` when `batch` is one micro-batch of it. Every term is
    then this micro-batch's share of the whole-batch loss, so losses, gradients and metrics of the micro-batches
    add up to the whole batch's. The exception is the MoE load-balancing loss, a product of batch-wide router
    statistics: each micro-batch's own is weighted by its share of the tokens (3e-3 relative to the whole batch's
    with 2 micro-batches in the tests).
    """
    check_batch(batch)
    _check_z_loss(z_loss)
    out = model.forward(batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                        key=key, inference=inference)
    cfg = _text_config(model)
    targets = _targets(batch["input_ids"], batch.get("segment_ids"), len(out.mtp_hidden))
    counts = _counts(targets)
    total = counts if normalizers is None else normalizers
    count, mtp_count = (jnp.maximum(total[name], 1.0) for name in ("tokens", "mtp_tokens"))
    xent, z = chunked_cross_entropy(model.logits, out.hidden, *targets[0], chunk_size=chunk_size)
    metrics = {"cross_entropy": xent / count, "tokens": counts["tokens"]}
    loss = xent / count + z_loss * z / count
    if getattr(cfg, "num_experts", 0):
        aux = model.aux_loss(out.stats)
        if normalizers is not None:
            aux = aux * counts["tokens"] / count
        metrics["moe_aux_loss"] = aux
        loss = loss + cfg.router_aux_loss_coef * aux
    if out.mtp_hidden:
        mtp_xent = sum(chunked_cross_entropy(model.logits, hidden, *depth_targets, chunk_size=chunk_size)[0]
                       for hidden, depth_targets in zip(out.mtp_hidden, targets[1:], strict=True))
        metrics["mtp_loss"] = mtp_xent / mtp_count
        loss = loss + cfg.mtp_loss_scaling_factor * metrics["mtp_loss"]
    metrics["loss"] = loss
    return loss, metrics


def make_optimizer(
    learning_rate: float | int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float | int = 0.1,
    b1: float | int = 0.9,
    b2: float | int = 0.95,
    max_grad_norm: float | int | None = 1.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then cosine decay to 10%, after global-norm clipping.

    Weight decay applies to every parameter, as in MaxText, unless `weight_decay_mask` (optax's `mask`: a pytree
    of bools shaped like the parameters, or a function of them returning one) says where it applies."""
    checks = {
        "learning_rate": (learning_rate, is_a(learning_rate, float) and 0 < learning_rate < math.inf,
                          "a finite number > 0"),
        "total_steps": (total_steps, is_a(total_steps, int) and total_steps >= 1, "an int >= 1"),
        "warmup_steps": (warmup_steps, is_a(warmup_steps, int) and 0 <= warmup_steps <= total_steps,
                         "an int in [0, total_steps]"),
        "weight_decay": (weight_decay, is_a(weight_decay, float) and weight_decay >= 0, "a number >= 0"),
        "b1": (b1, is_a(b1, float) and 0 <= b1 < 1, "in [0, 1)"),
        "b2": (b2, is_a(b2, float) and 0 <= b2 < 1, "in [0, 1)"),
        "max_grad_norm": (max_grad_norm, max_grad_norm is None or (is_a(max_grad_norm, float) and max_grad_norm > 0),
                          "None or a number > 0"),
    }
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"make_optimizer: {name} must be {expected}, got {value!r}")
    if warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), learning_rate * 0.1
        )
    else:
        schedule = optax.cosine_decay_schedule(learning_rate, total_steps, alpha=0.1)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=weight_decay_mask)
    return adamw if max_grad_norm is None else optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def _placement(leaf: Any) -> NamedSharding | None:
    """Where a sharded step returns `leaf`: where it came from. Left to XLA, some leaves (norm scales, their
    moments) came back split over fsdp, and the next call compiled the step again. The spec is written as jit
    writes its outputs' (no trailing None), as the placements are part of the step's compilation key."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: Callable[..., tuple[Array, dict[str, Array]]] = lm_loss,
    grad_accum_steps: int = 1,
    **loss_kwargs: Any,
) -> Callable:
    """`step(model, opt_state, batch, key) -> (model, opt_state, metrics)`, jitted with the model and optimizer
    state donated (`key` may be None where nothing is random). Parameters stay in their `param_dtype` (fp32
    master weights with `dtype="bfloat16"` compute is the mixed-precision set-up). Ids outside the vocabulary,
    which would turn every parameter into NaN, and negative segment ids raise before the step when they are on
    the host or already computed; `lm_loss` rejects batch keys it would ignore while it is traced, also before
    anything is donated.

    With `grad_accum_steps > 1` the batch is split into that many micro-batches along the batch axis, and
    `loss_fn` also receives `normalizers=loss_normalizers(model, batch)` of the whole batch; the micro-batches'
    float32 gradients and metrics are summed, which equals the full-batch per-token means (main and MTP) even
    with uneven padding; the MoE load-balancing loss is the token-weighted mean of the micro-batches' (`lm_loss`).
    A custom `loss_fn` must then return such shares, as `lm_loss` does.

    A model's `frozen_parts` (the Omni thinker's encoders with `freeze_encoders`) are left exactly as they are:
    their updates are zeroed, as AdamW's weight decay would otherwise shrink them. A sharded model and optimizer
    state come back placed as they went in, so later steps reuse the first one's compilation."""
    if not is_a(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
    grad_accum_steps = int(grad_accum_steps)
    if "chunk_size" in loss_kwargs:
        _check_chunk_size(loss_kwargs["chunk_size"])
    if "z_loss" in loss_kwargs:
        _check_z_loss(loss_kwargs["z_loss"])

    def grads_of(model, batch, key, **kwargs):
        (_, metrics), grads = eqx.filter_value_and_grad(
            lambda m: loss_fn(m, batch, key=key, **kwargs, **loss_kwargs), has_aux=True
        )(model)
        return grads, metrics

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, model, opt_state, key, placement):
        if grad_accum_steps == 1:
            grads, metrics = grads_of(model, batch, key)
        else:
            size = batch["input_ids"].shape[0]
            if size % grad_accum_steps:
                raise ValueError(f"batch size {size} is not divisible by grad_accum_steps {grad_accum_steps}")
            if not hasattr(model, "config"):
                raise ValueError(f"grad_accum_steps > 1 reads the whole batch's loss normalizers from an eqx_models "
                                 f"model's config; {type(model).__name__} has none")
            normalizers = loss_normalizers(model, batch)
            micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, size // grad_accum_steps, *x.shape[1:]), batch)
            params = eqx.filter(model, eqx.is_inexact_array)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

            def accumulate(total, xs):
                micro_batch, micro_key = xs
                grads, metrics = grads_of(model, micro_batch, micro_key, normalizers=normalizers)
                return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), metrics

            keys = None if key is None else jax.random.split(key, grad_accum_steps)
            total, metrics = jax.lax.scan(accumulate, zeros, (micro, keys))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), total, params)
            metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        if getattr(model, "frozen_parts", None) and model.frozen_parts(updates):
            updates = eqx.tree_at(model.frozen_parts, updates, replace_fn=lambda p: jax.tree.map(jnp.zeros_like, p))
        model = eqx.apply_updates(model, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        model, opt_state = jax.tree.map(lambda sharding, x: x if sharding is None else
                                        jax.lax.with_sharding_constraint(x, sharding),
                                        placement, (model, opt_state), is_leaf=lambda x: x is None)
        return model, opt_state, metrics

    def train_step(model, opt_state, batch: Batch, key: PRNGKeyArray | None):
        ids, segments = batch.get("input_ids"), batch.get("segment_ids")
        embed = getattr(getattr(model, "transformer", None), "embed", None)  # a custom loss_fn's model may lack it
        if ids is not None and embed is not None and _ready(ids):
            check_token_ids(ids, embed.num_embeddings)
        if segments is not None and _ready(segments):
            check_segment_ids(segments)
        placement = jax.tree.map(_placement, (model, opt_state))
        return step(batch, model, opt_state, key, placement)

    return train_step
