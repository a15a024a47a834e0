"""HuggingFace checkpoints <-> our pytrees: `from_pretrained` and `save_pretrained`.

One table of `Rule`s per model family maps every HF tensor to a slice of one of our (stacked) leaves, with the
transform each way; loading and saving read the same table. Loading builds a shape-only skeleton with
`eqx.filter_eval_shape`, fills it tensor by tensor from safetensors (single file or sharded index), and is strict:
missing, unexpected and wrongly shaped tensors are all named in one error. Never pickle.
"""

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import DTypeLike
from jaxtyping import PRNGKeyArray
from safetensors import safe_open
from safetensors.numpy import save_file

from eqx_models import partitioning
from eqx_models.config import (
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
    Qwen3OmniAudioConfig,
    Qwen3OmniThinkerConfig,
    Qwen3OmniVisionConfig,
)
from eqx_models.models.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM, Qwen3NextForCausalLM
from eqx_models.models.qwen3_omni import Qwen3OmniThinkerForConditionalGeneration

Transform = Callable[[np.ndarray], np.ndarray]


class Rule(NamedTuple):
    """HF tensor `hf_key` is `to_hf(leaf[index])`; loading writes `to_ours(tensor)` into `leaf[index]`."""

    hf_key: str
    leaf: str  # our leaf's path, as `jax.tree_util.keystr` prints it
    index: tuple
    to_ours: Transform
    to_hf: Transform


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def _in_heads(heads: int) -> tuple[Transform, Transform]:
    """torch `(heads * head_dim, embed)` <-> ours `(embed, heads, head_dim)`."""
    return (lambda w: w.T.reshape(w.shape[1], heads, -1)), (lambda k: k.reshape(k.shape[0], -1).T)


def _out_heads(heads: int) -> tuple[Transform, Transform]:
    """torch `(embed, heads * head_dim)` <-> ours `(heads, head_dim, embed)`."""
    return (lambda w: w.T.reshape(heads, -1, w.shape[0])), (lambda k: k.reshape(-1, k.shape[-1]).T)


def _bias_heads(heads: int) -> tuple[Transform, Transform]:
    return (lambda b: b.reshape(heads, -1)), (lambda b: b.reshape(-1))


def _leaf_paths(tree: Any) -> Any:
    """A tree like `tree` whose array leaves are replaced by their path strings."""
    return jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path), tree)


class _Layer(NamedTuple):
    """Where HF layer `i` lives in our stacked blocks."""

    hf: str  # e.g. "model.layers.3."
    block: Any  # the labelled block (leaves are path strings)
    repeat: int


def _layers(labels: Any, num_layers: int) -> Iterator[_Layer]:
    blocks = labels.transformer.blocks
    for i in range(num_layers):
        repeat, position = divmod(i, len(blocks))
        yield _Layer(f"model.layers.{i}.", blocks[position], repeat)


def _self_attention_rules(cfg: Qwen3Config, hf: str, sa: Any, repeat: int) -> list[Rule]:
    """q/k/v/o projections (a gated query is `(heads, 2 * head_dim)`, HF's per-head `[query | gate]`), q/k norms
    and the optional biases of one `Attention`."""
    r = (repeat,)
    q_in, q_out = _in_heads(cfg.num_attention_heads)
    kv_in, kv_out = _in_heads(cfg.num_key_value_heads)
    o_in, o_out = _out_heads(cfg.num_attention_heads)
    rules = [
        Rule(hf + "q_proj.weight", sa.query.kernel, r, q_in, q_out),
        Rule(hf + "k_proj.weight", sa.key.kernel, r, kv_in, kv_out),
        Rule(hf + "v_proj.weight", sa.value.kernel, r, kv_in, kv_out),
        Rule(hf + "o_proj.weight", sa.out.kernel, r, o_in, o_out),
        Rule(hf + "q_norm.weight", sa.query_norm.scale, r, _identity, _identity),
        Rule(hf + "k_norm.weight", sa.key_norm.scale, r, _identity, _identity),
    ]
    if cfg.attention_bias:
        rules += [
            Rule(hf + "q_proj.bias", sa.query.bias, r, *_bias_heads(cfg.num_attention_heads)),
            Rule(hf + "k_proj.bias", sa.key.bias, r, *_bias_heads(cfg.num_key_value_heads)),
            Rule(hf + "v_proj.bias", sa.value.bias, r, *_bias_heads(cfg.num_key_value_heads)),
            Rule(hf + "o_proj.bias", sa.out.bias, r, _identity, _identity),
        ]
    return rules


