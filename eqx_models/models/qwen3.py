"""Qwen3 dense and MoE decoder layers and causal LMs (HF `Qwen3ForCausalLM`, `Qwen3MoeForCausalLM`)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Real

from eqx_models.config import Qwen3Config, Qwen3MoeConfig
from eqx_models.layers.attention import Attention
from eqx_models.layers.embeddings import (
    Embed,
    LLaMARotaryEmbedding,
    RotaryEmbedding,
    YarnRotaryEmbedding,
)
from eqx_models.layers.kv_cache import KVCache
from eqx_models.layers.linear import Linear
from eqx_models.layers.mlp import MLP
from eqx_models.layers.moe import RoutedMoE, RouterStats, load_balancing_loss
from eqx_models.layers.norms import RMSNorm
from eqx_models.models.transformer import MultiTokenPrediction, Transformer, TransformerOutput, stack_layers


def rotary_from_config(cfg: Qwen3Config) -> eqx.Module:
    """The rotary embedding HF builds for `rope_theta` / `rope_scaling` (default, linear, yarn)."""
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return RotaryEmbedding(cfg.head_dim, max_timescale=cfg.rope_theta)
    if rope_type == "linear":
        return RotaryEmbedding(cfg.head_dim, max_timescale=cfg.rope_theta,
                               rope_linear_scaling_factor=float(scaling["factor"]))
    original = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    return YarnRotaryEmbedding(
        cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=original, beta_fast=scaling.get("beta_fast", 32.0),
        beta_slow=scaling.get("beta_slow", 1.0), rope_theta=cfg.rope_theta, rope_factor=factor, interleave=False,
        truncate=scaling.get("truncate", True), attention_scaling=True, mscale=scaling.get("mscale") or 1.0,
        mscale_all_dim=(scaling.get("mscale_all_dim") or None) if scaling.get("mscale") else None,
    )


class AttentionWithNorm(eqx.Module):
    """`h = x + attention(norm(x))`; returns `(post_norm(h), h, cache)` for the MLP/MoE to finish the layer."""

    pre_self_attention_layer_norm: RMSNorm
    self_attention: Attention
    post_self_attention_layer_norm: RMSNorm

    def __init__(self, cfg: Qwen3Config, layer: int, *, key: PRNGKeyArray):
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        sliding = cfg.layer_uses_sliding_window(layer)
        self.pre_self_attention_layer_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **dtypes)
        self.self_attention = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            rotary=rotary_from_config(cfg), use_qk_norm=True, norm_eps=cfg.rms_norm_eps,
            use_bias=cfg.attention_bias, attention_type="local_sliding" if sliding else "global",
            sliding_window=cfg.sliding_window if sliding else None, attention_kernel=cfg.attention_kernel,
            key=key, **dtypes,
        )
        self.post_self_attention_layer_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **dtypes)

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        *,
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> tuple[Float[Array, "batch seq embed"], Float[Array, "batch seq embed"], KVCache | None]:
        attended, cache = self.self_attention(
            self.pre_self_attention_layer_norm(x), positions, segment_ids=segment_ids, cache=cache, key=key,
            inference=inference,
        )
        h = x + attended
        return self.post_self_attention_layer_norm(h), h, cache


class Qwen3DecoderLayer(eqx.Module):
    """Pre-norm layer: attention block, then a SwiGLU MLP on the post-attention norm."""

    attention: AttentionWithNorm
    mlp: MLP

    def __init__(self, cfg: Qwen3Config, layer: int, *, key: PRNGKeyArray):
        k_attn, k_mlp = jax.random.split(key)
        self.attention = AttentionWithNorm(cfg, layer, key=k_attn)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, activations=(cfg.hidden_act, "linear"),
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, key=k_mlp)

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        *,
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> tuple[Float[Array, "batch seq embed"], KVCache | None, None]:
        normed, h, cache = self.attention(
            x, positions=positions, segment_ids=segment_ids, cache=cache, key=key, inference=inference
        )
        return h + self.mlp(normed), cache, None


class Qwen3MoeDecoderLayer(eqx.Module):
    """Pre-norm layer: attention block, then routed experts; returns the router statistics."""

    attention: AttentionWithNorm
    moe_block: RoutedMoE

    def __init__(self, cfg: Qwen3MoeConfig, layer: int, *, key: PRNGKeyArray):
        k_attn, k_moe = jax.random.split(key)
        self.attention = AttentionWithNorm(cfg, layer, key=k_attn)
        self.moe_block = RoutedMoE(
            cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
            norm_topk_prob=cfg.norm_topk_prob, activations=(cfg.hidden_act, "linear"), impl=cfg.moe_impl,
            capacity_factor=cfg.moe_capacity_factor, dtype=cfg.dtype, param_dtype=cfg.param_dtype, key=k_moe,
        )

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        *,
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> tuple[Float[Array, "batch seq embed"], KVCache | None, RouterStats]:
        normed, h, cache = self.attention(
            x, positions=positions, segment_ids=segment_ids, cache=cache, key=key, inference=inference
        )
        token_mask = None if segment_ids is None else segment_ids > 0
        y, stats = self.moe_block(normed, token_mask)
        return h + y, cache, stats


def _layer_kinds(cfg: Qwen3Config) -> list[tuple[str, bool]]:
    moe = isinstance(cfg, Qwen3MoeConfig)
    return [("moe" if moe and cfg.layer_is_moe(i) else "dense", cfg.layer_uses_sliding_window(i))
            for i in range(cfg.num_hidden_layers)]


class CausalLM(eqx.Module):
    """A config plus a `Transformer`: `model(input_ids, positions=, segment_ids=) -> logits`."""

    transformer: Transformer
    config: Any = eqx.field(static=True)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Real[Array, "batch seq"] | Real[Array, "batch seq 3"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Float32 logits. `positions` default to `arange(seq)`; `segment_ids` mark packed sequences
        (0 = padding, excluded from attention)."""
        return self.transformer(input_ids, positions, segment_ids)

    def forward(self, input_ids: Int[Array, "batch seq"], positions=None, segment_ids=None, **kwargs) -> TransformerOutput:
        """Final-normed hidden states, cache and layer statistics (see `Transformer.forward`)."""
        return self.transformer.forward(input_ids, positions, segment_ids, **kwargs)

    def logits(self, hidden: Float[Array, "*batch embed"]) -> Float[Array, "*batch vocab"]:
        return self.transformer.logits(hidden)

    def init_cache(self, batch: int, max_length: int, *, quantized: bool = False) -> tuple[KVCache, ...]:
        """Empty per-layer KV caches, stacked like the layers."""
        cfg = self.config
        one = KVCache.init(batch, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype=cfg.dtype,
                           quantized=quantized)
        repeats = self.transformer.num_repeats
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (repeats,) + x.shape), one)
        return tuple(stacked for _ in self.transformer.blocks)

    def aux_loss(self, stats: Any) -> Float[Array, ""]:
        """HF's router load-balancing loss over all MoE layers (0 for dense models)."""
        router = [s for s in jax.tree.leaves(stats, is_leaf=lambda s: isinstance(s, RouterStats))
                  if isinstance(s, RouterStats)]
        if not router:
            return jnp.zeros((), jnp.float32)
        total = jax.tree.map(lambda *xs: sum(xs), *router)
        return load_balancing_loss(total, self.config.num_experts)


