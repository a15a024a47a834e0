"""`em.from_pretrained` / `em.save_pretrained`: round trips through HF transformers (logits 1e-5 relative)
and through ourselves (bit-identical), sharding, legacy config keys, dtype, strict and clear errors, atomic
saves."""

import json
import math
import os
import tracemalloc
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

import eqx_models as em
import eqx_models.hf as hf_io
from tests.reference import assert_close

VOCAB = 96


def _cfg(moe: bool, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                rope_theta=20_000.0, rms_norm_eps=1e-4, tie_word_embeddings=False)
    if moe:
        base.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
        return em.Qwen3MoeConfig(**{**base, **kw})
    return em.Qwen3Config(**{**base, **kw})


def _random_model(cfg, seed: int = 0):
    """Our model with NumPy-random parameters (norms 1 + N(0, 0.1), router N(0, 1), weights N(0, 0.2^2))."""
    cls = em.Qwen3MoeForCausalLM if isinstance(cfg, em.Qwen3MoeConfig) else em.Qwen3ForCausalLM
    skeleton = eqx.filter_eval_shape(cls, cfg, key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape)
        if name.endswith(".scale"):
            value = 1.0 + 0.1 * noise
        else:
            value = noise if name.endswith("gate.kernel") else 0.2 * noise
        return jnp.asarray(value.astype(np.float32), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, skeleton)


@eqx.filter_jit
def _logits(model, ids):
    return model(ids)


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))


def _assert_same_params(a, b):
    assert a.config == b.config and type(a) is type(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _hf_load(path, moe: bool):
    cls = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager", experts_implementation="eager").eval()


def _files(path: Path) -> dict[str, bytes]:
    """Every file under `path` (sub-folders included) by relative path, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_save_then_hf_loads_same_logits(tmp_path, moe):
    """ours -> `save_pretrained` -> HF `from_pretrained` (no missing/unexpected keys) gives our logits,
    float32, 1e-5 relative; and ours -> save -> ours is bit-identical."""
    model = _random_model(_cfg(moe, tie_word_embeddings=not moe))
    em.save_pretrained(model, tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    hf, info = (transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM).from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        ref = hf.eval()(torch.tensor(IDS)).logits.numpy()
    what = f"{'moe' if moe else 'dense'} ours->HF"
    assert_close(_logits(model, jnp.asarray(IDS, jnp.int32)), ref, 1e-5, what)
    _assert_same_params(em.from_pretrained(tmp_path), model)


def test_sharded_save_writes_index_and_both_load(tmp_path):
    """`max_shard_bytes` below the model size writes several shards and an index; we load it bit-identically
    and HF loads it to the same logits (1e-5)."""
    model = _random_model(_cfg(moe=True))
    em.save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        t.nbytes for s in shards for t in load_file(tmp_path / s).values()
    )
    _assert_same_params(em.from_pretrained(tmp_path), model)
    with torch.no_grad():
        ref = _hf_load(tmp_path, moe=True)(torch.tensor(IDS)).logits.numpy()
    assert_close(_logits(model, jnp.asarray(IDS, jnp.int32)), ref, 1e-5, "sharded ours->HF")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_legacy_config_keys(tmp_path, moe):
    """A config.json with Hub-style keys (top-level `rope_theta`, `rope_scaling: null`, `num_experts`, no
    `rope_parameters` or `layer_types`) loads to the same model as the transformers-5 format."""
    model = _random_model(_cfg(moe, rope_theta=5e5))
    em.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    config.pop("layer_types", None)
    if moe:
        config["num_experts"] = config.pop("num_local_experts", config.get("num_experts"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = em.from_pretrained(tmp_path)
    assert loaded.config.rope_theta == 5e5 and loaded.config.rope_scaling is None
    if moe:
        assert loaded.config.num_experts == 4
    _assert_same_params(loaded, model)


def test_loads_hf_bfloat16_checkpoint(tmp_path):
    """A bfloat16 checkpoint written by HF (as on the Hub) loads as bfloat16 by default (as transformers does),
    and with `dtype=jnp.float32` exactly into float32: logits equal HF's float32 run of the same bf16-rounded
    weights, 1e-5 relative."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, initializer_range=0.1, attn_implementation="eager",
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(em.from_pretrained(tmp_path)))
    ours = em.from_pretrained(tmp_path, dtype=jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ours))
    hf32 = transformers.Qwen3MoeForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf32(torch.tensor(IDS)).logits.numpy()
    assert_close(_logits(ours, jnp.asarray(IDS, jnp.int32)), ref, 1e-5, "bf16 HF checkpoint -> ours (fp32)")