def _attention_rules(cfg: Qwen3Config, layer: _Layer) -> list[Rule]:
    attn, r = layer.block.attention, (layer.repeat,)
    return [
        Rule(layer.hf + "input_layernorm.weight", attn.pre_self_attention_layer_norm.scale, r, _identity, _identity),
        Rule(layer.hf + "post_attention_layernorm.weight", attn.post_self_attention_layer_norm.scale, r,
             _identity, _identity),
        *_self_attention_rules(cfg, layer.hf + "self_attn.", attn.self_attention, layer.repeat),
    ]


def _mlp_rules(hf: str, mlp: Any, repeat: int) -> list[Rule]:
    """SwiGLU MLP: our fused `wi (embed, 2, mlp)` holds `[gate, up]`."""
    r = (repeat,)
    return [
        Rule(hf + "gate_proj.weight", mlp.wi.kernel, (repeat, slice(None), 0), _transpose, _transpose),
        Rule(hf + "up_proj.weight", mlp.wi.kernel, (repeat, slice(None), 1), _transpose, _transpose),
        Rule(hf + "down_proj.weight", mlp.wo.kernel, r, _transpose, _transpose),
    ]


def _moe_rules(cfg: Qwen3MoeConfig, hf: str, moe: Any, repeat: int) -> list[Rule]:
    """Routed experts in the per-expert on-disk (Hub) layout."""
    rules = [Rule(hf + "gate.weight", moe.gate.kernel, (repeat,), _transpose, _transpose)]
    for e in range(cfg.num_experts):
        expert = f"{hf}experts.{e}."
        rules += [
            Rule(expert + "gate_proj.weight", moe.wi, (repeat, e, slice(None), 0), _transpose, _transpose),
            Rule(expert + "up_proj.weight", moe.wi, (repeat, e, slice(None), 1), _transpose, _transpose),
            Rule(expert + "down_proj.weight", moe.wo, (repeat, e), _transpose, _transpose),
        ]
    return rules


