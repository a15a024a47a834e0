"""Model configs: frozen dataclasses with HF `config.json` field names, validated on construction.

`from_hf_dict` reads both transformers-5 `rope_parameters` and the legacy `rope_theta` / `rope_scaling` keys found
on the Hub; `to_hf_dict` writes what transformers 5 writes. Fields that are ours, not HF's (`dtype`,
`param_dtype`, `remat_policy`, `attention_kernel`, `moe_impl`, ...) are runtime choices and never go to disk.
"""

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
from jax.typing import DTypeLike

from eqx_models.layers.gated_delta import GATED_DELTA_IMPLS
from eqx_models.layers.linear import is_a
from eqx_models.layers.moe import MOE_IMPLS

REMAT_POLICIES = ("none", "full", "minimal", "minimal_with_context", "save_dot_except_mlp", "save_qkv_proj")
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# how a model runs, not what it is: not written to config.json
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_kernel", "moe_impl", "moe_capacity_factor",
                  "moe_fast_capacity_factor", "mtp_num_layers", "mtp_loss_scaling_factor", "gated_delta_impl",
                  "gated_delta_chunk_size")
LAYER_TYPES = ("linear_attention", "full_attention")
# config.json keys that `from_hf_dict` interprets or that `to_hf_dict` writes itself; any other key with a plain
# value is HF's alone (output_router_logits, initializer_range, use_cache, ...) and is carried in `hf_extra`
_INTERPRETED_KEYS = frozenset({
    "model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "rope_parameters", "rope_scaling", "rope_theta", "rope_type", "partial_rotary_factor", "num_local_experts",
    "full_attention_interval", "layer_types", "max_window_layers", "use_sliding_window", "sliding_window",
    "mrope_section", "mrope_interleaved", "interleaved",
})


def _check_llama3_scaling(scaling: Mapping[str, Any]) -> None:
    """The keys HF's `_compute_llama3_parameters` reads, with `high_freq_factor > low_freq_factor > 0`."""
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [k for k in keys if not (is_a(scaling.get(k), float) and scaling[k] > 0)]
    if absent:
        raise ValueError(f"rope_scaling type 'llama3' needs positive numbers {', '.join(absent)}; got {dict(scaling)}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"rope_scaling type 'llama3' needs high_freq_factor > low_freq_factor, got {dict(scaling)}")


def _rope_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """A `config.json`'s RoPE parameters as transformers reads them: a legacy `rope_scaling` replaces
    `rope_parameters` (what adding YaRN to a transformers-5 config.json relies on)."""
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"rope_scaling / rope_parameters must be a JSON object, got {rope!r}")
    return dict(rope)


def _interval_layer_types(interval: int, layers: int) -> tuple[str, ...]:
    """Qwen3-Next's pattern: every `interval`-th layer full attention, the others linear (Gated DeltaNet)."""
    return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers))


def _check_runtime(cfg: Any) -> None:
    """The runtime choices every config shares: remat policy, attention kernel, dtypes."""
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {cfg.remat_policy!r}")
    if cfg.attention_kernel not in ("auto", "dot_product", "cudnn"):
        raise ValueError(
            f"attention_kernel must be 'auto', 'dot_product' or 'cudnn', got {cfg.attention_kernel!r}"
        )
    for name in ("dtype", "param_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{name} must be 'float32', 'bfloat16' or 'float16', got {getattr(cfg, name)!r}")


def _check_types(cfg: Any) -> None:
    """Every field annotated with plain types (`int`, `float | None`, `bool`, `str`) holds one of them, so a
    wrongly typed value from a JSON file is named here rather than failing later in a comparison. `dtype` and
    `param_dtype` also take a NumPy / JAX dtype (`jnp.bfloat16`), kept by name."""
    for field in dataclasses.fields(cfg):
        if field.name in ("dtype", "param_dtype") and not isinstance(getattr(cfg, field.name), str):
            try:
                object.__setattr__(cfg, field.name, jnp.dtype(getattr(cfg, field.name)).name)
            except TypeError:
                pass
        union = typing.get_origin(field.type) in (typing.Union, types.UnionType)
        kinds = typing.get_args(field.type) if union else (field.type,)
        if not all(kind in (bool, int, float, str, type(None)) for kind in kinds):
            continue
        value = getattr(cfg, field.name)
        if not any(is_a(value, kind) for kind in kinds):
            expected = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
            raise ValueError(f"{type(cfg).__name__}.{field.name} must be {expected}, got {value!r}")
        if is_a(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(cfg).__name__}.{field.name} must be finite, got {value!r}")
        if hasattr(value, "item"):  # a NumPy scalar, kept as the Python number config.json can hold
            object.__setattr__(cfg, field.name, value.item())