def test_from_pretrained_dtype_bfloat16(tmp_path):
    """`dtype=jnp.bfloat16` gives bf16 parameters (the float32 values rounded) and a bf16 compute config."""
    model = _random_model(_cfg(moe=True))
    em.save_pretrained(model, tmp_path)
    loaded = em.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert loaded.config.dtype == loaded.config.param_dtype == "bfloat16"
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.bfloat16)))


# float32 values at the edges of rounding to bf16 / fp16: halfway cases to even (down and up), just above halfway,
# subnormals, overflow, signed zero, infinities and nan
_ROUNDING_PROBES = np.array(
    [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 1 + 2**-11, 1 + 3 * 2**-11, 2.0**-130, -(2.0**-140),
     2.0**-25, 3 * 2.0**-26, 3.4e38, -3.4e38, 65520.0, 65519.0, -0.0, np.inf, -np.inf, np.nan], np.float32)


@pytest.mark.parametrize("stored, target", [("float32", "bfloat16"), ("float16", "bfloat16"),
                                            ("float16", "float32"), ("bfloat16", "float32"),
                                            ("float32", "float16")])
def test_load_converts_dtypes_as_torch_does(saved, stored, target):
    """A checkpoint stored in one float dtype loads into another bit for bit as torch converts it
    (`tensor.to(dtype)`): ties to even, subnormals, overflow to inf, signed zero; nan where torch has nan."""
    path, _ = saved
    tensors = load_torch_file(path / "model.safetensors")
    key = "model.embed_tokens.weight"
    embed = tensors[key].flatten()
    embed[: len(_ROUNDING_PROBES)] = torch.from_numpy(_ROUNDING_PROBES)
    tensors[key] = embed.reshape(tensors[key].shape)
    tensors = {k: t.to(getattr(torch, stored)) for k, t in tensors.items()}
    save_torch_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ours = em.from_pretrained(path, dtype=getattr(jnp, target))
    assert {leaf.dtype for leaf in jax.tree.leaves(ours)} == {jnp.dtype(target)}
    want = tensors[key].to(getattr(torch, target))
    bits = {"bfloat16": (torch.int16, np.int16), "float16": (torch.int16, np.int16), "float32": (torch.int32, np.int32)}
    torch_bits, np_bits = bits[target]
    got = np.asarray(ours.transformer.embed.embedding)
    nan = want.isnan().numpy()
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got.view(np_bits)[~nan], want.view(torch_bits).numpy()[~nan])