def _outer_rules(cfg: Qwen3Config, t: Any) -> list[Rule]:
    """The token embedding, final norm and (untied) LM head of a decoder `Transformer`."""
    rules = [
        Rule("model.embed_tokens.weight", t.embed.embedding, (), _identity, _identity),
        Rule("model.norm.weight", t.norm.scale, (), _identity, _identity),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", t.lm_head.kernel, (), _transpose, _transpose))
    return rules


def qwen3_rules(cfg: Qwen3Config, labels: Any) -> list[Rule]:
    """Every tensor of an HF Qwen3 / Qwen3-MoE checkpoint."""
    rules = _outer_rules(cfg, labels.transformer)
    for layer in _layers(labels, cfg.num_hidden_layers):
        rules += _attention_rules(cfg, layer)
        if hasattr(layer.block, "moe_block"):
            rules += _moe_rules(cfg, layer.hf + "mlp.", layer.block.moe_block, layer.repeat)
        else:
            rules += _mlp_rules(layer.hf + "mlp.", layer.block.mlp, layer.repeat)
    return rules


def _conv_weight() -> tuple[Transform, Transform]:
    """torch depthwise `(channels, 1, kernel)` <-> ours `(kernel, channels)`."""
    return (lambda w: w[:, 0, :].T), (lambda w: w.T[:, None, :])


def qwen3_next_rules(cfg: Qwen3NextConfig, labels: Any) -> list[Rule]:
    """Every tensor of an HF Qwen3-Next checkpoint (layer `i` is layer `i % period` of block repeat
    `i // period`)."""
    t = labels.transformer
    rules = _outer_rules(cfg, t)
    layers = t.blocks[0].layers
    for i in range(cfg.num_hidden_layers):
        repeat, position = divmod(i, len(layers))
        layer, hf, r = layers[position], f"model.layers.{i}.", (repeat,)
        rules += [
            Rule(hf + "input_layernorm.weight", layer.input_layernorm.scale, r, _identity, _identity),
            Rule(hf + "post_attention_layernorm.weight", layer.post_attention_layernorm.scale, r, _identity, _identity),
        ]
        if cfg.layer_types[i] == "linear_attention":
            gdn, p = layer.mixer, hf + "linear_attn."
            rules += [
                Rule(p + "in_proj_qkvz.weight", gdn.in_proj_qkvz.kernel, r, *_in_heads(cfg.linear_num_key_heads)),
                Rule(p + "in_proj_ba.weight", gdn.in_proj_ba.kernel, r, *_in_heads(cfg.linear_num_key_heads)),
                Rule(p + "conv1d.weight", gdn.conv.weight, r, *_conv_weight()),
                Rule(p + "A_log", gdn.A_log, r, _identity, _identity),
                Rule(p + "dt_bias", gdn.dt_bias, r, _identity, _identity),
                Rule(p + "norm.weight", gdn.norm.scale, r, _identity, _identity),
                Rule(p + "out_proj.weight", gdn.out_proj.kernel, r, *_out_heads(cfg.linear_num_value_heads)),
            ]
        else:
            rules += _self_attention_rules(cfg, hf + "self_attn.", layer.mixer.attention, repeat)
        if cfg.layer_is_moe(i):
            moe = layer.mlp
            rules += _moe_rules(cfg, hf + "mlp.", moe.experts, repeat)
            rules += _mlp_rules(hf + "mlp.shared_expert.", moe.shared_expert, repeat)
            rules.append(Rule(hf + "mlp.shared_expert_gate.weight", moe.shared_expert_gate.kernel, r,
                              _transpose, _transpose))
        else:
            rules += _mlp_rules(hf + "mlp.", layer.mlp, repeat)
    return rules


# ----------------------------------------------------------------------------------------------------------
# Qwen3-Omni thinker: vision and audio encoder rules (also usable on their own), the thinker's table


def _layer_norm_rules(hf: str, norm: Any, index: tuple) -> list[Rule]:
    return [Rule(hf + "weight", norm.scale, index, _identity, _identity),
            Rule(hf + "bias", norm.bias, index, _identity, _identity)]


def _linear_rules(hf: str, linear: Any, index: tuple) -> list[Rule]:
    """torch `Linear` weight `(out, in)` and bias <-> our 2-D kernel `(in, out)` and bias."""
    return [Rule(hf + "weight", linear.kernel, index, _transpose, _transpose),
            Rule(hf + "bias", linear.bias, index, _identity, _identity)]


def _plain_mlp_rules(fc1: str, fc2: str, mlp: Any, repeat: int) -> list[Rule]:
    """A one-activation `MLP` with biases: `wi (embed, 1, hidden)` <- fc1, `wo` <- fc2."""
    return [
        Rule(fc1 + "weight", mlp.wi.kernel, (repeat, slice(None), 0), _transpose, _transpose),
        Rule(fc1 + "bias", mlp.wi.bias, (repeat, 0), _identity, _identity),
        *_linear_rules(fc2, mlp.wo, (repeat,)),
    ]


def _patch_merger_rules(hf: str, merger: Any) -> list[Rule]:
    return [*_layer_norm_rules(hf + "ln_q.", merger.ln_q, ()),
            *_linear_rules(hf + "mlp.0.", merger.mlp_0, ()),
            *_linear_rules(hf + "mlp.2.", merger.mlp_2, ())]


def vision_rules(cfg: Qwen3OmniVisionConfig, labels: Any, prefix: str = "visual.") -> list[Rule]:
    """Every tensor of HF's `Qwen3OmniMoeVisionEncoder` under `prefix`, for a labelled
    `Qwen3OmniMoeVisionEncoder` (`labels`: the encoder with leaves replaced by their path strings)."""
    d, heads = cfg.hidden_size, cfg.num_heads
    conv_shape = (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    rules = [
        # Conv3d weight (embed, C, T, P, P) == a Linear over the flattened (C, T, P, P) pixel row
        Rule(prefix + "patch_embed.proj.weight", labels.patch_embed.proj.kernel, (),
             lambda w: w.reshape(d, -1).T, lambda k: k.T.reshape(conv_shape)),
        Rule(prefix + "patch_embed.proj.bias", labels.patch_embed.proj.bias, (), _identity, _identity),
        Rule(prefix + "pos_embed.weight", labels.pos_embed.pos_embed, (), _identity, _identity),
    ]
    o_in, o_out = _out_heads(heads)
    blocks = labels.blocks
    for i in range(cfg.depth):
        hf, r = f"{prefix}blocks.{i}.", (i,)
        rules += [
            *_layer_norm_rules(hf + "norm1.", blocks.norm1, r),
            *_layer_norm_rules(hf + "norm2.", blocks.norm2, r),
            # fused rows [q heads | k heads | v heads] <-> (embed, 3, heads, head_dim)
            Rule(hf + "attn.qkv.weight", blocks.attn.qkv.kernel, r,
                 lambda w: w.T.reshape(d, 3, heads, -1), lambda k: k.reshape(d, -1).T),
            Rule(hf + "attn.qkv.bias", blocks.attn.qkv.bias, r,
                 lambda b: b.reshape(3, heads, -1), lambda b: b.reshape(-1)),
            Rule(hf + "attn.proj.weight", blocks.attn.proj.kernel, r, o_in, o_out),
            Rule(hf + "attn.proj.bias", blocks.attn.proj.bias, r, _identity, _identity),
            *_plain_mlp_rules(hf + "mlp.linear_fc1.", hf + "mlp.linear_fc2.", blocks.mlp, i),
        ]
    for j, merger in enumerate(labels.deepstack_mergers):
        rules += _patch_merger_rules(f"{prefix}merger_list.{j}.", merger)
    return rules + _patch_merger_rules(prefix + "merger.", labels.projector.merger)


def audio_rules(cfg: Qwen3OmniAudioConfig, labels: Any, prefix: str = "audio_tower.") -> list[Rule]:
    """Every tensor of HF's `Qwen3OmniMoeAudioEncoder` under `prefix`, for a labelled
    `Qwen3OmniAudioEncoder`."""
    heads = cfg.encoder_attention_heads
    rules = []
    for n in (1, 2, 3):
        conv = getattr(labels, f"conv2d{n}")
        rules += [
            # torch (out, in, kh, kw) <-> ours (kh, kw, in, out)
            Rule(f"{prefix}conv2d{n}.weight", conv.kernel, (), lambda w: w.transpose(2, 3, 1, 0),
                 lambda k: k.transpose(3, 2, 0, 1)),
            Rule(f"{prefix}conv2d{n}.bias", conv.bias, (), _identity, _identity),
        ]
    rules.append(Rule(prefix + "conv_out.weight", labels.conv_out.kernel, (), _transpose, _transpose))
    in_w, in_w_hf = _in_heads(heads)
    in_b, in_b_hf = _bias_heads(heads)
    o_in, o_out = _out_heads(heads)
    layers = labels.layers
    for i in range(cfg.encoder_layers):
        hf, r, sa = f"{prefix}layers.{i}.", (i,), layers.self_attention
        rules += _layer_norm_rules(hf + "self_attn_layer_norm.", layers.input_layer_norm, r)
        for name, proj in (("q_proj", sa.query), ("k_proj", sa.key), ("v_proj", sa.value)):
            rules += [Rule(f"{hf}self_attn.{name}.weight", proj.kernel, r, in_w, in_w_hf),
                      Rule(f"{hf}self_attn.{name}.bias", proj.bias, r, in_b, in_b_hf)]
        rules += [
            Rule(hf + "self_attn.out_proj.weight", sa.out.kernel, r, o_in, o_out),
            Rule(hf + "self_attn.out_proj.bias", sa.out.bias, r, _identity, _identity),
            *_layer_norm_rules(hf + "final_layer_norm.", layers.post_attention_layer_norm, r),
            *_plain_mlp_rules(hf + "fc1.", hf + "fc2.", layers.mlp, i),
        ]
    return [
        *rules,
        *_layer_norm_rules(prefix + "ln_post.", labels.ln_post, ()),
        *_linear_rules(prefix + "proj1.", labels.projector.proj1, ()),
        *_linear_rules(prefix + "proj2.", labels.projector.proj2, ()),
    ]


def qwen3_omni_thinker_rules(cfg: Qwen3OmniThinkerConfig, labels: Any) -> list[Rule]:
    """Every tensor of an HF thinker checkpoint in its own layout: the text decoder as Qwen3-MoE (`model.*`,
    `lm_head.weight`), `visual.*`, `audio_tower.*` (a full Qwen3-Omni checkpoint adds `thinker.` in front,
    see `checkpoint_prefix`)."""
    return [
        *qwen3_rules(cfg.text_config, labels),
        *vision_rules(cfg.vision_config, labels.visual, "visual."),
        *audio_rules(cfg.audio_config, labels.audio_tower, "audio_tower."),
    ]


# model_type -> (config class, model class, rules); a full Qwen3-Omni checkpoint (thinker + talker + code2wav)
# loads as its thinker, and saving writes the thinker-only layout
MODELS: dict[str, tuple[type, type, Callable[[Any, Any], list[Rule]]]] = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, qwen3_rules),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, qwen3_rules),
    "qwen3_next": (Qwen3NextConfig, Qwen3NextForCausalLM, qwen3_next_rules),
    "qwen3_omni_moe_thinker": (Qwen3OmniThinkerConfig, Qwen3OmniThinkerForConditionalGeneration,
                               qwen3_omni_thinker_rules),
    "qwen3_omni_moe": (Qwen3OmniThinkerConfig, Qwen3OmniThinkerForConditionalGeneration, qwen3_omni_thinker_rules),
}


