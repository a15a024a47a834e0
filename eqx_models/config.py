"""Model configs: frozen dataclasses with HF `config.json` field names, validated on construction.

`from_hf_dict` reads both transformers-5 `rope_parameters` and the legacy `rope_theta` / `rope_scaling` keys found
on the Hub; `to_hf_dict` writes what transformers 5 writes. Fields that are ours, not HF's (`dtype`,
`param_dtype`, `remat_policy`, `attention_kernel`, `moe_impl`, ...) are runtime choices and never go to disk.
"""

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

REMAT_POLICIES = ("none", "full", "minimal", "minimal_with_context", "save_dot_except_mlp", "save_qkv_proj")
ROPE_TYPES = ("default", "linear", "yarn")
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_kernel", "moe_impl", "moe_capacity_factor",
                   "mtp_num_layers", "mtp_loss_scaling_factor")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Dense Qwen3 (HF `Qwen3Config`). Defaults are Qwen3-0.6B's."""

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"

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
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # runtime choices (not written to config.json)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_kernel: str = "auto"
    mtp_num_layers: int = 0  # multi-token prediction depths (training side-car; not in HF checkpoints)
    mtp_loss_scaling_factor: float = 0.1

    def __post_init__(self):
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
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; choose one of {ROPE_TYPES}")
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling, rope_type=rope_type))
        if self.use_sliding_window and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"use_sliding_window needs sliding_window >= 1, got {self.sliding_window}")
        if not isinstance(self.mtp_num_layers, int) or self.mtp_num_layers < 0:
            raise ValueError(f"mtp_num_layers must be a non-negative int, got {self.mtp_num_layers!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_kernel not in ("auto", "dot_product", "cudnn"):
            raise ValueError(f"attention_kernel must be 'auto', 'dot_product' or 'cudnn', got {self.attention_kernel!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be 'float32', 'bfloat16' or 'float16', got {getattr(self, name)!r}")
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported")

    def __hash__(self) -> int:
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def layer_uses_sliding_window(self, layer: int) -> bool:
        """HF Qwen3: sliding attention on layers `>= max_window_layers` when `use_sliding_window`."""
        return self.use_sliding_window and layer >= self.max_window_layers

    def replace(self, **changes: Any) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "Qwen3Config":
        """From a parsed HF `config.json` (either RoPE format); unknown keys are ignored."""
        data = dict(data)
        if "num_local_experts" in data:  # transformers 5 writes this alias of num_experts
            data.setdefault("num_experts", data.pop("num_local_experts"))
        rope = dict(data.pop("rope_parameters", None) or {})
        legacy = data.pop("rope_scaling", None)
        if legacy:
            rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", data.pop("rope_theta", None))
        rope.pop("partial_rotary_factor", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        kwargs = {k: v for k, v in data.items() if k in names}
        if isinstance(kwargs.get("mlp_only_layers"), list):
            kwargs["mlp_only_layers"] = tuple(kwargs["mlp_only_layers"])
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = None if rope_type == "default" else rope
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        return cls(**{**kwargs, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers 5 writes for this model."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME_FIELDS}
        theta, scaling = data.pop("rope_theta"), data.pop("rope_scaling")
        data["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        if isinstance(data.get("mlp_only_layers"), tuple):
            data["mlp_only_layers"] = list(data["mlp_only_layers"])
        data["layer_types"] = [
            "sliding_attention" if self.layer_uses_sliding_window(i) else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        data.update(model_type=self.model_type, architectures=[self.architecture], dtype=self.param_dtype)
        return data


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    """Qwen3-MoE (HF `Qwen3MoeConfig`). Defaults are Qwen3-30B-A3B's shape except the HF class default
    `norm_topk_prob=False`, which we keep so configs without the key load as HF loads them."""

    model_type: ClassVar[str] = "qwen3_moe"
    architecture: ClassVar[str] = "Qwen3MoeForCausalLM"

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
    moe_impl: str = "sorted"
    moe_capacity_factor: float | None = None

    def __post_init__(self):
        super().__post_init__()
        _positive(self, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})"
            )
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layers of a {self.num_hidden_layers}-layer model")
        if self.moe_impl not in ("sorted", "dense"):
            raise ValueError(f"moe_impl must be 'sorted' or 'dense', got {self.moe_impl!r}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor must be positive or None, got {self.moe_capacity_factor}")

    __hash__ = Qwen3Config.__hash__  # the dataclass decorator would otherwise replace it

    def layer_is_moe(self, layer: int) -> bool:
        """HF: MoE unless listed in `mlp_only_layers`, on every `decoder_sparse_step`-th layer."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0
