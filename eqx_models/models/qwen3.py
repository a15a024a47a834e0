"""Qwen3 dense, MoE and Qwen3-Next decoder layers and causal LMs (HF `Qwen3ForCausalLM`, `Qwen3MoeForCausalLM`,
`Qwen3NextForCausalLM`)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Real

from eqx_models.config import Qwen3Config, Qwen3MoeConfig, Qwen3NextConfig
from eqx_models.layers.attention import Attention
from eqx_models.layers.conv import DepthwiseCausalConv1D
from eqx_models.layers.embeddings import (
    Embed,
    LLaMARotaryEmbedding,
    PartialRotaryEmbedding,
    Qwen3OmniMoeThinkerTextRotaryEmbedding,
    RotaryEmbedding,
    YarnRotaryEmbedding,
)
from eqx_models.layers.gated_delta import gated_delta_rule
from eqx_models.layers.kv_cache import KVCache
from eqx_models.layers.linear import Linear
from eqx_models.layers.mlp import MLP, get_activation
from eqx_models.layers.moe import RoutedMoE, RouterStats, router_aux_loss
from eqx_models.layers.norms import GatedRMSNorm, RMSNorm
from eqx_models.models.transformer import (
    MultiTokenPrediction,
    Transformer,
    TransformerOutput,
    repeating_pattern,
    stack_layers,
)


def rotary_from_config(cfg: Qwen3Config) -> eqx.Module:
    """The rotary embedding HF builds for `rope_theta` / `rope_scaling` (default, linear, yarn, llama3)."""
    if getattr(cfg, "mrope_section", None) is not None:  # Qwen3-Omni thinker text: interleaved MRoPE
        return Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg.head_dim, max_timescale=cfg.rope_theta,
                                                      mrope_section=tuple(cfg.mrope_section))
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return RotaryEmbedding(cfg.head_dim, max_timescale=cfg.rope_theta)
    if rope_type == "linear":
        return RotaryEmbedding(cfg.head_dim, max_timescale=cfg.rope_theta,
                               rope_linear_scaling_factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return LLaMARotaryEmbedding(
            cfg.head_dim, max_timescale=cfg.rope_theta, scale_factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"],
            old_context_len=scaling["original_max_position_embeddings"], interleaved=False,
        )
    original = scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    return YarnRotaryEmbedding(
        cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        original_max_position_embeddings=original, beta_fast=scaling.get("beta_fast") or 32.0,
        beta_slow=scaling.get("beta_slow") or 1.0, rope_theta=cfg.rope_theta, rope_factor=factor, interleave=False,
        truncate=scaling.get("truncate", True), attention_scaling=True, mscale=scaling.get("mscale") or 1.0,
        mscale_all_dim=(scaling.get("mscale_all_dim") or None) if scaling.get("mscale") else None,
        explicit_attention_factor=scaling.get("attention_factor"),
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
            capacity_factor=cfg.moe_capacity_factor, fast_capacity_factor=cfg.moe_fast_capacity_factor,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype, key=k_moe,
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


def init_kv_caches(
    transformer: Transformer, cfg: Qwen3Config, batch: int, max_length: int, *, quantized: bool = False,
    empty: bool = True,
) -> tuple:
    """Empty KV caches for every layer of an attention-only `transformer`, stacked like its layers
    (`empty` as for `KVCache.init`)."""
    one = KVCache.init(batch, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype=cfg.dtype,
                       quantized=quantized, empty=empty)
    return transformer.stack_cache(tuple(one for _ in transformer.pattern))


class CausalLM(eqx.Module):
    """A config plus a `Transformer`: `model(input_ids, positions=, segment_ids=) -> logits`."""

    transformer: Transformer
    config: Any = eqx.field(static=True)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Real[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Float32 logits. `positions` default to `arange(seq)`; `segment_ids` mark packed sequences
        (0 = padding, excluded from attention)."""
        return self.logits(self.forward(input_ids, positions, segment_ids).hidden)

    def forward(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Real[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        **kwargs: Any,
    ) -> TransformerOutput:
        """Final-normed hidden states, cache and layer statistics (see `Transformer.forward`)."""
        if positions is not None and jnp.shape(positions) != jnp.shape(input_ids):
            raise ValueError(f"positions {jnp.shape(positions)} must match input_ids {jnp.shape(input_ids)}: one "
                             f"position per token (only the Omni thinker takes [batch, seq, 3])")
        return self.transformer.forward(input_ids, positions, segment_ids, **kwargs)

    def logits(self, hidden: Float[Array, "*batch embed"]) -> Float[Array, "*batch vocab"]:
        return self.transformer.logits(hidden)

    def init_cache(self, batch: int, max_length: int, *, quantized: bool = False, empty: bool = True) -> tuple:
        """Empty per-layer KV caches, laid out like the layers (`Transformer.stack_cache`); `empty=False` gives
        them the structure a forward returns them with (a `lax.scan` carry; see `KVCache`)."""
        return init_kv_caches(self.transformer, self.config, batch, max_length, quantized=quantized, empty=empty)

    def aux_loss(self, stats: Any) -> Float[Array, ""]:
        """HF's router load-balancing loss over all MoE layers (0 for dense models)."""
        return router_aux_loss(stats)


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


# ----------------------------------------------------------------------------------------------------------
# Qwen3-Next: Gated DeltaNet and gated full attention in a repeating pattern, MoE with a shared expert


class GatedDeltaState(eqx.Module):
    """A Gated DeltaNet layer's generation state: the last `K - 1` conv inputs and the float32 recurrent state."""

    conv: Float[Array, "batch kernel_minus_1 conv_dim"]
    recurrent: Float[Array, "batch heads key_dim value_dim"]


def _sequence_starts(segment_ids: Int[Array, "batch seq"]) -> Bool[Array, "batch seq"]:
    """Tokens that start a packed sequence inside the call (a real token whose segment differs from the previous
    token's); the first token continues whatever state is passed in."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), changed], axis=1)
    return starts & (segment_ids > 0)


class Qwen3NextGatedDeltaNet(eqx.Module):
    """HF `Qwen3NextGatedDeltaNet`: projections, causal depthwise conv + SiLU, gates, the gated delta rule, a
    gated RMSNorm and the output projection.

    `in_proj_qkvz` / `in_proj_ba` keep HF's grouping per key head (`[q | k | v (r heads) | z (r heads)]` and
    `[b (r) | a (r)]`, `r = heads / key_heads`); the conv runs on `[q all heads | k all heads | v all heads]`, the
    channel order of HF's `conv1d.weight`. Padding tokens (segment 0) are zeroed and get `g = beta = 0`, so they
    leave the state untouched; a new packed sequence restarts both the conv window and the recurrent state.
    """

    in_proj_qkvz: Linear
    in_proj_ba: Linear
    conv: DepthwiseCausalConv1D
    A_log: Float[Array, " heads"]
    dt_bias: Float[Array, " heads"]
    norm: GatedRMSNorm
    out_proj: Linear
    num_key_heads: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    key_dim: int = eqx.field(static=True)
    value_dim: int = eqx.field(static=True)
    impl: str = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(self, cfg: Qwen3NextConfig, *, key: PRNGKeyArray):
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, hv // hk
        self.num_key_heads, self.num_heads, self.key_dim, self.value_dim = hk, hv, dk, dv
        self.impl, self.chunk_size, self.dtype = cfg.gated_delta_impl, cfg.gated_delta_chunk_size, jnp.dtype(cfg.dtype)
        self.activation = cfg.hidden_act  # after the conv, as HF; the output gate stays SiLU
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        k_qkvz, k_ba, k_conv, k_a, k_out = jax.random.split(key, 5)
        self.in_proj_qkvz = Linear(cfg.hidden_size, (hk, 2 * dk + 2 * r * dv), key=k_qkvz, **dtypes)
        self.in_proj_ba = Linear(cfg.hidden_size, (hk, 2 * r), key=k_ba, **dtypes)
        self.conv = DepthwiseCausalConv1D(2 * hk * dk + hv * dv, cfg.linear_conv_kernel_dim, key=k_conv, **dtypes)
        # HF init: A_log = log(U(0.01, 16)), dt_bias = 1
        self.A_log = jnp.log(jax.random.uniform(k_a, (hv,), jnp.float32, 1e-2, 16.0)).astype(cfg.param_dtype)
        self.dt_bias = jnp.ones((hv,), cfg.param_dtype)
        self.norm = GatedRMSNorm(dv, eps=cfg.rms_norm_eps, **dtypes)
        self.out_proj = Linear((hv, dv), cfg.hidden_size, key=k_out, **dtypes)

    def init_state(self, batch: int) -> GatedDeltaState:
        return GatedDeltaState(
            self.conv.init_state(batch),
            jnp.zeros((batch, self.num_heads, self.key_dim, self.value_dim), jnp.float32),
        )

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        state: GatedDeltaState | None = None,
    ) -> tuple[Float[Array, "batch seq embed"], GatedDeltaState]:
        """`(y, new_state)`; `state` (default: zeros) continues a sequence from an earlier call."""
        batch, seq, _ = x.shape
        hk, hv, dk, dv = self.num_key_heads, self.num_heads, self.key_dim, self.value_dim
        r = hv // hk
        valid = starts = None
        if segment_ids is not None:
            valid, starts = segment_ids > 0, _sequence_starts(segment_ids)
            x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
        state = self.init_state(batch) if state is None else state
        qkvz = self.in_proj_qkvz(x)
        q, k = qkvz[..., :dk], qkvz[..., dk : 2 * dk]
        v = qkvz[..., 2 * dk : 2 * dk + r * dv].reshape(batch, seq, hv, dv)
        z = qkvz[..., 2 * dk + r * dv :].reshape(batch, seq, hv, dv)
        ba = self.in_proj_ba(x)
        b, a = ba[..., :r].reshape(batch, seq, hv), ba[..., r:].reshape(batch, seq, hv)

        mixed = jnp.concatenate([q.reshape(batch, seq, -1), k.reshape(batch, seq, -1), v.reshape(batch, seq, -1)], -1)
        mixed, conv_state = self.conv(mixed, state.conv, reset=starts)
        mixed = get_activation(self.activation)(mixed)
        q = mixed[..., : hk * dk].reshape(batch, seq, hk, dk)
        k = mixed[..., hk * dk : 2 * hk * dk].reshape(batch, seq, hk, dk)
        v = mixed[..., 2 * hk * dk :].reshape(batch, seq, hv, dv)

        # gates in float32, as HF computes g
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        g = -jnp.exp(self.A_log.astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias.astype(jnp.float32))
        if valid is not None:
            beta = jnp.where(valid[..., None], beta, 0.0)
            g = jnp.where(valid[..., None], g, 0.0)
        o, recurrent = gated_delta_rule(
            q, k, v, g, beta, impl=self.impl, chunk_size=self.chunk_size, initial_state=state.recurrent,
            reset=starts, use_qk_l2norm=True,
        )
        o = self.norm(o.astype(self.dtype), z)
        return self.out_proj(o), GatedDeltaState(conv_state, recurrent)


class Qwen3NextFullAttention(eqx.Module):
    """HF `Qwen3NextAttention`: `Attention` with a per-head sigmoid output gate (q_proj emits `[query | gate]`),
    zero-centred q/k norms and RoPE on the first `partial_rotary_factor` of each head."""

    attention: Attention

    def __init__(self, cfg: Qwen3NextConfig, *, key: PRNGKeyArray):
        self.attention = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            rotary=PartialRotaryEmbedding(cfg.head_dim, cfg.partial_rotary_factor, max_timescale=cfg.rope_theta),
            use_qk_norm=True, qk_norm_scale_offset=1.0, output_gate=True, norm_eps=cfg.rms_norm_eps,
            use_bias=cfg.attention_bias, attention_kernel=cfg.attention_kernel, key=key,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        )

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        positions: Real[Array, "batch seq"] | None = None,
        *,
        segment_ids: Int[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> tuple[Float[Array, "batch seq embed"], KVCache | None]:
        return self.attention(x, positions, segment_ids=segment_ids, cache=cache, key=key, inference=inference)


class Qwen3NextSparseMoeBlock(eqx.Module):
    """HF `Qwen3NextSparseMoeBlock`: routed experts plus a shared expert scaled by `sigmoid(x @ w_gate)`.

    The scaling multiplies in float32: a product of two bf16 values is exact there, so the output is HF's, and
    the gate's gradient, a sum over `embed`, is summed in float32 rather than bf16."""

    experts: RoutedMoE
    shared_expert: MLP
    shared_expert_gate: Linear

    def __init__(self, cfg: Qwen3NextConfig, *, key: PRNGKeyArray):
        k_experts, k_shared, k_gate = jax.random.split(key, 3)
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.experts = RoutedMoE(
            cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
            norm_topk_prob=cfg.norm_topk_prob, activations=(cfg.hidden_act, "linear"), impl=cfg.moe_impl,
            capacity_factor=cfg.moe_capacity_factor, fast_capacity_factor=cfg.moe_fast_capacity_factor,
            key=k_experts, **dtypes,
        )
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size,
                                 activations=(cfg.hidden_act, "linear"), key=k_shared, **dtypes)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, key=k_gate, **dtypes)

    def __call__(
        self, x: Float[Array, "batch seq embed"], token_mask: Bool[Array, "batch seq"] | None = None
    ) -> tuple[Float[Array, "batch seq embed"], RouterStats]:
        routed, stats = self.experts(x, token_mask)
        gate = get_activation("sigmoid")(self.shared_expert_gate(x)).astype(jnp.float32)
        shared = self.shared_expert(x)
        return routed + (gate * shared.astype(jnp.float32)).astype(shared.dtype), stats


