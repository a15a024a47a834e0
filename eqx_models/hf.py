"""HuggingFace checkpoints <-> our pytrees: `from_pretrained` and `save_pretrained`.

One table of `Rule`s per model family maps every HF tensor to a slice of one of our (stacked) leaves, with the
transform each way; loading and saving read the same table. Loading builds a shape-only skeleton with
`eqx.filter_eval_shape`, fills it tensor by tensor from safetensors (single file or sharded index), and is strict:
missing, unexpected and wrongly shaped tensors are all named in one error. Never pickle.
"""

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from safetensors import safe_open
from safetensors.numpy import save_file

from eqx_models.config import Qwen3Config, Qwen3MoeConfig
from eqx_models.models.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM

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


def _attention_rules(cfg: Qwen3Config, layer: _Layer) -> list[Rule]:
    attn = layer.block.attention
    sa, r, hf = attn.self_attention, (layer.repeat,), layer.hf + "self_attn."
    q_in, q_out = _in_heads(cfg.num_attention_heads)
    kv_in, kv_out = _in_heads(cfg.num_key_value_heads)
    o_in, o_out = _out_heads(cfg.num_attention_heads)
    rules = [
        Rule(layer.hf + "input_layernorm.weight", attn.pre_self_attention_layer_norm.scale, r, _identity, _identity),
        Rule(layer.hf + "post_attention_layernorm.weight", attn.post_self_attention_layer_norm.scale, r,
             _identity, _identity),
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


def qwen3_rules(cfg: Qwen3Config, labels: Any) -> list[Rule]:
    """Every tensor of an HF Qwen3 / Qwen3-MoE checkpoint."""
    t = labels.transformer
    rules = [
        Rule("model.embed_tokens.weight", t.embed.embedding, (), _identity, _identity),
        Rule("model.norm.weight", t.norm.scale, (), _identity, _identity),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", t.lm_head.kernel, (), _transpose, _transpose))
    for layer in _layers(labels, cfg.num_hidden_layers):
        rules += _attention_rules(cfg, layer)
        if hasattr(layer.block, "moe_block"):
            rules += _moe_rules(cfg, layer.hf + "mlp.", layer.block.moe_block, layer.repeat)
        else:
            rules += _mlp_rules(layer.hf + "mlp.", layer.block.mlp, layer.repeat)
    return rules


# model_type -> (config class, model class, rules)
MODELS: dict[str, tuple[type, type, Callable[[Any, Any], list[Rule]]]] = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, qwen3_rules),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, qwen3_rules),
}


# ----------------------------------------------------------------------------------------------------------
# Files