def test_loading_holds_one_leaf_beyond_the_model(tmp_path):
    """Leaves are assembled one at a time in their own dtype: host allocations while a bf16 checkpoint is read
    peak at the model (on CPU, jax may keep a suitably aligned buffer as the array itself) plus its largest leaf
    and the tensor being read (+25%), not at float32 copies of the whole model (1.8x this bound before)."""
    cfg = _cfg(moe=False, vocab_size=8192, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               head_dim=16, dtype="bfloat16", param_dtype="bfloat16")
    em.save_pretrained(_random_model(cfg), tmp_path, max_shard_bytes=2**19)
    skeleton = eqx.filter_eval_shape(em.Qwen3ForCausalLM, cfg, key=jax.random.key(0))
    rules = hf_io.qwen3_rules(cfg, hf_io._leaf_paths(skeleton))
    reader = hf_io._SafetensorsReader(tmp_path)
    model = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(skeleton))
    largest_leaf = max(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(skeleton))
    largest_tensor = max(math.prod(reader.shape(key)) * 2 for key in reader.keys())
    tracemalloc.start()
    try:
        hf_io.load_rules(skeleton, rules, reader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= model + 1.25 * (largest_leaf + largest_tensor), (peak, model, largest_leaf, largest_tensor)


def test_tensors_larger_than_a_tile_round_trip_through_hf(tmp_path):
    """Tensors of more than one copy tile (256 x 256 elements), with ragged edges, in 2-D (MLP, LM head) and
    3-D (heads) layouts: ours -> save -> HF gives our logits (1e-5), and HF's own save -> ours gives our
    parameters bit for bit."""
    cfg = _cfg(moe=False, vocab_size=520, hidden_size=272, intermediate_size=400, num_attention_heads=4,
               head_dim=72)
    model = _random_model(cfg)
    em.save_pretrained(model, tmp_path / "ours")
    hf = _hf_load(tmp_path / "ours", moe=False)
    assert max(p.numel() for p in hf.parameters() if p.ndim == 2 and p.shape[0] < 520) > 256 * 256
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    assert_close(_logits(model, jnp.asarray(IDS, jnp.int32)), ref, 1e-5, "large tensors ours->HF")
    hf.save_pretrained(tmp_path / "hf")
    _assert_same_params(em.from_pretrained(tmp_path / "hf"), model)


@pytest.mark.parametrize("case", ["transpose", "heads", "expert", "conv", "bf16->f32", "f32->f16"])
def test_tiled_copy_equals_numpy_assignment(case):
    """The loader's and saver's tiled copy writes what `dst[...] = src` writes, for transposed views with ragged
    tiles, heads split out of a transposed axis, strided destinations, 4-D permutations and casts (overflow to
    inf included)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 300)).astype(np.float32)
    dst = np.zeros((300, 600), np.float32)
    src = x.T
    if case == "heads":
        dst, src = np.zeros((300, 4, 150), np.float32), x.T.reshape(300, 4, 150)
    elif case == "expert":
        dst = np.zeros((3, 300, 2, 600), np.float32)[1, :, 0]
    elif case == "conv":
        src = rng.standard_normal((96, 80, 3, 5)).astype(np.float32).transpose(2, 3, 1, 0)
        dst = np.zeros(src.shape, np.float32)
    elif case == "bf16->f32":
        src = x.astype(jnp.bfloat16).T
    elif case == "f32->f16":
        src, dst = (x * 60_000).T, np.zeros((300, 600), np.float16)
    expected = np.zeros_like(dst)
    with np.errstate(over="ignore"):
        expected[...] = src
        hf_io._assign(dst, src)
    assert src.size > 256 * 256 and (case != "f32->f16" or np.isinf(expected).any())
    np.testing.assert_array_equal(dst, expected)


def test_sharded_save_holds_one_shard_at_a_time(tmp_path):
    """A sharded save makes each shard's tensors (transposed, contiguous) only while writing that shard: host
    allocations peak below a third of the model, not at a second copy of it."""
    cfg = _cfg(moe=False, vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
               num_attention_heads=4, head_dim=16, dtype="bfloat16", param_dtype="bfloat16")
    model = _random_model(cfg)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(model))
    tracemalloc.start()
    try:
        em.save_pretrained(model, tmp_path, max_shard_bytes=size // 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert peak < size / 3, (peak, size)
    _assert_same_params(em.from_pretrained(tmp_path), model)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_unrolled_model_saves_as_the_stacked_one(tmp_path, moe):
    """A model unrolled for decoding (as `generate`'s docstring shows) saves the same files as the stacked model
    (it raised AttributeError: 'tuple' object has no attribute 'attention'); `stacked` inverts `unroll`."""
    model = _random_model(_cfg(moe))
    unrolled = eqx.tree_at(lambda m: m.transformer, model, model.transformer.unroll())
    _assert_same_params(eqx.tree_at(lambda m: m.transformer, unrolled, unrolled.transformer.stacked()), model)
    em.save_pretrained(model, tmp_path / "stacked")
    em.save_pretrained(unrolled, tmp_path / "unrolled")
    assert _files(tmp_path / "unrolled") == _files(tmp_path / "stacked")


def test_save_bfloat16_model(tmp_path):
    """A bf16 model (param_dtype bfloat16) is saved as bf16 tensors with config.json `dtype: bfloat16` (the key
    transformers 5 writes and reads), so HF's default `dtype="auto"` loads bf16 parameters, and we load it back
    bit-identically. HF's bf16 logits (upcast) are within 5e-2 of ours relative to max |logit|: both round to
    2^-8 per op, in different orders (measured 1.4e-2; see tests/models/test_qwen3.py::test_bfloat16_model); a
    wrong weight gives O(1)."""
    model = _random_model(_cfg(moe=False, dtype="bfloat16", param_dtype="bfloat16"))
    em.save_pretrained(model, tmp_path)
    assert {t.dtype for t in load_torch_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = _hf_load(tmp_path, moe=False)
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.float().numpy()
    assert_close(_logits(model, jnp.asarray(IDS, jnp.int32)), ref, 5e-2, "bf16 ours -> HF bf16")
    _assert_same_params(em.from_pretrained(tmp_path), model)


def test_from_pretrained_config_overrides(tmp_path):
    """Keyword arguments override runtime config fields (here `remat_policy`)."""
    model = _random_model(_cfg(moe=False))
    em.save_pretrained(model, tmp_path)
    loaded = em.from_pretrained(tmp_path, remat_policy="full")
    assert loaded.config.remat_policy == "full" and loaded.transformer.remat_policy == "full"
    with pytest.raises(ValueError, match="remat_polcy: not fields of Qwen3Config") as error:
        em.from_pretrained(tmp_path, remat_polcy="full")
    assert "config.json" not in str(error.value)


def test_from_pretrained_adds_a_fresh_mtp_head(tmp_path):
    """HF checkpoints hold no MTP head: `mtp_num_layers=k` initialises it from `key` as the model class does
    (onto a mesh too), and loads every other parameter from the files; without a key it is an error."""
    model = _random_model(_cfg(moe=False))
    em.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="hold no multi-token-prediction head; pass key="):
        em.from_pretrained(tmp_path, mtp_num_layers=1)
    mesh = em.partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for placement in ({}, {"mesh": mesh}):
        loaded = em.from_pretrained(tmp_path, mtp_num_layers=2, key=jax.random.key(7), **placement)
        assert loaded.config.mtp_num_layers == 2
        fresh = em.Qwen3ForCausalLM(loaded.config, key=jax.random.key(7)).transformer.mtp
        for x, y in zip(jax.tree.leaves(loaded.transformer.mtp), jax.tree.leaves(fresh), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        rest = eqx.tree_at(lambda m: m.transformer.mtp, loaded, None)
        for x, y in zip(jax.tree.leaves(rest), jax.tree.leaves(model), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        if placement:
            want = em.partitioning.shard(loaded, mesh)
            assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)))
    _, aux = em.training.lm_loss(loaded, {"input_ids": jnp.asarray(IDS, jnp.int32)})
    assert np.isfinite(float(aux["mtp_loss"])) and float(aux["mtp_loss"]) > 0


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def saved(tmp_path):
    """A saved dense checkpoint and its model."""
    model = _random_model(_cfg(moe=False))
    path = tmp_path / "ckpt"
    em.save_pretrained(model, path)
    return path, model


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        em.from_pretrained(tmp_path / "nowhere")


def test_missing_config(saved):
    path, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        em.from_pretrained(path)


def test_missing_safetensors(saved):
    """Without an index or `model.safetensors` the error names both, even when other safetensors files exist."""
    path, _ = saved
    (path / "model.safetensors").rename(path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        em.from_pretrained(path)


def test_stray_safetensors_file_is_ignored(saved):
    """A stray `*.safetensors` beside `model.safetensors` (no index) is not read, as in transformers: here an
    all-zero copy that would otherwise override every weight."""
    path, model = saved
    zeros = {k: np.zeros_like(v) for k, v in load_file(path / "model.safetensors").items()}
    save_file(zeros, path / "zz_old_copy.safetensors", metadata={"format": "pt"})
    _assert_same_params(em.from_pretrained(path), model)


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path):
    """A folder with both `model.safetensors` and an index (HF's `save_pretrained` leaves one when a sharded save
    follows a single-file one) loads the single file, as transformers does; the index's shards were read before."""
    indexed, single = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    em.save_pretrained(indexed, tmp_path, max_shard_bytes=20_000)
    em.save_pretrained(single, tmp_path / "single")
    (tmp_path / "single" / "model.safetensors").rename(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = em.from_pretrained(tmp_path)
    _assert_same_params(ours, single)
    embedding = _hf_load(tmp_path, moe=False).model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(ours.transformer.embed.embedding), embedding)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: [c.pop("num_attention_heads"), c.pop("head_dim"), c.update(model_type="qwen3_moe")],
         "num_attention_heads"),  # dense Qwen3 has transformers' head_dim default; MoE needs hidden // heads
        (lambda c: c.update(rms_norm_eps="1e-6"), "rms_norm_eps"),
        (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "factor"),
    ],
    ids=["missing-field", "string-eps", "string-bool", "yarn-without-factor"],
)
def test_bad_config_field_names_file_and_field(saved, edit, message):
    """A config.json with a field missing, wrongly typed or incomplete is a ValueError naming file and field."""
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as excinfo:
        em.from_pretrained(path)
    assert str(path / "config.json") in str(excinfo.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dtype=jnp.int32), r"from_pretrained\(dtype=\.\.\.\): dtype must be .*, got 'int32'"),
        (dict(remat_policy="bogus"), r"from_pretrained\(remat_policy=\.\.\.\): remat_policy must be .*'bogus'"),
        (dict(remat_policy="full", num_attention_heads=6, num_key_value_heads=4),
         r"from_pretrained\(remat_policy=\.\.\., num_attention_heads=\.\.\., num_key_value_heads=\.\.\.\): "
         r"num_attention_heads \(6\) must be divisible by num_key_value_heads \(4\)"),
    ],
    ids=["dtype", "remat-policy", "only-together"],
)
def test_bad_keyword_is_named_not_config_json(saved, overrides, message):
    """A keyword argument the config rejects is named as the culprit (all of them when none fails alone), and
    config.json is not blamed; a bad config.json is still named as the culprit when keywords are given."""
    path, _ = saved
    with pytest.raises(ValueError, match=message) as excinfo:
        em.from_pretrained(path, **overrides)
    assert "config.json" not in str(excinfo.value)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=r"must be divisible by num_key_value_heads \(3\)") as excinfo:
        em.from_pretrained(path, dtype=jnp.bfloat16, remat_policy="full")
    assert str(excinfo.value).startswith(f"{path / 'config.json'} is not a usable config: ")


