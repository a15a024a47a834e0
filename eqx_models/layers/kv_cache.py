"""Key/value cache for autoregressive attention: a pytree passed in and returned, never mutated.

All rows share one write index (`end_index`); prompts of different lengths are left-padded, and padded slots
carry segment id 0 so attention never reads them. Keys are stored after q/k-norm and RoPE, as HF does.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, Shaped

_INT8_MAX = 127.0


def quantize_int8(
    x: Float[Array, "*batch head_dim"],
) -> tuple[Shaped[Array, "*batch head_dim"], Float[Array, "*batch 1"]]:
    """Symmetric int8 with one float32 scale per head vector: `x ~= q * scale / 127`."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.rint(x32 * (_INT8_MAX / safe)), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_int8(
    q: Shaped[Array, "*batch head_dim"], scale: Float[Array, "*batch 1"], dtype: DTypeLike
) -> Float[Array, "*batch head_dim"]:
    return (q.astype(jnp.float32) * (scale / _INT8_MAX)).astype(dtype)


class KVCache(eqx.Module):
    """Fixed-size buffers `[batch, max_length, kv_heads, head_dim]` for one attention layer.

    `segment_ids[b, s]` is the segment of the token in slot `s` (0: empty or padding); `end_index` is the next
    slot to write. With `quantized=True` keys and values are stored as int8 with per-(token, head) float32 scales.
    Writing past `max_length` raises instead of wrapping. `empty` (static) marks a cache straight from `init`:
    attention on it reads the new keys alone, as HF's caches return them (a prefill: `[seq, seq]` logits rather
    than `[seq, max_length]`, through the fused kernel on GPU); every `update` returns a non-empty cache, so a
    cache carried through `lax.scan` / `while_loop` from its first write starts from `init(..., empty=False)`.
    A cache marked empty that holds tokens (a filled one rebuilt on an empty one's structure) raises on update.
    """

    key: Shaped[Array, "batch max_length kv_heads head_dim"]
    value: Shaped[Array, "batch max_length kv_heads head_dim"]
    key_scale: Float[Array, "batch max_length kv_heads 1"] | None
    value_scale: Float[Array, "batch max_length kv_heads 1"] | None
    segment_ids: Int[Array, "batch max_length"]
    end_index: Int[Array, ""]
    empty: bool = eqx.field(static=True, default=False)

    @classmethod
    def init(
        cls,
        batch: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: DTypeLike = jnp.float32,
        quantized: bool = False,
        empty: bool = True,
    ) -> "KVCache":
        """A cache holding no tokens; `empty=False` gives it the structure `update` returns (a loop carry)."""
        if min(batch, max_length, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"KVCache sizes must be positive, got batch={batch}, max_length={max_length}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        shape = (batch, max_length, num_kv_heads, head_dim)
        store = jnp.int8 if quantized else dtype
        scale_shape = shape[:-1] + (1,)
        return cls(  # every buffer its own array, so a cache can be donated
            key=jnp.zeros(shape, store),
            value=jnp.zeros(shape, store),
            key_scale=jnp.zeros(scale_shape, jnp.float32) if quantized else None,
            value_scale=jnp.zeros(scale_shape, jnp.float32) if quantized else None,
            segment_ids=jnp.zeros((batch, max_length), jnp.int32),
            end_index=jnp.zeros((), jnp.int32),
            empty=empty,
        )

    @property
    def max_length(self) -> int:
        return self.key.shape[1]

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    @property
    def lengths(self) -> Int[Array, " batch"]:
        """Number of real (non-padding) tokens held for each row."""
        return jnp.sum(self.segment_ids > 0, axis=-1)

    def update(
        self,
        key: Float[Array, "batch seq kv_heads head_dim"],
        value: Float[Array, "batch seq kv_heads head_dim"],
        segment_ids: Int[Array, "batch seq"],
    ) -> "KVCache":
        """Writes `seq` new tokens at `end_index` and advances it; raises if they do not fit."""
        seq = key.shape[1]
        if key.shape != value.shape or key.shape[0] != self.key.shape[0] or key.shape[2:] != self.key.shape[2:]:
            raise ValueError(
                f"new keys {key.shape} / values {value.shape} do not fit a cache of shape {self.key.shape}"
            )
        if segment_ids.shape != key.shape[:2]:
            raise ValueError(f"segment_ids {segment_ids.shape} must be [batch, seq] of the new keys {key.shape}")
        if seq > self.max_length:
            raise ValueError(f"KV cache is full: cannot write {seq} tokens into max_length={self.max_length}")
        end_index = self.end_index
        overflow = end_index + seq > self.max_length
        concrete = not isinstance(end_index, jax.core.Tracer)
        if concrete and bool(overflow):
            raise ValueError(
                f"KV cache is full: {int(end_index)} tokens held, {seq} more do not fit in "
                f"max_length={self.max_length}"
            )
        end_index = eqx.error_if(
            end_index, overflow, f"KV cache is full: writing past max_length={self.max_length}"
        )
        if self.empty:
            stale = (
                "a KVCache marked empty (static, from KVCache.init) holds tokens: a filled cache rebuilt on an empty "
                "one's structure would be read as empty; build that structure with KVCache.init(..., empty=False)"
            )
            if concrete and int(end_index):
                raise ValueError(stale)
            end_index = eqx.error_if(end_index, end_index != 0, stale)
        start = (0, end_index, 0, 0)
        if self.quantized:
            key, key_scale = quantize_int8(key)
            value, value_scale = quantize_int8(value)
            scales = dict(
                key_scale=jax.lax.dynamic_update_slice(self.key_scale, key_scale, start),
                value_scale=jax.lax.dynamic_update_slice(self.value_scale, value_scale, start),
            )
        else:
            scales = dict(key_scale=None, value_scale=None)
        return KVCache(
            key=jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), start),
            value=jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), start),
            segment_ids=jax.lax.dynamic_update_slice(
                self.segment_ids, segment_ids.astype(jnp.int32), (0, end_index)
            ),
            end_index=end_index + seq,
            **scales,
        )

    def keys_values(
        self, dtype: DTypeLike
    ) -> tuple[Float[Array, "batch max_length kv_heads head_dim"], Float[Array, "batch max_length kv_heads head_dim"]]:
        """The whole buffers in `dtype` (dequantized when int8)."""
        if self.quantized:
            key = dequantize_int8(self.key, self.key_scale, dtype)
            return key, dequantize_int8(self.value, self.value_scale, dtype)
        return self.key.astype(dtype), self.value.astype(dtype)