def _hash(cfg: Any) -> int:
    """A hash of the fields equality compares (nested configs included), as `__eq__` sees them."""

    def compared(c: Any) -> dict[str, Any]:
        return {f.name: compared(v) if dataclasses.is_dataclass(v) else v
                for f in dataclasses.fields(c) if f.compare for v in (getattr(c, f.name),)}

    return hash(json.dumps(compared(cfg), sort_keys=True, default=str))


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not is_a(value, int) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Dense Qwen3 (HF `Qwen3Config`). Defaults are Qwen3-0.6B's."""

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"
    hf_default_theta: ClassVar[float] = 10_000.0  # what transformers uses when config.json names no rope_theta
    hf_default_head_dim: ClassVar[int | None] = 128  # ... and no head_dim (None: hidden_size // heads)
    # ... and for these keys (our class defaults are the released checkpoint's)
    hf_defaults: ClassVar[Mapping[str, Any]] = {"tie_word_embeddings": False, "max_position_embeddings": 32768}
    layer_type_choices: ClassVar[tuple[str, ...]] = ("full_attention", "sliding_attention")

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    rope_scaling: Mapping[str, Any] | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    layer_types: Sequence[str] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # runtime choices (not written to config.json)
    dtype: DTypeLike = "float32"
    param_dtype: DTypeLike = "float32"
    remat_policy: str = "none"
    attention_kernel: str = "auto"
    mtp_num_layers: int = 0  # multi-token prediction depths (training side-car; not in HF checkpoints)
    mtp_loss_scaling_factor: float = 0.1
    # config.json's keys that only HF reads, written back unchanged; not part of the model's identity
    hf_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check_types(self)
        if not isinstance(self.hf_extra, Mapping) or not all(
                isinstance(k, str) and k not in _INTERPRETED_KEYS and _is_plain(v) for k, v in self.hf_extra.items()):
            raise ValueError(f"hf_extra must map HF-only config.json keys to plain values, got {self.hf_extra!r}")
        object.__setattr__(self, "hf_extra", dict(self.hf_extra))
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps must be >= 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, Mapping):
                raise ValueError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; choose one of {ROPE_TYPES}")
            factor = self.rope_scaling.get("factor")
            # YaRN's `"factor": null` means max_position_embeddings / original_max_position_embeddings, as in HF
            derived = rope_type == "yarn" and "factor" in self.rope_scaling and factor is None
            if rope_type != "default" and not derived and not (is_a(factor, float) and factor > 0):
                raise ValueError(f"rope_scaling type {rope_type!r} needs a positive number `factor`, got {factor!r}")
            if rope_type == "llama3":
                _check_llama3_scaling(self.rope_scaling)
            original = self.rope_scaling.get("original_max_position_embeddings")
            if rope_type == "yarn" and original is not None and not (is_a(original, int) and original > 0):
                raise ValueError(f"rope_scaling's original_max_position_embeddings must be a positive int, got "
                                 f"{original!r}")
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling, rope_type=rope_type))
        if self.use_sliding_window and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"use_sliding_window needs sliding_window >= 1, got {self.sliding_window}")
        self._set_layer_types()
        if not isinstance(self.mtp_num_layers, int) or self.mtp_num_layers < 0:
            raise ValueError(f"mtp_num_layers must be a non-negative int, got {self.mtp_num_layers!r}")
        _check_runtime(self)
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported")

    def __hash__(self) -> int:
        return _hash(self)

    def _default_layer_types(self) -> tuple[str, ...]:
        """HF Qwen3: sliding attention on layers `>= max_window_layers` when `use_sliding_window`."""
        return tuple("sliding_attention" if self.use_sliding_window and i >= self.max_window_layers
                     else "full_attention" for i in range(self.num_hidden_layers))

    def _set_layer_types(self) -> None:
        """`layer_types` as given, else the default; sliding layers need `use_sliding_window` (HF has no window
        without it)."""
        types = self._default_layer_types() if self.layer_types is None else tuple(self.layer_types)
        allowed = self.layer_type_choices
        if len(types) != self.num_hidden_layers or set(types) - set(allowed):
            raise ValueError(
                f"layer_types must list {self.num_hidden_layers} entries from {allowed}, got {list(types)}"
            )
        if "sliding_attention" in types and not self.use_sliding_window:
            raise ValueError("layer_types has sliding_attention layers but use_sliding_window is False")
        object.__setattr__(self, "layer_types", types)

    def layer_uses_sliding_window(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def replace(self, **changes: Any) -> "Qwen3Config":
        """`dataclasses.replace`; `layer_types` that are the default pattern follow the new fields (a changed
        `num_hidden_layers`, say) instead of being carried over."""
        if "layer_types" not in changes and self.layer_types == self._default_layer_types():
            changes = {**changes, "layer_types": None}
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3Config":
        """From a parsed HF `config.json` (either RoPE format); unknown keys are ignored."""
        data = dict(data)
        if "num_local_experts" in data:  # transformers 5 writes this alias of num_experts
            data.setdefault("num_experts", data.pop("num_local_experts"))
        data = {**cls.hf_defaults, **data}
        rope = _rope_dict(data)
        theta = rope.pop("rope_theta", data.get("rope_theta"))
        rope.pop("partial_rotary_factor", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in ("llama3", "yarn"):
            rope.setdefault("original_max_position_embeddings", data["max_position_embeddings"])
        fields = {f.name for f in dataclasses.fields(cls)}
        names = fields - set(RUNTIME_FIELDS) - {"hf_extra"}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["hf_extra"] = {k: v for k, v in data.items()
                              if k not in fields and k not in _INTERPRETED_KEYS and _is_plain(v)}
        for name in ("mlp_only_layers", "layer_types"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if "mlp_only_layers" in kwargs and kwargs["mlp_only_layers"] is None:  # HF reads null as []
            kwargs["mlp_only_layers"] = ()
        theta = cls.hf_default_theta if theta is None else theta
        kwargs["rope_theta"] = float(theta) if is_a(theta, float) else theta
        kwargs["rope_scaling"] = None if rope_type == "default" else rope
        if kwargs.get("head_dim") is None and cls.hf_default_head_dim is not None:
            kwargs["head_dim"] = cls.hf_default_head_dim
        elif kwargs.get("head_dim") is None:
            absent = [name for name in ("hidden_size", "num_attention_heads")
                      if not (is_a(data.get(name), int) and data[name] > 0)]
            if absent:
                raise ValueError(f"without head_dim the config needs a positive int {' and '.join(absent)}")
            kwargs["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        return cls(**{**kwargs, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers 5 writes for this model."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}
        data = {**data.pop("hf_extra"), **data}
        theta, scaling = data.pop("rope_theta"), data.pop("rope_scaling")
        data["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        for name in ("mlp_only_layers", "layer_types"):
            if isinstance(data.get(name), tuple):
                data[name] = list(data[name])
        data.update(model_type=self.model_type, architectures=[self.architecture], dtype=self.param_dtype)
        return data


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    """Qwen3-MoE (HF `Qwen3MoeConfig`). Defaults are Qwen3-30B-A3B's shape except the HF class default
    `norm_topk_prob=False`, which we keep so configs without the key load as HF loads them."""

    model_type: ClassVar[str] = "qwen3_moe"
    architecture: ClassVar[str] = "Qwen3MoeForCausalLM"
    hf_default_head_dim: ClassVar[int | None] = None

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    tie_word_embeddings: bool = False
    rope_theta: float = 10_000_000.0
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: Sequence[int] = ()
    router_aux_loss_coef: float = 0.001
    # runtime choices
    moe_impl: str = "auto"
    moe_capacity_factor: float | None = None
    moe_fast_capacity_factor: float = 1.25

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})"
            )
        layers = self.mlp_only_layers
        if not isinstance(layers, Sequence) or isinstance(layers, str) or not all(is_a(i, int) for i in layers):
            raise ValueError(f"mlp_only_layers must be a list of layer indices, got {layers!r}")
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in layers))
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layers of a {self.num_hidden_layers}-layer model")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor must be positive or None, got {self.moe_capacity_factor}")
        if self.moe_fast_capacity_factor < 1:
            raise ValueError(f"moe_fast_capacity_factor must be >= 1, got {self.moe_fast_capacity_factor}")

    __hash__ = Qwen3Config.__hash__  # the dataclass decorator would otherwise replace it

    def _default_layer_types(self) -> tuple[str, ...]:
        """HF Qwen3-MoE has no per-layer types: with `use_sliding_window` every layer slides."""
        return ("sliding_attention" if self.use_sliding_window else "full_attention",) * self.num_hidden_layers

    def _set_layer_types(self) -> None:
        types = self._default_layer_types()
        if self.layer_types is not None and tuple(self.layer_types) != types:
            raise ValueError(f"{type(self).__name__} slides every layer or none (use_sliding_window); layer_types "
                             f"{list(self.layer_types)} cannot mix them")
        object.__setattr__(self, "layer_types", types)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3MoeConfig":
        """As `Qwen3Config.from_hf_dict`, ignoring the dense model's `layer_types` / `max_window_layers`, which
        HF's MoE config does not read."""
        data = {k: v for k, v in data.items() if k not in ("layer_types", "max_window_layers")}
        return super().from_hf_dict(data, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        data = super().to_hf_dict()
        for name in ("layer_types", "max_window_layers"):
            data.pop(name)
        return data

    def layer_is_moe(self, layer: int) -> bool:
        """HF: MoE unless listed in `mlp_only_layers`, on every `decoder_sparse_step`-th layer."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


@dataclasses.dataclass(frozen=True)
class Qwen3NextConfig(Qwen3MoeConfig):
    """Qwen3-Next (HF `Qwen3NextConfig`): Gated DeltaNet layers (`linear_attention`) interleaved with gated full
    attention, MoE with a shared expert, zero-centred norms, partial RoPE. Defaults are Qwen3-Next-80B-A3B's.
    `layer_types` defaults to `full_attention` every `full_attention_interval`-th layer, as HF does."""

    model_type: ClassVar[str] = "qwen3_next"
    architecture: ClassVar[str] = "Qwen3NextForCausalLM"
    hf_default_head_dim: ClassVar[int | None] = 256
    layer_type_choices: ClassVar[tuple[str, ...]] = LAYER_TYPES
    ignored_on_load: ClassVar[tuple[str, ...]] = ("mtp.",)  # released checkpoints' MTP head; transformers skips it

    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    max_position_embeddings: int = 32768
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    layer_types: Sequence[str] | None = None
    full_attention_interval: int = 4
    # runtime choices
    gated_delta_impl: str = "auto"
    gated_delta_chunk_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_num_key_heads", "linear_num_value_heads", "shared_expert_intermediate_size",
                  "full_attention_interval", "gated_delta_chunk_size")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be divisible by linear_num_key_heads "
                f"({self.linear_num_key_heads})"
            )
        if not 0 < self.partial_rotary_factor <= 1 or int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and give an even rotary dim "
                f"of head_dim {self.head_dim}"
            )
        if self.use_sliding_window:
            raise ValueError("Qwen3-Next has no sliding-window attention; use_sliding_window must be False")
        if self.rope_scaling is not None:
            raise ValueError(f"Qwen3-Next supports only the default RoPE, got rope_scaling {dict(self.rope_scaling)}")
        if self.gated_delta_impl not in GATED_DELTA_IMPLS:
            raise ValueError(f"gated_delta_impl must be one of {GATED_DELTA_IMPLS}, got {self.gated_delta_impl!r}")

    __hash__ = Qwen3Config.__hash__
    _set_layer_types = Qwen3Config._set_layer_types  # given per-layer types, unlike Qwen3-MoE

    def _default_layer_types(self) -> tuple[str, ...]:
        _positive(self, "full_attention_interval")
        return _interval_layer_types(self.full_attention_interval, self.num_hidden_layers)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3NextConfig":
        data = dict(data)
        rope = _rope_dict(data)
        factor = rope.get("partial_rotary_factor", data.get("partial_rotary_factor"))
        if factor is not None:
            overrides = {"partial_rotary_factor": float(factor), **overrides}
        types = data.get("layer_types")
        if isinstance(types, list):
            overrides = {"layer_types": tuple(types), **overrides}
            if "full_attention_interval" not in data and "full_attention" in types:
                # transformers saves only the types; keep the interval that gives them, so `replace` re-derives
                interval = types.index("full_attention") + 1
                if tuple(types) == _interval_layer_types(interval, len(types)):
                    data["full_attention_interval"] = interval
        return super().from_hf_dict(data, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        data = super().to_hf_dict()
        data["rope_parameters"]["partial_rotary_factor"] = data.pop("partial_rotary_factor")
        for name in ("full_attention_interval", "use_sliding_window", "sliding_window"):
            data.pop(name)
        data["layer_types"] = list(self.layer_types)
        return data


# ----------------------------------------------------------------------------------------------------------
# Qwen3-Omni encoders (the thinker's `vision_config` / `audio_config`)

_ENCODER_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_kernel")
_ENCODER_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "silu", "relu")


def _encoder_kwargs(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - set(_ENCODER_RUNTIME_FIELDS)
    return {k: v for k, v in data.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Qwen3OmniVisionConfig:
    """Qwen3-Omni vision encoder (HF `Qwen3OmniMoeVisionEncoderConfig`). Defaults are HF's class defaults
    (Qwen3-Omni-30B-A3B's shape; its checkpoint sets `out_hidden_size=2048`). `rope_theta` is HF's
    `rope_parameters["rope_theta"]` (rope type `axial`)."""

    model_type: ClassVar[str] = "qwen3_omni_moe_vision_encoder"

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: Sequence[int] = (8, 16, 24)
    initializer_range: float = 0.02
    rope_theta: float = 10_000.0
    # runtime choices (not written to config.json)
    dtype: DTypeLike = "float32"
    param_dtype: DTypeLike = "float32"
    remat_policy: str = "none"
    attention_kernel: str = "auto"

    def __post_init__(self):
        _check_types(self)
        _positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                  "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be num_heads ({self.num_heads}) x a head_dim that is "
                f"a multiple of 4 (the 2-D rotary splits each head into row and column halves)"
            )
        side = int(round(self.num_position_embeddings**0.5))
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"num_position_embeddings must be a perfect square, got {self.num_position_embeddings}"
            )
        indexes = tuple(self.deepstack_visual_indexes)
        if len(set(indexes)) != len(indexes) or any(not 0 <= i < self.depth for i in indexes):
            raise ValueError(
                f"deepstack_visual_indexes must be distinct block indices in [0, {self.depth}), got "
                f"{list(indexes)}"
            )
        object.__setattr__(self, "deepstack_visual_indexes", indexes)
        if self.hidden_act not in _ENCODER_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; choose one of {_ENCODER_ACTIVATIONS}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        _check_runtime(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened `(channels, temporal_patch, patch, patch)` pixel row."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def replace(self, **changes: Any) -> "Qwen3OmniVisionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3OmniVisionConfig":
        """From HF's vision `config.json` dict (or the thinker's `vision_config`); unknown keys ignored."""
        data = dict(data)
        rope = dict(data.pop("rope_parameters", None) or {})
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"the Qwen3-Omni vision encoder supports only axial RoPE, got {rope}")
        theta = rope.get("rope_theta", data.pop("rope_theta", None))
        kwargs = _encoder_kwargs(cls, data)
        if isinstance(kwargs.get("deepstack_visual_indexes"), list):
            kwargs["deepstack_visual_indexes"] = tuple(kwargs["deepstack_visual_indexes"])
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        return cls(**{**kwargs, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in _ENCODER_RUNTIME_FIELDS}
        data["rope_parameters"] = {"rope_type": "axial", "rope_theta": data.pop("rope_theta")}
        data["deepstack_visual_indexes"] = list(self.deepstack_visual_indexes)
        data["model_type"] = self.model_type
        return data


@dataclasses.dataclass(frozen=True)
class Qwen3OmniAudioConfig:
    """Qwen3-Omni audio encoder (HF `Qwen3OmniMoeAudioEncoderConfig`); defaults are HF's class defaults.

    `n_window` must be 50: HF's `_get_feat_extract_output_lengths` hard-codes 13 output tokens per full
    100-frame chunk, which is only right for 100-frame (2 * 50) chunks. `n_window_infer` (frames) sets the
    attention window, `13 * (n_window_infer // 100)` tokens. `dropout`, `attention_dropout`,
    `activation_dropout`, `conv_chunksize` (HF's memory-saving split of the conv batch) and `scale_embedding`
    (computed but unused by HF) are kept for the round trip and have no effect here.
    """

    model_type: ClassVar[str] = "qwen3_omni_moe_audio_encoder"

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_function: str = "gelu"
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    initializer_range: float = 0.02
    max_source_positions: int = 1500
    n_window: int = 50
    output_dim: int = 3584
    n_window_infer: int = 800
    conv_chunksize: int = 500
    downsample_hidden_size: int = 480
    # runtime choices (not written to config.json)
    dtype: DTypeLike = "float32"
    param_dtype: DTypeLike = "float32"
    remat_policy: str = "none"
    attention_kernel: str = "auto"

    def __post_init__(self):
        _check_types(self)
        _positive(self, "num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                  "d_model", "max_source_positions", "n_window", "output_dim", "n_window_infer",
                  "conv_chunksize", "downsample_hidden_size")
        if self.n_window != 50:
            raise ValueError(
                f"n_window must be 50, got {self.n_window}: HF's _get_feat_extract_output_lengths hard-codes "
                f"13 tokens per 100-frame chunk (2 * n_window frames after three stride-2 convs), so any "
                f"other value selects the wrong valid frames; shrink num_mel_bins / d_model / "
                f"downsample_hidden_size instead"
            )
        if self.n_window_infer < 2 * self.n_window:
            raise ValueError(
                f"n_window_infer ({self.n_window_infer}) must be at least one chunk of 2 * n_window = "
                f"{2 * self.n_window} frames (HF's attention window is 13 * (n_window_infer // 100) tokens)"
            )
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by encoder_attention_heads "
                f"({self.encoder_attention_heads})"
            )
        if self.d_model % 2:
            raise ValueError(f"d_model must be even for the sinusoidal positions, got {self.d_model}")
        if self.max_source_positions < 13:
            raise ValueError(
                f"max_source_positions ({self.max_source_positions}) must cover the 13 positions of a "
                f"100-frame chunk"
            )
        if self.activation_function not in _ENCODER_ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; choose one of "
                f"{_ENCODER_ACTIVATIONS}"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check_runtime(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def conv_out_features(self) -> int:
        """Input size of `conv_out`: channels x mel bins left after three stride-2 convs."""
        return self.downsample_hidden_size * ((((self.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2)

    def replace(self, **changes: Any) -> "Qwen3OmniAudioConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3OmniAudioConfig":
        """From HF's audio `config.json` dict (or the thinker's `audio_config`); unknown keys are ignored."""
        return cls(**{**_encoder_kwargs(cls, data), **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in _ENCODER_RUNTIME_FIELDS}
        data["model_type"] = self.model_type
        return data


@dataclasses.dataclass(frozen=True)
class Qwen3OmniThinkerTextConfig(Qwen3MoeConfig):
    """The Qwen3-Omni thinker's text decoder (HF `Qwen3OmniMoeTextConfig`): Qwen3-MoE with interleaved MRoPE over
    (temporal, height, width) positions; `mrope_section` splits the `head_dim / 2` frequencies between the three
    axes. Defaults are Qwen3-Omni-30B-A3B's."""

    model_type: ClassVar[str] = "qwen3_omni_moe_text"
    architecture: ClassVar[str] = "Qwen3OmniMoeThinkerTextModel"

    vocab_size: int = 152064
    hidden_size: int = 2048
    intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    max_position_embeddings: int = 65536
    rope_theta: float = 1_000_000.0
    norm_topk_prob: bool = True  # HF's Qwen3OmniMoeTextConfig default (Qwen3MoeConfig's is False)
    hf_default_theta: ClassVar[float] = 1_000_000.0
    mrope_section: Sequence[int] = (24, 20, 20)
    mrope_interleaved: bool = True  # HF writes `interleaved`; its rotary is interleaved whatever the flag says

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        section = self.mrope_section
        if len(section) != 3 or any(not isinstance(s, int) or s < 0 for s in section):
            raise ValueError(f"mrope_section must be 3 non-negative ints (t, h, w), got {list(section)}")
        if sum(section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {list(section)} sums to {sum(section)}, but must sum to head_dim / 2 = "
                f"{self.head_dim // 2}"
            )
        if self.rope_scaling is not None:
            raise ValueError(
                f"the Omni thinker supports only the default MRoPE, got rope_scaling {dict(self.rope_scaling)}"
            )
        if self.use_sliding_window:
            raise ValueError("the Omni thinker text model has no sliding-window attention")

    __hash__ = Qwen3Config.__hash__

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3OmniThinkerTextConfig":
        rope = _rope_dict(data)
        if "mrope_section" in rope:
            overrides = {"mrope_section": tuple(rope["mrope_section"]), **overrides}
        interleaved = rope.get("interleaved", rope.get("mrope_interleaved"))
        if interleaved is not None:
            overrides = {"mrope_interleaved": bool(interleaved), **overrides}
        return super().from_hf_dict(data, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        data = super().to_hf_dict()
        data["rope_parameters"].update(mrope_section=list(data.pop("mrope_section")),
                                       interleaved=data.pop("mrope_interleaved"))
        for name in ("use_sliding_window", "architectures"):
            data.pop(name)
        return data


@dataclasses.dataclass(frozen=True)
class Qwen3OmniThinkerConfig:
    """Qwen3-Omni thinker (HF `Qwen3OmniMoeThinkerConfig`): text decoder, vision and audio encoders, and the
    special token ids that place the encoders' outputs in the token stream. Token-id defaults are HF's class
    defaults (`vision_start_token_id`, which HF reads but does not declare, is Qwen3-Omni's 151652).

    Runtime choices (never written to config.json): `freeze_encoders` (stop gradients at the encoder outputs, as
    MaxText does), and `checkpoint_prefix`, set to `"thinker."` when the config was read from a full
    `Qwen3OmniMoeForConditionalGeneration` checkpoint (its tensors are the thinker's under that prefix).
    """

    model_type: ClassVar[str] = "qwen3_omni_moe_thinker"
    architecture: ClassVar[str] = "Qwen3OmniMoeThinkerForConditionalGeneration"

    text_config: Qwen3OmniThinkerTextConfig = dataclasses.field(default_factory=Qwen3OmniThinkerTextConfig)
    vision_config: Qwen3OmniVisionConfig = dataclasses.field(
        default_factory=lambda: Qwen3OmniVisionConfig(out_hidden_size=2048))
    audio_config: Qwen3OmniAudioConfig = dataclasses.field(
        default_factory=lambda: Qwen3OmniAudioConfig(output_dim=2048))
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    audio_start_token_id: int = 151647
    user_token_id: int = 872
    position_id_per_seconds: int | float = 25
    tie_word_embeddings: bool = False
    # runtime choices
    freeze_encoders: bool = True
    checkpoint_prefix: str = ""

    _THINKER_RUNTIME: ClassVar[tuple[str, ...]] = ("freeze_encoders", "checkpoint_prefix")
    _TOKEN_IDS: ClassVar[tuple[str, ...]] = ("audio_token_id", "image_token_id", "video_token_id",
                                             "vision_start_token_id", "audio_start_token_id")

    def __post_init__(self):
        checks = ((self.text_config, Qwen3OmniThinkerTextConfig, "text_config"),
                  (self.vision_config, Qwen3OmniVisionConfig, "vision_config"),
                  (self.audio_config, Qwen3OmniAudioConfig, "audio_config"))
        for value, cls, name in checks:
            if not isinstance(value, cls):
                raise ValueError(f"Qwen3OmniThinkerConfig.{name} must be a {cls.__name__}, got {type(value).__name__}")
        _check_types(self)
        vocab = self.text_config.vocab_size
        ids = {name: getattr(self, name) for name in self._TOKEN_IDS}
        bad = {k: v for k, v in ids.items() if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab}
        if bad:
            raise ValueError(f"special token ids must be ints in [0, vocab_size={vocab}), got {bad}")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"special token ids must be distinct, got {ids}")
        if not self.position_id_per_seconds > 0:
            raise ValueError(f"position_id_per_seconds must be positive, got {self.position_id_per_seconds}")
        hidden = self.text_config.hidden_size
        if self.vision_config.out_hidden_size != hidden:
            raise ValueError(
                f"vision_config.out_hidden_size ({self.vision_config.out_hidden_size}) must equal "
                f"text_config.hidden_size ({hidden})"
            )
        if self.audio_config.output_dim != hidden:
            raise ValueError(
                f"audio_config.output_dim ({self.audio_config.output_dim}) must equal text_config.hidden_size "
                f"({hidden})"
            )
        if self.tie_word_embeddings != self.text_config.tie_word_embeddings:
            raise ValueError(
                f"tie_word_embeddings ({self.tie_word_embeddings}) and text_config.tie_word_embeddings "
                f"({self.text_config.tie_word_embeddings}) must agree (HF ties by the thinker-level flag)"
            )

    def __hash__(self) -> int:
        return _hash(self)

    @property
    def dtype(self) -> str:
        return self.text_config.dtype

    @property
    def param_dtype(self) -> str:
        return self.text_config.param_dtype

    def replace(self, **changes: Any) -> "Qwen3OmniThinkerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3OmniThinkerConfig":
        """From a thinker `config.json` (`qwen3_omni_moe_thinker`) or a full Qwen3-Omni one (`qwen3_omni_moe`,
        thinker under `thinker_config`). Overrides naming thinker fields apply to the thinker; the encoders'
        runtime fields (`dtype`, `param_dtype`, `remat_policy`, `attention_kernel`) to every sub-config; any other
        override to `text_config` (e.g. `moe_impl`)."""
        data = dict(data)
        prefix = ""
        if "thinker_config" in data:
            data, prefix = dict(data["thinker_config"] or {}), "thinker."
        tie = bool(overrides.pop("tie_word_embeddings", data.get("tie_word_embeddings", False)))
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: v for k, v in overrides.items() if k in names and not k.endswith("_config")}
        dtypes = {k: v for k, v in overrides.items() if k in _ENCODER_RUNTIME_FIELDS}
        text_overrides = {k: v for k, v in overrides.items() if k not in mine}
        text = dict(data.get("text_config") or {}, tie_word_embeddings=tie)
        kwargs = {k: data[k] for k in cls._TOKEN_IDS + ("user_token_id", "position_id_per_seconds") if k in data}
        return cls(
            text_config=Qwen3OmniThinkerTextConfig.from_hf_dict(text, **text_overrides),
            vision_config=Qwen3OmniVisionConfig.from_hf_dict(data.get("vision_config") or {}, **dtypes),
            audio_config=Qwen3OmniAudioConfig.from_hf_dict(data.get("audio_config") or {}, **dtypes),
            tie_word_embeddings=tie,
            **{**kwargs, "checkpoint_prefix": prefix, **mine},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The thinker `config.json` transformers 5 writes (`Qwen3OmniMoeThinkerForConditionalGeneration`)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self._THINKER_RUNTIME and not f.name.endswith("_config")}
        data.update(
            text_config=self.text_config.to_hf_dict(), vision_config=self.vision_config.to_hf_dict(),
            audio_config=self.audio_config.to_hf_dict(), model_type=self.model_type,
            architectures=[self.architecture], dtype=self.param_dtype,
        )
        return data