def test_config_json_that_is_not_an_object(saved):
    path, _ = saved
    (path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object, got a list"):
        em.from_pretrained(path)


@pytest.mark.parametrize(("text", "message"), [("{oops", "is not valid JSON"), ("{}", "has no weight_map"),
                                                ('{"weight_map": [1]}', "has no weight_map")])
def test_bad_index_names_the_file(tmp_path, text, message):
    em.save_pretrained(_random_model(_cfg(moe=False)), tmp_path, max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=message) as excinfo:
        em.from_pretrained(tmp_path)
    assert "model.safetensors.index.json" in str(excinfo.value)


def test_unknown_model_type(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gpt2"):
        em.from_pretrained(path)


def test_invalid_config_json(saved):
    path, _ = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        em.from_pretrained(path)


@pytest.mark.parametrize("damage", ["truncate", "garble-header", "garble-length"])
def test_corrupted_safetensors_names_the_file(saved, damage):
    """A truncated or garbled safetensors file is a clear error (ValueError / OSError) naming the file, never
    a crash or a silently wrong model."""
    path, _ = saved
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garble-header":
        data[8:40] = b"\xff" * 32
    else:
        data[:8] = (2**40).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    with pytest.raises((ValueError, OSError)) as excinfo:
        em.from_pretrained(path)
    assert "model.safetensors" in str(excinfo.value)


def test_mismatched_tensors_are_all_named_in_one_error(saved):
    """A missing, an unexpected and a wrongly shaped tensor are all reported by one ValueError."""
    path, _ = saved
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((3, 3), np.float32)
    down = "model.layers.0.mlp.down_proj.weight"
    tensors[down] = tensors[down][:, :-1].copy()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as excinfo:
        em.from_pretrained(path)
    message = str(excinfo.value)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.extra.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        assert name in message, f"{name} not named in: {message}"
    assert "missing" in message and "unexpected" in message and "shape" in message


def test_missing_shard_of_index(tmp_path):
    """A shard listed in the index but absent is a FileNotFoundError naming it."""
    model = _random_model(_cfg(moe=False))
    em.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        em.from_pretrained(tmp_path)


def test_tensor_in_two_shards_loads_the_one_the_index_names(tmp_path):
    """A tensor stored in two shards is read from the shard the index names, whichever file sorts first; in two
    shards the index does not name, it is a ValueError naming both."""
    model = _random_model(_cfg(moe=False))
    em.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    for key in ("lm_head.weight", "model.embed_tokens.weight"):  # the zero copy sorts after, then before
        owner = index["weight_map"][key]
        other = next(s for s in (shards[0], shards[-1]) if s.name != owner)
        tensors = load_file(other)
        save_file({**tensors, key: np.zeros(load_file(tmp_path / owner)[key].shape, np.float32)}, other,
                  metadata={"format": "pt"})
    _assert_same_params(em.from_pretrained(tmp_path), model)

    key = "model.embed_tokens.weight"  # its shard holds other tensors, so every shard is still listed
    index["weight_map"][key] = next(s.name for s in shards if key not in load_file(s))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor {key} is in both .*model-\d+-of-\d+.safetensors and "
                                         r".*model-\d+-of-\d+.safetensors, and the index names neither"):
        em.from_pretrained(tmp_path)


def test_fp8_tensors_load_as_torch_upcasts_them(saved):
    """float8 (e4m3fn, e5m2) tensors load as torch's `.to(float32)` gives them; a dtype we cannot read (complex)
    is a ValueError naming the file and the tensor, not an error from a reader thread."""
    path, _ = saved
    tensors = load_torch_file(path / "model.safetensors")
    down, up = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"
    tensors[down] = tensors[down].to(torch.float8_e4m3fn)
    tensors[up] = (8 * tensors[up]).to(torch.float8_e5m2)
    save_torch_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    em.save_pretrained(em.from_pretrained(path, dtype=jnp.float32), path / "upcast")
    upcast = load_torch_file(path / "upcast" / "model.safetensors")
    for key in (down, up):
        assert upcast[key].dtype == torch.float32
        torch.testing.assert_close(upcast[key], tensors[key].float(), rtol=0, atol=0)

    tensors[down] = tensors[down].float().to(torch.complex64)
    save_torch_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has dtype "
                                         r"C64, which we cannot read"):
        em.from_pretrained(path)


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
    """Whole state-dict exports of a tied model store `lm_head.weight` too. Equal to the embedding, it is
    ignored (transformers ties it); different, it is a ValueError that names the way to load it untied."""
    model = _random_model(_cfg(moe=False, tie_word_embeddings=True))
    em.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": embedding}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _assert_same_params(em.from_pretrained(tmp_path), model)
    hf = _hf_load(tmp_path, moe=False)
    with torch.no_grad():
        want = hf(torch.from_numpy(IDS)).logits.numpy()
    assert_close(_logits(em.from_pretrained(tmp_path), jnp.asarray(IDS)), want, 1e-5, "tied, head stored")

    head = embedding + 1.0
    save_file({**tensors, "lm_head.weight": head}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"ties the LM head .* lm_head.weight is stored and differs from it; "
                                         r"from_pretrained\(..., tie_word_embeddings=False\)"):
        em.from_pretrained(tmp_path)
    untied = em.from_pretrained(tmp_path, tie_word_embeddings=False)
    np.testing.assert_array_equal(np.asarray(untied.transformer.lm_head.kernel), head.T)