class Qwen3NextDecoderLayer(eqx.Module):
    """`x += mixer(input_layernorm(x)); x += mlp(post_attention_layernorm(x))`, zero-centred norms. The mixer is
    a Gated DeltaNet (`linear_attention`) or gated full attention; its cache is a `GatedDeltaState` or a
    `KVCache`."""

    input_layernorm: RMSNorm
    mixer: Qwen3NextGatedDeltaNet | Qwen3NextFullAttention
    post_attention_layernorm: RMSNorm
    mlp: Qwen3NextSparseMoeBlock | MLP

    def __init__(self, cfg: Qwen3NextConfig, layer: int, *, key: PRNGKeyArray):
        k_mixer, k_mlp = jax.random.split(key)
        norm = dict(eps=cfg.rms_norm_eps, scale_offset=1.0, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        if cfg.layer_types[layer] == "linear_attention":
            self.mixer = Qwen3NextGatedDeltaNet(cfg, key=k_mixer)
        else:
            self.mixer = Qwen3NextFullAttention(cfg, key=k_mixer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        if cfg.layer_is_moe(layer):
            self.mlp = Qwen3NextSparseMoeBlock(cfg, key=k_mlp)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, activations=(cfg.hidden_act, "linear"),
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, key=k_mlp)

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        *,
        positions: Real[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        cache: KVCache | GatedDeltaState | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> tuple[Float[Array, "batch seq embed"], KVCache | GatedDeltaState | None, RouterStats | None]:
        h = self.input_layernorm(x)
        if isinstance(self.mixer, Qwen3NextGatedDeltaNet):
            h, state = self.mixer(h, segment_ids=segment_ids, state=cache)
            cache = None if cache is None else state
        else:
            h, cache = self.mixer(h, positions, segment_ids=segment_ids, cache=cache, key=key, inference=inference)
        x = x + h
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, Qwen3NextSparseMoeBlock):
            y, stats = self.mlp(h, None if segment_ids is None else segment_ids > 0)
        else:
            y, stats = self.mlp(h), None
        return x + y, cache, stats


class Qwen3NextScannableBlock(eqx.Module):
    """One period of the layer pattern (Qwen3-Next: three Gated DeltaNet layers then one attention layer). The
    model stores `num_layers / period` of these stacked and applies them with one `lax.scan`; the cache is a
    tuple with one entry per layer of the period."""

    layers: tuple[Qwen3NextDecoderLayer, ...]

    def __init__(self, cfg: Qwen3NextConfig, *, key: PRNGKeyArray):
        period = qwen3_next_period(cfg)
        self.layers = tuple(Qwen3NextDecoderLayer(cfg, i, key=k)
                            for i, k in enumerate(jax.random.split(key, period)))

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        *,
        positions: Real[Array, "batch seq"] | None = None,
        segment_ids: Int[Array, "batch seq"] | None = None,
        cache: tuple | None = None,
        key: PRNGKeyArray | None = None,
        inference: bool = True,
    ) -> tuple[Float[Array, "batch seq embed"], tuple | None, tuple]:
        caches, stats = [], []
        keys = [None] * len(self.layers) if key is None else list(jax.random.split(key, len(self.layers)))
        for i, (layer, layer_key) in enumerate(zip(self.layers, keys)):
            x, layer_cache, layer_stats = layer(
                x, positions=positions, segment_ids=segment_ids, cache=None if cache is None else cache[i],
                key=layer_key, inference=inference,
            )
            caches.append(layer_cache)
            stats.append(layer_stats)
        return x, None if cache is None else tuple(caches), tuple(stats)