# ----------------------------------------------------------------------------------------------------------
# Files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_STAGING = ".save_pretrained.tmp-"  # the prefix of `save_pretrained`'s staging folder inside its `out_dir`


def is_checkpoint_file(name: str) -> bool:
    """Whether `name` is one of the files `save_pretrained` writes (and so replaces) in its directory."""
    return name in (CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE) or _SHARD.fullmatch(name) is not None


# safetensors dtype names -> NumPy dtypes (all stored little-endian)
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": jnp.bfloat16, "F8_E4M3": jnp.float8_e4m3fn,
    "F8_E5M2": jnp.float8_e5m2, "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4",
    "U16": "<u2", "U8": "u1", "BOOL": "?",
}


class _Stored(NamedTuple):
    """Where a checkpoint tensor lies: its file, the file's bytes, and its header entry."""

    file: Path
    data: np.ndarray
    entry: dict[str, Any]


class _SafetensorsReader:
    """Tensors of a checkpoint directory, as transformers finds them: `model.safetensors`, else the shards
    `model.safetensors.index.json` names (other safetensors files are ignored). Each file is checked by `safe_open`
    once and memory-mapped, and a tensor is read as a view of the mapping: the only copy made of it is the one
    into the model's buffer."""

    def __init__(self, path: Path):
        index = path / INDEX_FILE
        if (path / WEIGHTS_FILE).exists():
            files, weight_map = [WEIGHTS_FILE], None
        elif index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{index} has no weight_map object (tensor name -> shard file name)")
            files = sorted(set(weight_map.values()))
        else:
            raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")
        self.stored: dict[str, _Stored] = {}
        for name in files:
            file = path / name
            if not file.exists():
                raise FileNotFoundError(f"checkpoint shard {file} listed in the index is missing")
            try:
                keys = safe_open(file, framework="numpy").keys()  # validates the header against the file's size
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
            with open(file, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                entries = json.loads(f.read(length))
            data = np.memmap(file, np.uint8, mode="r", offset=8 + length) if os.path.getsize(file) > 8 + length \
                else np.zeros(0, np.uint8)
            for key in keys:
                if entries[key]["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{file}: tensor {key} has dtype {entries[key]['dtype']}, which we cannot read; "
                                     f"readable: {', '.join(_SAFETENSORS_DTYPES)}")
                if key in self.stored:  # in two shards: the one the index names
                    owner = weight_map.get(key)
                    if owner not in (name, self.stored[key].file.name):
                        raise ValueError(f"tensor {key} is in both {self.stored[key].file} and {file}, and the "
                                         "index names neither")
                    if owner != name:
                        continue
                self.stored[key] = _Stored(file, data, entries[key])
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if k not in self.stored
                            or self.stored[k].file != path / f)
            if absent:
                raise ValueError(f"tensors listed in the index are not in their shard: {absent[:10]}")

    def keys(self) -> set[str]:
        return set(self.stored)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.stored[key].entry["shape"])

    def get(self, key: str) -> np.ndarray:
        stored = self.stored[key]
        start, end = stored.entry["data_offsets"]
        return stored.data[start:end].view(_SAFETENSORS_DTYPES[stored.entry["dtype"]]).reshape(stored.entry["shape"])