def test_tied_checkpoint_that_stores_only_the_head(tmp_path):
    """A tied checkpoint whose one copy of the shared matrix is stored as `lm_head.weight` loads it as the
    embedding, as transformers does (ties work either way); it was refused as missing the embedding."""
    model = _random_model(_cfg(moe=False, tie_word_embeddings=True))
    em.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _assert_same_params(em.from_pretrained(tmp_path), model)
    np.testing.assert_array_equal(_hf_load(tmp_path, moe=False).model.embed_tokens.weight.detach().numpy(),
                                  np.asarray(model.transformer.embed.embedding))


def test_fused_expert_layout_is_named(tmp_path):
    """transformers' `save_pretrained(save_original_format=False)` writes fused experts; the error says which
    layout we read instead of listing every per-expert tensor as missing."""
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    hf.save_pretrained(tmp_path, save_original_format=False)
    with pytest.raises(ValueError, match=r"stores fused experts \(model.layers.0.mlp.experts.gate_up_proj\).*"
                                         r"save_original_format=False"):
        em.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Atomic saves


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """If writing the tensors fails after part of them is on disk, the previous checkpoint at `out_dir` is
    byte-for-byte unchanged and loadable, and no staging directory is left behind."""
    old, new = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    out = tmp_path / "ckpt"
    em.save_pretrained(old, out)
    before = _files(out)
    real_write = hf_io._write_shards

    def crash(tensors, directory, max_shard_bytes):
        first = dict(list(tensors.items())[:3])
        real_write(first, directory, max_shard_bytes)
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_io, "_write_shards", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        em.save_pretrained(new, out)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_same_params(em.from_pretrained(out), old)
    with pytest.raises(RuntimeError, match="disk full"):  # a folder the failed save created is removed
        em.save_pretrained(new, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_over_existing_directory_replaces_it(tmp_path):
    """Saving over a sharded checkpoint leaves exactly the new checkpoint (no stale shards or index)."""
    old, new = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    out = tmp_path / "ckpt"
    em.save_pretrained(old, out, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    em.save_pretrained(new, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_same_params(em.from_pretrained(out), new)


def _unrelated_entries(out: Path) -> None:
    """What a user keeps beside a checkpoint: tokenizer files, a README, a folder of notes."""
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    (out / "README.md").write_text("# my model\n")
    (out / "notes").mkdir()
    (out / "notes" / "important.txt").write_text("do not delete")


def test_save_over_existing_directory_keeps_other_files(tmp_path):
    """Saving over a sharded checkpoint replaces its config, shards and index (stale shards would be loaded)
    and keeps every other entry of the folder byte for byte."""
    old, new = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    out = tmp_path / "ckpt"
    em.save_pretrained(old, out, max_shard_bytes=20_000)
    _unrelated_entries(out)
    others = {k: v for k, v in _files(out).items() if not hf_io.is_checkpoint_file(Path(k).parts[0])}
    assert sorted(others) == ["README.md", "notes/important.txt", "tokenizer.json"]
    em.save_pretrained(new, out)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert {k: v for k, v in _files(out).items() if k in others} == others
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_same_params(em.from_pretrained(out), new)


def test_failed_move_into_place_keeps_the_folder(tmp_path, monkeypatch):
    """A save whose first move into place fails leaves the folder as it was, other entries included, and no
    staging folder behind."""
    old, new = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    out = tmp_path / "ckpt"
    em.save_pretrained(old, out)
    _unrelated_entries(out)
    before = _files(out)
    real_replace = os.replace

    def fail_on_move(src, dst):
        if Path(src).parent.name.startswith(".save_pretrained.tmp-"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(hf_io.os, "replace", fail_on_move)
    with pytest.raises(OSError, match="rename failed"):
        em.save_pretrained(new, out)
    monkeypatch.undo()
    assert _files(out) == before
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "notes", "tokenizer.json"]
    _assert_same_params(em.from_pretrained(out), old)


@pytest.mark.parametrize("failing_move", [0, 3, 10, 15], ids=["old-config", "old-file", "new-shard", "new-config"])
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_interrupted_swap_of_sharded_checkpoints_restores_the_old_one(tmp_path, monkeypatch, failing_move, error):
    """Saving sharded over sharded (the same shard names): a rename failing or Ctrl-C at any point of the swap
    leaves the old checkpoint whole. Before, the shards were replaced one by one under the old index and config,
    and an interruption after the first left a mix that loaded without an error."""
    old, new = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    out = tmp_path / "ckpt"
    em.save_pretrained(old, out, max_shard_bytes=20_000)
    _unrelated_entries(out)
    before = _files(out)
    assert len([name for name in before if name.startswith("model-")]) == 6
    real_replace, moves = os.replace, []

    def interrupted(src, dst):
        moves.append(dst)
        if len(moves) == failing_move + 1:
            raise error("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(hf_io.os, "replace", interrupted)
    with pytest.raises(error, match="interrupted"):
        em.save_pretrained(new, out, max_shard_bytes=20_000)
    monkeypatch.undo()
    assert len(moves) > failing_move and _files(out) == before  # of 16 moves: 8 files aside, 8 in
    _assert_same_params(em.from_pretrained(out), old)
    em.save_pretrained(new, out, max_shard_bytes=20_000)
    _assert_same_params(em.from_pretrained(out), new)


def test_save_writes_into_the_folder_itself(tmp_path, monkeypatch):
    """The folder is written into, never replaced: saving into the working directory leaves it usable (a swapped
    folder left the process in a deleted directory, and could not replace a mount point), it keeps its inode and
    mode, a new one gets the umask's mode (not mkdtemp's 0700), and a killed save's staging folder is removed."""
    old, new = _random_model(_cfg(moe=False), seed=1), _random_model(_cfg(moe=False), seed=2)
    out = tmp_path / "ckpt"
    em.save_pretrained(old, out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    out.chmod(0o750)
    inode = out.stat().st_ino
    (out / ".save_pretrained.tmp-killed").mkdir()
    (out / ".save_pretrained.tmp-killed" / "model.safetensors").write_bytes(b"partial")
    monkeypatch.chdir(out)
    em.save_pretrained(new, ".")
    assert os.getcwd() == str(out)
    assert (out.stat().st_ino, out.stat().st_mode & 0o777) == (inode, 0o750)
    assert sorted(os.listdir(".")) == ["config.json", "model.safetensors"]
    _assert_same_params(em.from_pretrained("."), new)