class _SafetensorsReader:
    """Tensors of a checkpoint directory: `model.safetensors` or a sharded `model.safetensors.index.json`."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors file in {path}")
            weight_map = None
        self.location: dict[str, Path] = {}
        for name in files:
            file = path / name
            if not file.exists():
                raise FileNotFoundError(f"checkpoint shard {file} listed in the index is missing")
            try:
                with safe_open(file, framework="numpy") as f:
                    keys = list(f.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
            for key in keys:
                self.location[key] = file
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if self.location.get(k) != path / f)
            if absent:
                raise ValueError(f"tensors listed in the index are not in their shard: {absent[:10]}")

    def keys(self) -> set[str]:
        return set(self.location)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self.location[key], framework="numpy") as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        with safe_open(self.location[key], framework="numpy") as f:
            return f.get_tensor(key)


def _listing(items: list[str], limit: int = 20) -> str:
    shown = "; ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}; ... and {len(items) - limit} more"


def read_config(path: str | os.PathLike, dtype: DTypeLike | None = None, **overrides: Any) -> Any:
    """The config of an HF checkpoint directory, as our config class for its `model_type`, with parameter and
    compute dtype `dtype` (default: the checkpoint's `dtype`, else float32)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    model_type = data.get("model_type")
    if model_type not in MODELS:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported; supported: {sorted(MODELS)}")
    if dtype is None:
        saved = data.get("dtype", data.get("torch_dtype"))
        dtype = saved if saved in ("float32", "bfloat16", "float16") else jnp.float32
    name = jnp.dtype(dtype).name
    return MODELS[model_type][0].from_hf_dict(data, **{"dtype": name, "param_dtype": name, **overrides})


def from_pretrained(path: str | os.PathLike, dtype: DTypeLike | None = None, **config_overrides: Any) -> eqx.Module:
    """Loads an HF checkpoint directory (config.json + safetensors); the class follows `model_type`.

    `dtype` sets both the parameter and compute dtype (default: the checkpoint's `dtype`, as transformers does,
    else float32); other keyword
    arguments override config fields (e.g. `remat_policy="full"`). No network access.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = read_config(path, dtype=dtype, **config_overrides)
    _, model_cls, rules_fn = MODELS[cfg.model_type]
    skeleton = eqx.filter_eval_shape(model_cls, cfg, key=jax.random.key(0))
    leaves_with_path = jax.tree_util.tree_flatten_with_path(skeleton)[0]
    shapes = {jax.tree_util.keystr(p): leaf for p, leaf in leaves_with_path if isinstance(leaf, jax.ShapeDtypeStruct)}
    buffers = {p: np.zeros(s.shape, np.float32) for p, s in shapes.items()}
    covered = {p: np.zeros(s.shape, bool) for p, s in shapes.items()}

    reader = _SafetensorsReader(path)
    rules = rules_fn(cfg, _leaf_paths(skeleton))
    available = reader.keys()
    missing, wrong_shape = [], []
    for rule in rules:
        if rule.hf_key not in available:
            missing.append(rule.hf_key)
            continue
        expected = rule.to_hf(np.zeros(buffers[rule.leaf][rule.index].shape, np.float32)).shape
        if reader.shape(rule.hf_key) != expected:
            wrong_shape.append(f"{rule.hf_key}: file {reader.shape(rule.hf_key)}, expected {expected}")
            continue
        buffers[rule.leaf][rule.index] = rule.to_ours(reader.get(rule.hf_key).astype(np.float32))
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
        problems.append(f"parameters with no checkpoint tensor: {_listing(uncovered)}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match {model_cls.__name__}:\n  " + "\n  ".join(problems))

    def fill(path_, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        return jnp.asarray(buffers[jax.tree_util.keystr(path_)], dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, skeleton)


def save_pretrained(model: eqx.Module, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors in the HF layout (sharded with an index above `max_shard_bytes`).

    The directory is written next to its destination and swapped in at the end, so a crash mid-save leaves
    any previous checkpoint at `out_dir` intact.
    """
    cfg = model.config
    if cfg.model_type not in MODELS:
        raise ValueError(f"save_pretrained does not support model_type {cfg.model_type!r}")
    rules = MODELS[cfg.model_type][2](cfg, _leaf_paths(model))
    leaves = {
        jax.tree_util.keystr(p): np.asarray(leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(model)[0]
        if eqx.is_array(leaf)
    }
    tensors = {rule.hf_key: np.ascontiguousarray(rule.to_hf(leaves[rule.leaf][rule.index])) for rule in rules}

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (staging / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        _write_shards(tensors, staging, max_shard_bytes)
        backup = None
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, backup)
        os.replace(staging, out_dir)
        if backup is not None:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_shards(tensors: dict[str, np.ndarray], directory: Path, max_shard_bytes: int) -> None:
    total = sum(t.nbytes for t in tensors.values())
    metadata = {"format": "pt"}
    if total <= max_shard_bytes:
        save_file(tensors, directory / "model.safetensors", metadata=metadata)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += tensors[key].nbytes
    width = max(5, int(math.log10(len(shards))) + 1)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:0{width}d}-of-{len(shards):0{width}d}.safetensors"
        save_file(shard, directory / name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