def _listing(items: list[str], limit: int = 20) -> str:
    shown = "; ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}; ... and {len(items) - limit} more"


def read_json(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; a ValueError naming the file if it is not valid JSON or not an object."""
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike, dtype: DTypeLike | None = None, **overrides: Any) -> Any:
    """The config of an HF checkpoint directory, as our config class for its `model_type`, with parameter and
    compute dtype `dtype` (default: the checkpoint's `dtype`, else float32). An unusable result is a ValueError
    naming config.json when the file alone is at fault, else the keyword argument(s) that are."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    data = read_json(config_file)
    model_type = data.get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported; supported: {sorted(MODELS)}")
    saved = data.get("dtype", data.get("torch_dtype"))
    saved = saved if saved in ("float32", "bfloat16", "float16") else "float32"
    cls = MODELS[model_type][0]
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not fields of {cls.__name__}, so they cannot override its config")
    keywords = overrides if dtype is None else {"dtype": dtype, **overrides}

    def build(given: dict[str, Any]) -> Any:
        name = jnp.dtype(given.get("dtype", saved)).name
        return cls.from_hf_dict(data, **{"param_dtype": name, **given, "dtype": name})

    try:
        return build(keywords)
    except (TypeError, ValueError) as e:
        error = e
    try:
        build({})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file} is not a usable config: {e}") from None
    # the file is fine, so the keyword arguments are to blame: name the one that fails alone, else all of them
    for keyword, value in keywords.items():
        try:
            build({keyword: value})
        except (TypeError, ValueError) as e:
            raise ValueError(f"from_pretrained({keyword}=...): {e}") from None
    raise ValueError(f"from_pretrained({'=..., '.join(keywords)}=...): {error}") from None


class _Tensors:
    """In-memory tensors (HF key -> array) with the interface of `_SafetensorsReader`."""

    def __init__(self, tensors: Mapping[str, Any]):
        self.tensors = tensors

    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self.tensors[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.tensors[key])


_TILE = 256


def _assign(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src`, casting as NumPy assignment does. When the axes fast in memory differ (a transposed
    tensor), in tiles `_TILE` wide on those two axes and one wide on the others: NumPy walks `dst` in memory
    order, so a whole transposed copy misses the cache on every read (0.3 GB/s; 1.8-2 GB/s in tiles)."""
    fastest = lambda a: min((i for i in range(a.ndim) if a.shape[i] > 1),  # noqa: E731
                            key=lambda i: abs(a.strides[i]), default=None)
    read, write = fastest(src), fastest(dst)
    if read == write or src.size <= _TILE * _TILE:
        dst[...] = src
        return
    tiled = (read, write)
    corners = [range(0, n, _TILE) if a in tiled else range(n) for a, n in enumerate(src.shape)]
    for corner in itertools.product(*corners):
        tile = tuple(slice(c, c + _TILE) if a in tiled else c for a, c in enumerate(corner))
        dst[tile] = src[tile]


def _copying_threads() -> ThreadPoolExecutor:
    """Threads for tensor copies (NumPy releases the GIL while copying): one per core, up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(min(8, cores))


def _aligned_empty(shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """`np.empty` at a 64-byte aligned address, which jax's CPU backend takes without a copy."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


def _hf_shape(rule: Rule, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `rule`'s HF tensor for our leaf of `leaf_shape`, found on a broadcast view (nothing
    allocated)."""
    return rule.to_hf(np.broadcast_to(np.zeros((), np.int8), leaf_shape)[rule.index]).shape


def load_rules(
    skeleton: Any,
    rules: list[Rule],
    tensors: Mapping[str, Any] | _SafetensorsReader,
    *,
    source: str = "the given tensors",
    ignore: Callable[[str], bool] = lambda key: False,
) -> Any:
    """`skeleton` (a module of arrays or `jax.ShapeDtypeStruct`s) with every leaf filled through `rules` from
    `tensors` (HF key -> array, or a checkpoint reader, read tensor by tensor), each in its skeleton dtype.
    Strict: missing, unexpected (unless `ignore(key)`) and wrongly shaped tensors, and parameters no rule
    covers, are all named in one ValueError, before any tensor is read. Leaves are assembled one at a time in
    their own dtype (a bf16 checkpoint loads into bf16 without a float32 copy), so host memory holds one leaf
    beyond the model."""
    reader = tensors if isinstance(tensors, _SafetensorsReader) else _Tensors(tensors)
    leaves = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(skeleton)[0]
              if isinstance(leaf, jax.ShapeDtypeStruct) or eqx.is_array(leaf)}
    by_leaf: dict[str, list[Rule]] = {p: [] for p in leaves}
    depth = {p: max((len(r.index) for r in rules if r.leaf == p), default=0) for p in leaves}
    covered = {p: np.zeros(leaf.shape[: depth[p]], bool) for p, leaf in leaves.items()}  # by index prefix
    available = {key for key in reader.keys() if not ignore(key)}
    missing, wrong_shape = [], []
    for rule in rules:
        if rule.hf_key not in available:
            missing.append(rule.hf_key)
            continue
        expected = _hf_shape(rule, leaves[rule.leaf].shape)
        if reader.shape(rule.hf_key) != expected:
            wrong_shape.append(f"{rule.hf_key}: got {reader.shape(rule.hf_key)}, expected {expected}")
            continue
        by_leaf[rule.leaf].append(rule)
        covered[rule.leaf][rule.index] = True
    unexpected = sorted(available - {rule.hf_key for rule in rules})
    uncovered = [p for p, c in covered.items() if not c.all()]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"wrongly shaped tensors ({len(wrong_shape)}): {_listing(wrong_shape)}")
    if uncovered and not (missing or wrong_shape):
        problems.append(f"parameters with no tensor: {_listing(uncovered)}")
    if problems:
        raise ValueError(f"cannot load {type(skeleton).__name__} from {source}:\n  " + "\n  ".join(problems))

    def read(buffer: np.ndarray, rule: Rule) -> None:
        with np.errstate(over="ignore"):  # to inf, as torch's `tensor.to(dtype)` and transformers do
            _assign(buffer[rule.index], rule.to_ours(reader.get(rule.hf_key)))

    def fill(path: Any, leaf: Any) -> Any:
        name = jax.tree_util.keystr(path)
        if name not in leaves:
            return leaf
        buffer = _aligned_empty(leaf.shape, leaf.dtype)
        for done in [pool.submit(read, buffer, rule) for rule in by_leaf[name]]:
            done.result()
        # placed as the skeleton leaf says (a `partitioning.shard`ed skeleton: each device gets its shards) and
        # the transfer finished before the next leaf's buffer is made (on CPU the aligned buffer may become the
        # array itself, without a copy)
        return jax.device_put(buffer, getattr(leaf, "sharding", None)).block_until_ready()

    with _copying_threads() as pool:
        return jax.tree_util.tree_map_with_path(fill, skeleton)


def from_pretrained(path: str | os.PathLike, dtype: DTypeLike | None = None, *, mesh: Mesh | None = None,
                    rules: partitioning.Rules | None = None, key: PRNGKeyArray | None = None,
                    **config_overrides: Any) -> eqx.Module:
    """Loads an HF checkpoint directory (config.json + safetensors); the class follows `model_type`.

    `dtype` sets both the parameter and compute dtype (default: the checkpoint's `dtype`, as transformers does,
    else float32); other keyword arguments override config fields (e.g. `remat_policy="full"`). With `mesh`,
    each parameter is placed on it as it is read, by `partitioning.shard`'s `rules` (default
    `partitioning.DEFAULT_RULES`), so a model larger than one device loads; the result equals
    `partitioning.shard(from_pretrained(path), mesh, rules)`. No network access.

    HF checkpoints hold no multi-token-prediction head: with `mtp_num_layers=k` it is initialised from `key`, as
    the model class would (for fine-tuning with MTP on a released model).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = read_config(path, dtype=dtype, **config_overrides)
    _, model_cls, rules_fn = MODELS[cfg.model_type]
    if rules is not None and mesh is None:
        raise ValueError("from_pretrained(rules=...) places parameters on a mesh: pass mesh= too")
    skeleton = eqx.filter_eval_shape(model_cls, cfg, key=jax.random.key(0))
    if mesh is not None:
        skeleton = partitioning.shard(skeleton, mesh, rules)
    mtp = None
    if skeleton.transformer.mtp is not None:
        if key is None:
            raise ValueError("from_pretrained(mtp_num_layers=...): HF checkpoints hold no multi-token-prediction "
                             "head; pass key= to initialise it")
        mtp = eqx.filter_jit(lambda k: model_cls(cfg, key=k).transformer.mtp)(key)  # the rest is never computed
        if mesh is not None:  # placed as the sharded skeleton says, as every loaded leaf is
            mtp = jax.tree.map(lambda x, leaf: jax.device_put(x, leaf.sharding), mtp, skeleton.transformer.mtp)
        skeleton = eqx.tree_at(lambda m: m.transformer.mtp, skeleton, None)
    tensor_rules = rules_fn(cfg, _leaf_paths(skeleton))
    # a sub-model of a larger checkpoint (the thinker under `thinker.` in a full Qwen3-Omni one): read its
    # tensors under the prefix and ignore the others (talker, code2wav), as transformers does
    prefix = getattr(cfg, "checkpoint_prefix", "")
    tensor_rules = [rule._replace(hf_key=prefix + rule.hf_key) for rule in tensor_rules]
    # tensors transformers itself skips on load (Qwen3-Next's `mtp.*` multi-token-prediction head)
    ignored = tuple(prefix + p for p in getattr(cfg, "ignored_on_load", ()))
    reader = _SafetensorsReader(path)
    fused = sorted(key for key in reader.keys() if key.endswith(".experts.gate_up_proj"))
    if fused:
        raise ValueError(f"checkpoint {path} stores fused experts ({fused[0]}), the layout transformers' "
                         "save_pretrained(save_original_format=False) writes; we read the Hub's per-expert layout "
                         "(experts.N.gate_proj/up_proj/down_proj), which transformers' default save writes")
    head, embedding = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
    if cfg.tie_word_embeddings and head in reader.keys():  # whole state-dict exports store the tied head too
        if embedding not in reader.keys():  # only the head: transformers ties it to the embedding either way
            tensor_rules = [rule._replace(hf_key=head) if rule.hf_key == embedding else rule for rule in tensor_rules]
        elif not np.array_equal(reader.get(head), reader.get(embedding)):
            raise ValueError(f"checkpoint {path}: config.json ties the LM head to the embedding "
                             f"(tie_word_embeddings), but {head} is stored and differs from it; "
                             "from_pretrained(..., tie_word_embeddings=False) loads it as a separate head")
        else:
            ignored += (head,)
    model = load_rules(skeleton, tensor_rules, reader, source=f"checkpoint {path}",
                       ignore=lambda name: not name.startswith(prefix) or name.startswith(ignored))
    if mtp is None:
        return model
    return eqx.tree_at(lambda m: m.transformer.mtp, model, mtp, is_leaf=lambda x: x is None)


def save_pretrained(model: eqx.Module, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors in the HF layout (sharded with an index above `max_shard_bytes`).

    The files are written into a hidden folder inside `out_dir`; once all are written, an earlier checkpoint's
    files (config.json first) are moved aside into it and the new ones moved in (config.json last). A failure
    or Ctrl-C at any point leaves the previous checkpoint as it was; a kill while writing does too, and a kill
    during the renames leaves no config.json, never a mix of two checkpoints (the previous files stay in the
    staging folder, which the next save removes). `out_dir` itself is kept (it may be the working directory or
    a mount point, and keeps its owner and mode), and so are its other entries (tokenizer files, a README,
    folders).
    """
    cfg = model.config
    if cfg.model_type not in MODELS:
        raise ValueError(f"save_pretrained does not support model_type {cfg.model_type!r}")
    if model.transformer.unrolled:  # the rules address the stacked layout
        model = eqx.tree_at(lambda m: m.transformer, model, model.transformer.stacked())
    rules = MODELS[cfg.model_type][2](cfg, _leaf_paths(model))
    leaves = {
        jax.tree_util.keystr(p): np.asarray(leaf)  # a view on CPU; one host copy of each leaf on an accelerator
        for p, leaf in jax.tree_util.tree_flatten_with_path(model)[0]
        if eqx.is_array(leaf)
    }
    tensors = {rule.hf_key: _HFTensor(leaves[rule.leaf][rule.index], rule.to_hf) for rule in rules}

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"cannot save a checkpoint to {out_dir}: it exists and is not a directory")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(f"{_STAGING}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=out_dir))
    previous = staging / "previous"
    moved_aside, moved_in = [], []
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        _write_shards(tensors, staging, max_shard_bytes)
        # config.json leaves first and comes last, so whenever it is there the files are all old or all new
        new = sorted(os.listdir(staging), key=lambda name: (name == CONFIG_FILE, name == INDEX_FILE, name))
        old = sorted((name for name in os.listdir(out_dir) if is_checkpoint_file(name)), key=lambda n: n != CONFIG_FILE)
        previous.mkdir()
        for name in old:
            os.replace(out_dir / name, previous / name)
            moved_aside.append(name)
        for name in new:
            os.replace(staging / name, out_dir / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            (out_dir / name).unlink(missing_ok=True)
        for name in reversed(moved_aside):
            os.replace(previous / name, out_dir / name)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _HFTensor(NamedTuple):
    """An HF tensor to be written: `to_hf(view)`, made (contiguous) only when its shard is written."""

    view: np.ndarray
    to_hf: Transform

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

    def make(self) -> np.ndarray:
        tensor = self.to_hf(self.view)
        out = np.empty(tensor.shape, tensor.dtype)
        _assign(out, tensor)
        return out


def _write_shards(tensors: dict[str, _HFTensor], directory: Path, max_shard_bytes: int) -> None:
    """Writes `tensors` as one file, or as shards of at most `max_shard_bytes` (a larger tensor alone) with an
    index; each shard's tensors are made only while it is written, so host memory holds one shard at a time."""
    total = sum(t.nbytes for t in tensors.values())
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += tensors[key].nbytes
    width = max(5, int(math.log10(len(shards))) + 1)
    names = [WEIGHTS_FILE] if len(shards) == 1 else [
        f"model-{i:0{width}d}-of-{len(shards):0{width}d}.safetensors" for i in range(1, len(shards) + 1)]
    with _copying_threads() as pool:
        for keys, name in zip(shards, names):
            made = pool.map(lambda key: tensors[key].make(), keys)
            save_file(dict(zip(keys, made)), directory / name, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
