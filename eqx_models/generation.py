"""Autoregressive generation: one jitted function, a prefill and a single compiled decode loop.

Prompts of different lengths are left-padded (`attention_mask` 0 on the padding, as HF tokenizers produce
for generation); padded slots get segment id 0 so no token ever attends to them, and positions count real
tokens only (`cumsum(mask) - 1`, as HF `generate` does). The KV cache lives in the loop carry, so XLA updates it
in place; no Python runs per token. The model decodes with its layers unrolled (`Transformer.unroll`), so each
step reads every weight where it lies instead of slicing it out of the stacked arrays.

A model with extra prompt inputs (the Omni thinker: images, videos, audio) turns them into `PromptInputs` on the
host before the compiled call (`model.prompt_inputs`): merged embeddings, DeepStack residuals and MRoPE
positions. Generated tokens continue from each row's last prompt position plus one, on every MRoPE axis, as HF's
`generate` extends `position_ids`.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from eqx_models.config import is_a
from eqx_models.layers.embeddings import check_token_ids
from eqx_models.models.transformer import PromptInputs


def sample_token(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray | None,
    *,
    temperature: float | int = 0.0,
    top_k: int | None = None,
    top_p: float | int | None = None,
) -> Int[Array, " batch"]:
    """Greedy (`temperature == 0`) or sampled next tokens; `top_k` / `top_p` (nucleus) filter first."""
    _check_sampling(temperature, key, top_k, top_p, logits.shape[-1])
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:  # 1 keeps all (float32 sums can reach 1 before the last token)
        order = jnp.argsort(-logits, axis=-1, stable=True)
        cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        # the smallest prefix whose mass reaches top_p (at least the top token), cut by position as HF does,
        # so tokens tied at its edge are not all kept
        keep_sorted = jnp.arange(logits.shape[-1]) <= jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature, key, top_k, top_p, vocab_size):
    if not (is_a(temperature, float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if top_k is not None and not (is_a(top_k, int) and 0 < top_k <= vocab_size):
        raise ValueError(f"top_k must be an int in [1, {vocab_size}], got {top_k!r}")
    if top_p is not None and not (is_a(top_p, float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _check(input_ids, attention_mask, max_new_tokens, temperature, key, top_k, top_p, vocab_size):
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer) or not input_ids.shape[1]:
        raise ValueError(f"input_ids must be integer [batch, prompt] with prompt >= 1, got "
                         f"{input_ids.dtype}{list(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {attention_mask.shape} must match input_ids {input_ids.shape}")
    if not is_a(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    _check_sampling(temperature, key, top_k, top_p, vocab_size)
    if attention_mask is not None and not isinstance(attention_mask, jax.core.Tracer):
        real = np.asarray(attention_mask) != 0
        bad = ~real[:, -1] | (np.diff(real.astype(np.int8), axis=1) < 0).any(axis=1)
        if bad.any():
            raise ValueError(f"attention_mask must be left-padded (0s, then 1s up to the last slot, where each "
                             f"row's generation continues); rows {np.flatnonzero(bad).tolist()} are not")
    if not isinstance(input_ids, jax.core.Tracer):
        real = attention_mask is None or isinstance(attention_mask, jax.core.Tracer) or np.asarray(attention_mask) != 0
        check_token_ids(np.asarray(input_ids)[real], vocab_size)


def _eos_ids(eos_token_id: object, vocab_size: int) -> tuple[int, ...]:
    ids = np.asarray(eos_token_id)
    if ids.ndim > 1 or not ids.size or not np.issubdtype(ids.dtype, np.integer) or not (
            (ids >= 0) & (ids < vocab_size)).all():
        raise ValueError(f"eos_token_id must be an id or a list of ids in [0, {vocab_size}), got {eos_token_id!r}")
    return tuple(int(e) for e in np.atleast_1d(ids))


def generate(
    model: eqx.Module,
    input_ids: Int[Array, "batch prompt"],
    max_new_tokens: int,
    temperature: float | int = 0.0,
    key: PRNGKeyArray | None = None,
    *,
    top_k: int | None = None,
    top_p: float | int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: Int[Array, "batch prompt"] | None = None,
    unroll_layers: bool | None = None,
    quantized_cache: bool = False,
    **inputs: object,
) -> Int[Array, "batch total"]:
    """`[batch, prompt + max_new_tokens]`: the prompts followed by generated tokens.

    Greedy when `temperature == 0`. After a row emits one of `eos_token_id` it emits `pad_token_id` (default: the
    first eos id, as transformers) to the end; the loop stops early once every row has. `attention_mask` marks
    real prompt tokens (non-zero; left padding = 0, and padded slots may hold any id, e.g. -1); real tokens outside
    the vocabulary raise when the ids are concrete.
    `inputs` are a model's extra prompt inputs: for the Omni thinker its multimodal ones under HF's names
    (`pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `video_second_per_grid`,
    `input_features`, `feature_attention_mask`, `use_audio_in_video`; see its `prompt_inputs`).

    `unroll_layers` decodes with the layers unrolled (`Transformer.unroll`: 2.7x faster batch-1 decode on CPU,
    longer compile). On one CPU device the unrolled layers are views of the stacked weights; on an accelerator
    they are a copy, holding the weights a second time during the call, which the default (`None`) makes only
    where it fits in each device's free memory beside the KV cache (`True`: always, `False`: never). A model
    unrolled beforehand (`eqx.tree_at(lambda m: m.transformer, model, model.transformer.unroll())`) decodes
    as it is, without a copy.

    `quantized_cache` stores the attention keys/values as int8 with a float32 scale per (token, head): about half
    a bf16 cache's memory, at a small cost in accuracy (`KVCache`, `quantize_int8`).
    """
    if not hasattr(model, "init_cache"):
        raise ValueError(
            f"generate needs a model with a generation state (Qwen3, Qwen3-MoE, Qwen3-Next causal LMs, the "
            f"Qwen3-Omni thinker); {type(model).__name__} has none"
        )
    vocab = model.transformer.embed.num_embeddings
    input_ids = jnp.asarray(input_ids)
    attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
    _check(input_ids, attention_mask, max_new_tokens, temperature, key, top_k, top_p, vocab)
    eos = () if eos_token_id is None else _eos_ids(eos_token_id, vocab)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    elif not (is_a(pad_token_id, int) and 0 <= pad_token_id < vocab):
        raise ValueError(f"pad_token_id must be an id in [0, {vocab}), got {pad_token_id!r}")
    prompt = None
    if hasattr(model, "prompt_inputs"):
        prompt = model.prompt_inputs(input_ids, attention_mask, **inputs)
    elif inputs:
        raise ValueError(f"{type(model).__name__} takes no prompt inputs besides input_ids and attention_mask; "
                         f"got {', '.join(sorted(inputs))}")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask != 0
    key = jax.random.key(0) if key is None else key
    total = input_ids.shape[1] + int(max_new_tokens)
    if unroll_layers or (unroll_layers is None and _unroll_fits(model, input_ids.shape[0], total, quantized_cache)):
        model = eqx.tree_at(lambda m: m.transformer, model, model.transformer.unroll())
    return _generate(model, input_ids.astype(jnp.int32), jnp.asarray(attention_mask, jnp.int32), prompt, key,
                     int(max_new_tokens), float(temperature), None if top_k is None else int(top_k),
                     None if top_p is None else float(top_p), eos, int(pad_token_id), bool(quantized_cache))


def _free_bytes(device: jax.Device) -> int | None:
    """Bytes free on `device`, or None where it keeps no statistics (the CPU)."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def _unroll_fits(model: eqx.Module, batch: int, length: int, quantized: bool) -> bool:
    """Whether each device holding the stacked layers has room for their unrolled copy (its own shards) beside
    its share of the KV cache. Devices without statistics (the CPU, where the unrolled layers are views) do, and
    so does a model traced inside the caller's jit (its devices are unknown here)."""
    if model.transformer.unrolled:
        return True
    copy: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(eqx.filter(model.transformer.blocks, eqx.is_array)):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):  # traced: inside the caller's jit
            for shard in leaf.addressable_shards:
                copy[shard.device] = copy.get(shard.device, 0) + shard.data.nbytes
    free = {device: _free_bytes(device) for device in copy}
    if all(f is None for f in free.values()):
        return True
    cache = jax.eval_shape(lambda: model.init_cache(batch, length, quantized=quantized))
    cache_share = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / len(copy)
    return all(free[device] is None or need + cache_share <= free[device] for device, need in copy.items())


@eqx.filter_jit
def _generate(model, input_ids, attention_mask, prompt, key, max_new_tokens, temperature, top_k, top_p, eos, pad,
              quantized_cache):
    batch, prompt_len = input_ids.shape
    if prompt is None:
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        prompt = PromptInputs(None, None, positions)
    decoder = model.transformer
    cache = model.init_cache(batch, prompt_len + max_new_tokens, quantized=quantized_cache)
    prompt_ids = jnp.where(attention_mask != 0, input_ids, 0)  # any id may pad: none reaches the embedding
    out = decoder.forward(prompt_ids, prompt.positions, attention_mask, cache=cache,
                          inputs_embeds=prompt.inputs_embeds, layer_residuals=prompt.layer_residuals)
    keys = jax.random.split(key, max_new_tokens)
    sample = lambda logits, k: sample_token(logits, k, temperature=temperature, top_k=top_k, top_p=top_p)  # noqa: E731
    first = sample(decoder.logits(out.hidden[:, -1]), keys[0])
    is_eos = lambda tokens: jnp.isin(tokens, jnp.asarray(eos, jnp.int32)) if eos else jnp.zeros_like(tokens, bool)  # noqa: E731
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    state = (jnp.asarray(1, jnp.int32), first, prompt.positions[:, -1] + 1, out.cache, tokens, is_eos(first))

    def cond(state):
        step, _, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, previous, position, cache, tokens, done = state
        out = decoder.forward(previous[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
        token = sample(decoder.logits(out.hidden[:, 0]), keys[step])
        token = jnp.where(done, pad, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, token, position + 1, out.cache, tokens, done | is_eos(token)

    step, _, _, _, tokens, _ = jax.lax.while_loop(cond, body, state)
    tokens = jnp.where(jnp.arange(max_new_tokens)[None, :] >= step, pad, tokens)  # every row stopped early
    return jnp.concatenate([input_ids, tokens], axis=1)