def qwen3_next_period(cfg: Qwen3NextConfig) -> int:
    """The period of the (layer type, MoE or dense) pattern over the layers."""
    return repeating_pattern([(cfg.layer_types[i], cfg.layer_is_moe(i)) for i in range(cfg.num_hidden_layers)])


class Qwen3NextForCausalLM(CausalLM):
    """Qwen3-Next causal LM (HF `Qwen3NextForCausalLM`): stacked `Qwen3NextScannableBlock`s, one scan."""

    def __init__(self, config: Qwen3NextConfig, *, key: PRNGKeyArray):
        if not isinstance(config, Qwen3NextConfig):
            raise ValueError(f"Qwen3NextForCausalLM needs a Qwen3NextConfig, got {type(config).__name__}")
        cfg = self.config = config
        k_embed, k_layers, k_head, k_mtp = jax.random.split(key, 4)
        dtypes = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        repeats = cfg.num_hidden_layers // qwen3_next_period(cfg)
        blocks = stack_layers(lambda _, k: Qwen3NextScannableBlock(cfg, key=k), ["block"] * repeats, key=k_layers)
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, scale_offset=1.0, **dtypes)  # noqa: E731
        mtp = None
        if cfg.mtp_num_layers:
            n, last = cfg.mtp_num_layers, cfg.num_hidden_layers - 1
            mtp_keys = jax.random.split(k_mtp, 2 * n)
            mtp = MultiTokenPrediction(
                embedding_norms=tuple(norm() for _ in range(n)),
                hidden_norms=tuple(norm() for _ in range(n)),
                projections=tuple(Linear(2 * cfg.hidden_size, cfg.hidden_size, key=k, **dtypes) for k in mtp_keys[:n]),
                layers=tuple(Qwen3NextDecoderLayer(cfg, last, key=k) for k in mtp_keys[n:]),
            )
        self.transformer = Transformer(
            Embed(cfg.vocab_size, cfg.hidden_size, key=k_embed, **dtypes),
            blocks,
            norm(),
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, key=k_head, **dtypes),
            mtp=mtp,
            remat_policy=cfg.remat_policy,
        )

    def init_cache(self, batch: int, max_length: int, *, quantized: bool = False, empty: bool = True) -> tuple:
        """Empty generation state, stacked like the blocks: a `KVCache` per attention layer (`empty` as for
        `KVCache.init`) and a `GatedDeltaState` per Gated DeltaNet layer."""
        cfg, (block,) = self.config, self.transformer.pattern
        states = []
        for layer in block.layers:
            if isinstance(layer.mixer, Qwen3NextGatedDeltaNet):
                one = layer.mixer.init_state(batch)  # reads static sizes only, so the stacked module serves
            else:
                one = KVCache.init(batch, max_length, cfg.num_key_value_heads, cfg.head_dim, dtype=cfg.dtype,
                                   quantized=quantized, empty=empty)
            states.append(one)
        return self.transformer.stack_cache((tuple(states),))