def _build_transformer(cfg: Qwen3Config, key: PRNGKeyArray) -> Transformer:
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    kinds = _layer_kinds(cfg)

    def make_layer(index: int, layer_key: PRNGKeyArray) -> eqx.Module:
        kind, _ = kinds[index]
        layer_cls = Qwen3MoeDecoderLayer if kind == "moe" else Qwen3DecoderLayer
        return layer_cls(cfg, index, key=layer_key)

    blocks = stack_layers(make_layer, kinds, key=k_layers)
    lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, key=k_head, **dtypes)
    mtp = None
    if cfg.mtp_num_layers:
        mtp_keys = jax.random.split(jax.random.fold_in(key, 1), 2 * cfg.mtp_num_layers)
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **dtypes)  # noqa: E731
        last = cfg.num_hidden_layers - 1
        mtp = MultiTokenPrediction(
            embedding_norms=tuple(norm() for _ in range(cfg.mtp_num_layers)),
            hidden_norms=tuple(norm() for _ in range(cfg.mtp_num_layers)),
            projections=tuple(Linear(2 * cfg.hidden_size, cfg.hidden_size, key=k, **dtypes)
                              for k in mtp_keys[: cfg.mtp_num_layers]),
            layers=tuple(make_layer(last, k) for k in mtp_keys[cfg.mtp_num_layers :]),
        )
    return Transformer(
        Embed(cfg.vocab_size, cfg.hidden_size, key=k_embed, **dtypes),
        blocks,
        RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **dtypes),
        lm_head,
        mtp=mtp,
        remat_policy=cfg.remat_policy,
    )


class Qwen3ForCausalLM(CausalLM):
    """Dense Qwen3 causal LM."""

    def __init__(self, config: Qwen3Config, *, key: PRNGKeyArray):
        if isinstance(config, Qwen3MoeConfig) or not isinstance(config, Qwen3Config):
            raise ValueError(f"Qwen3ForCausalLM needs a Qwen3Config, got {type(config).__name__}")
        self.config = config
        self.transformer = _build_transformer(config, key)


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE causal LM (dense layers where `mlp_only_layers` / `decoder_sparse_step` say so)."""

    def __init__(self, config: Qwen3MoeConfig, *, key: PRNGKeyArray):
        if not isinstance(config, Qwen3MoeConfig):
            raise ValueError(f"Qwen3MoeForCausalLM needs a Qwen3MoeConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = _build_transformer(config, key)
