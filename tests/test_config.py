"""`em.Qwen3Config` / `em.Qwen3MoeConfig`: validation on construction, HF `config.json` parsing (written by
transformers itself), `to_hf_dict` accepted by transformers with the same fields, hashing and static use."""

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import eqx_models as em
from eqx_models.config import RUNTIME_FIELDS, ROPE_TYPES, Qwen3OmniAudioConfig

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
            tie_word_embeddings=False)
TINY_MOE = dict(TINY, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=(1,))
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "hf" / "hf_keys"


# ----------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (em.Qwen3Config, dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (em.Qwen3Config, dict(head_dim=15), "head_dim"),
        (em.Qwen3Config, dict(hidden_size=0), "hidden_size"),
        (em.Qwen3Config, dict(remat_policy="everything"), "remat_policy"),
        (em.Qwen3Config, dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope_scaling"),
        (em.Qwen3Config, dict(rope_theta=0.0), "rope_theta"),
        (em.Qwen3Config, dict(dtype="int8"), "dtype"),
        (em.Qwen3Config, dict(hidden_act="swish2"), "hidden_act"),
        (em.Qwen3Config, dict(use_sliding_window=True, sliding_window=None), "sliding_window"),
        (em.Qwen3Config, dict(attention_kernel="flash3"), "attention_kernel"),
        (em.Qwen3Config, dict(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 64}), "factor"),
        (em.Qwen3Config, dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "factor"),
        (em.Qwen3Config, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 64}), "high_freq_factor"),
        (em.Qwen3Config, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                            "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
         "high_freq_factor > low_freq_factor"),
        (em.Qwen3Config, dict(num_hidden_layers=2, layer_types=("full_attention",)), "layer_types"),
        (em.Qwen3Config, dict(num_hidden_layers=2, layer_types=("full_attention", "sliding_attention")),
         "use_sliding_window is False"),
        (em.Qwen3MoeConfig, dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                                 layer_types=("full_attention", "sliding_attention")), "cannot mix them"),
        (em.Qwen3NextConfig, dict(full_attention_interval=0), "full_attention_interval"),
        (em.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (em.Qwen3MoeConfig, dict(num_hidden_layers=4, mlp_only_layers=(1, 4)), "mlp_only_layers"),
        (em.Qwen3MoeConfig, dict(num_hidden_layers=4, mlp_only_layers=(-1,)), "mlp_only_layers"),
        (em.Qwen3MoeConfig, dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (em.Qwen3MoeConfig, dict(moe_impl="ragged"), "moe_impl"),
        (em.Qwen3MoeConfig, dict(moe_capacity_factor=0.0), "moe_capacity_factor"),
        (em.Qwen3MoeConfig, dict(moe_fast_capacity_factor=0.5), "moe_fast_capacity_factor"),
        (em.Qwen3MoeConfig, dict(mlp_only_layers=(True,)), "mlp_only_layers must be a list of layer indices"),
        (em.Qwen3Config, dict(rope_theta=float("nan")), "Qwen3Config.rope_theta must be finite, got nan"),
        (em.Qwen3Config, dict(rms_norm_eps=float("inf")), "rms_norm_eps must be finite"),
        (em.Qwen3MoeConfig, dict(moe_capacity_factor=float("nan")), "moe_capacity_factor must be finite"),
        (Qwen3OmniAudioConfig, dict(dropout=float("nan")), "dropout must be finite"),
        (em.Qwen3Config, dict(rope_scaling={**YARN, "original_max_position_embeddings": -4}),
         "original_max_position_embeddings must be a positive int, got -4"),
    ],
)
def test_invalid_config_raises_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls, field, value, expected",
    [
        (em.Qwen3Config, "rms_norm_eps", "1e-6", "float"),
        (em.Qwen3Config, "tie_word_embeddings", "false", "bool"),
        (em.Qwen3Config, "sliding_window", 4.5, "int or None"),
        (em.Qwen3MoeConfig, "num_experts", True, "int"),
        (Qwen3OmniAudioConfig, "dropout", None, "float"),
    ],
)
def test_wrongly_typed_field_is_named(cls, field, value, expected):
    """A value of the wrong type (as a hand-edited JSON gives) is a ValueError naming the field and the type,
    also without the jaxtyping hook the tests run under (which checks `__init__` before `__post_init__`)."""
    cfg = cls()
    object.__setattr__(cfg, field, value)
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field} must be {expected}, got {value!r}"):
        cfg.__post_init__()


def test_from_hf_dict_without_head_dim_names_the_missing_field():
    data = {k: v for k, v in TINY_MOE.items() if k not in ("head_dim", "num_attention_heads")}
    with pytest.raises(ValueError, match="num_attention_heads"):
        em.Qwen3MoeConfig.from_hf_dict(data)


@pytest.mark.parametrize("cls", [em.Qwen3Config, em.Qwen3MoeConfig, em.Qwen3NextConfig, Qwen3OmniAudioConfig])
def test_dtypes_are_taken_as_dtype_objects_and_kept_by_name(cls):
    cfg = cls(dtype=jnp.bfloat16, param_dtype=np.dtype("float32"))
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert cfg == cls(dtype="bfloat16") and hash(cfg) == hash(cls(dtype="bfloat16"))
    with pytest.raises(ValueError, match="dtype must be 'float32', 'bfloat16' or 'float16', got 'int32'"):
        cls(dtype=jnp.int32)


def test_thinker_passes_dtype_objects_to_every_sub_config():
    cfg = em.Qwen3OmniThinkerConfig.from_hf_dict(em.Qwen3OmniThinkerConfig().to_hf_dict(), dtype=jnp.bfloat16)
    assert {c.dtype for c in (cfg.text_config, cfg.vision_config, cfg.audio_config)} == {"bfloat16"}


def test_configs_are_frozen():
    cfg = em.Qwen3Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 8
    assert cfg.replace(hidden_size=8).hidden_size == 8 and cfg.hidden_size == 1024
    with pytest.raises(ValueError, match="head_dim"):
        cfg.replace(head_dim=7)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_every_accepted_rope_type_builds_a_model(rope_type):
    """A config that validates builds a model: a rope type the model cannot build must be rejected by the
    config with a ValueError, not accepted and then fail in the model constructor."""
    scaling = {"default": None, "linear": {"rope_type": "linear", "factor": 2.0}, "yarn": YARN,
               "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}[rope_type]
    cfg = em.Qwen3Config(**TINY, rope_scaling=scaling)
    model = eqx.filter_eval_shape(em.Qwen3ForCausalLM, cfg, key=jax.random.key(0))
    assert model.config.rope_scaling == (None if scaling is None else dict(scaling, rope_type=rope_type))


# ----------------------------------------------------------------------------------------------------------
# HF config.json


def _hf_json(tmp_path, hf_cfg) -> dict:
    hf_cfg.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_from_hf_dict_dense(tmp_path):
    """From the config.json transformers 5 writes for a tiny `Qwen3Config` (`rope_parameters` format)."""
    data = _hf_json(tmp_path, transformers.Qwen3Config(**TINY, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e6}))
    cfg = em.Qwen3Config.from_hf_dict(data)
    assert cfg == em.Qwen3Config(**TINY, rope_theta=1e6)


def test_from_hf_dict_moe_with_yarn(tmp_path):
    """From a tiny `Qwen3MoeConfig` json: `num_local_experts` -> `num_experts`, `mlp_only_layers` as a tuple,
    YaRN `rope_parameters` -> `rope_theta` + `rope_scaling`."""
    hf_cfg = transformers.Qwen3MoeConfig(**{**TINY_MOE, "mlp_only_layers": [1]},
                                         rope_parameters={**YARN, "rope_theta": 1e6})
    data = _hf_json(tmp_path, hf_cfg)
    cfg = em.Qwen3MoeConfig.from_hf_dict(data)
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.moe_intermediate_size == 32
    assert cfg.mlp_only_layers == (1,) and cfg.norm_topk_prob is True
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == YARN
    assert cfg == em.Qwen3MoeConfig(**TINY_MOE, rope_theta=1e6, rope_scaling=YARN)
    assert not cfg.layer_is_moe(1) and cfg.layer_is_moe(0) and cfg.layer_is_moe(2)


def test_from_hf_dict_legacy_keys():
    """Hub-style keys: top-level `rope_theta`, `rope_scaling` with `type`, `num_experts`, no `head_dim`."""
    data = {**TINY_MOE, "mlp_only_layers": [1], "model_type": "qwen3_moe", "rope_theta": 5e5,
            "rope_scaling": {"type": "linear", "factor": 2.0}}
    del data["head_dim"]
    cfg = em.Qwen3MoeConfig.from_hf_dict(data)
    assert cfg.rope_theta == 5e5
    assert cfg.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    assert cfg.head_dim == 64 // 4 and cfg.num_experts == 8


def test_numpy_numbers_are_taken_and_kept_as_python_numbers():
    """NumPy scalars (a config built from arrays, without the type hook the tests run under) pass the positivity
    checks and are stored as Python numbers, so the config still writes to JSON."""
    cfg = em.Qwen3Config(**TINY)
    object.__setattr__(cfg, "hidden_size", np.int64(64))
    object.__setattr__(cfg, "rms_norm_eps", np.float32(1e-5))
    cfg.__post_init__()
    assert type(cfg.hidden_size) is int and type(cfg.rms_norm_eps) is float
    json.dumps(cfg.to_hf_dict())


@pytest.mark.parametrize("top_level_theta", [None, 5e5])
def test_legacy_rope_scaling_replaces_rope_parameters_as_transformers_does(top_level_theta):
    """YaRN added as `rope_scaling` to a transformers-5 config.json (which already holds `rope_parameters`, as
    Qwen's model cards describe) is applied, not dropped (it was, silently: logits off by up to 2.99)."""
    data = {**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}
    if top_level_theta is not None:
        data["rope_theta"] = top_level_theta
    hf = transformers.Qwen3Config(**data).rope_parameters
    cfg = em.Qwen3Config.from_hf_dict(data)
    assert cfg.rope_theta == hf["rope_theta"]
    assert cfg.rope_scaling == {k: v for k, v in hf.items() if k != "rope_theta"}


def test_absent_keys_take_transformers_defaults():
    """tie_word_embeddings / max_position_embeddings missing from config.json mean what they mean to
    transformers (False, 32768), not our dataclass defaults (Qwen3-0.6B's tied head); a llama3 / YaRN
    rope without original_max_position_embeddings takes max_position_embeddings."""
    data = {**{k: v for k, v in TINY.items() if k not in ("tie_word_embeddings", "max_position_embeddings")},
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    hf, cfg = transformers.Qwen3Config(**data), em.Qwen3Config.from_hf_dict(data)
    assert cfg.tie_word_embeddings is hf.tie_word_embeddings is False
    assert cfg.max_position_embeddings == hf.max_position_embeddings == 32768
    assert cfg.rope_scaling["original_max_position_embeddings"] == hf.rope_parameters[
        "original_max_position_embeddings"] == 32768


def test_bad_rope_dict_is_named():
    with pytest.raises(ValueError, match="rope_scaling / rope_parameters must be a JSON object, got 'yarn'"):
        em.Qwen3Config.from_hf_dict({**TINY, "rope_scaling": "yarn"})


@pytest.mark.parametrize("interval, layers", [(4, 8), (2, 6), (3, 3), (1, 2)])
def test_qwen3_next_interval_survives_the_config_json(interval, layers):
    """transformers writes only `layer_types`; the interval that gives them comes back, so the config equals the
    original and `replace(num_hidden_layers=...)` re-derives the pattern (it raised)."""
    cfg = em.Qwen3NextConfig(num_hidden_layers=layers, full_attention_interval=interval)
    back = em.Qwen3NextConfig.from_hf_dict(transformers.Qwen3NextConfig(**cfg.to_hf_dict()).to_dict())
    assert back == cfg
    assert back.replace(num_hidden_layers=layers + interval).layer_types == cfg.replace(
        num_hidden_layers=layers + interval).layer_types


def test_from_hf_dict_overrides_and_unknown_keys():
    data = {**TINY, "model_type": "qwen3", "some_future_key": 1, "rope_parameters": {"rope_theta": 1e6}}
    cfg = em.Qwen3Config.from_hf_dict(data, remat_policy="full", dtype="bfloat16")
    assert cfg.remat_policy == "full" and cfg.dtype == "bfloat16" and cfg.rope_theta == 1e6


@pytest.mark.parametrize("cls, hf_cls, fields", [
    (em.Qwen3MoeConfig, transformers.Qwen3MoeConfig, TINY_MOE),
    (em.Qwen3NextConfig, transformers.Qwen3NextConfig, dict(TINY, num_hidden_layers=4)),
], ids=["moe", "next"])
def test_hf_only_keys_survive_the_round_trip(cls, hf_cls, fields):
    """config.json keys that only transformers reads (output_router_logits: the MoE aux loss in an HF fine-tune)
    come back from `to_hf_dict` as they were; they were dropped, so transformers read its defaults. They are not
    part of the config's identity (equality, hash); list- or dict-valued unknown keys are not carried."""
    hf_only = dict(output_router_logits=True, attention_dropout=0.1, use_cache=False, initializer_range=0.05)
    source = hf_cls(**cls(**fields).to_hf_dict(), **hf_only).to_dict()
    cfg = cls.from_hf_dict({**source, "some_future_list": [1, 2]})
    assert cfg.hf_extra == hf_only | {k: source[k] for k in cfg.hf_extra if k not in hf_only}
    assert "some_future_list" not in cfg.to_hf_dict()
    back = hf_cls(**cfg.to_hf_dict())
    assert {k: getattr(back, k) for k in hf_only} == hf_only
    plain = cfg.replace(hf_extra={})
    assert cfg == plain and hash(cfg) == hash(plain)
    assert cls.from_hf_dict(cfg.to_hf_dict()).to_hf_dict() == cfg.to_hf_dict()
    with pytest.raises(ValueError, match="hf_extra must map HF-only config.json keys to plain values"):
        cfg.replace(hf_extra={"rope_theta": 1.0})


@pytest.mark.parametrize("name, cls", [("qwen3", em.Qwen3Config), ("qwen3_moe", em.Qwen3MoeConfig)])
def test_from_hf_dict_shared_reference_json(name, cls):
    """The tiny config.json files recorded in the shared reference (only where that folder is present)."""
    path = SHARED / f"{name}.config.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    cfg = cls.from_hf_dict(json.loads(path.read_text()))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 4, 2, 16)
    assert cfg.rope_theta == 1e6 and cfg.vocab_size == 256
    if cls is em.Qwen3MoeConfig:
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)


@pytest.mark.parametrize(
    "cfg",
    [
        em.Qwen3Config(**TINY, rope_theta=1e6),
        em.Qwen3Config(**{**TINY, "tie_word_embeddings": True},
                       rope_scaling={"rope_type": "linear", "factor": 2.0}),
        em.Qwen3MoeConfig(**TINY_MOE, rope_theta=1e6, rope_scaling=YARN, remat_policy="full",
                          dtype="bfloat16"),
        em.Qwen3MoeConfig(**{**TINY_MOE, "norm_topk_prob": False, "decoder_sparse_step": 3}),
    ],
    ids=["dense", "dense-linear-tied", "moe-yarn", "moe-step3"],
)
def test_to_hf_dict_is_read_by_transformers(cfg):
    """`to_hf_dict` -> transformers `Qwen3Config(**d)` / `Qwen3MoeConfig(**d)` has every HF field we hold;
    runtime fields stay off the dict; `from_hf_dict(to_hf_dict(c))` gives `c` back (runtime fields at
    defaults)."""
    d = cfg.to_hf_dict()
    assert not (set(RUNTIME_FIELDS) - {"dtype"}) & set(d)
    assert d["model_type"] == cfg.model_type and d["architectures"] == [cfg.architecture]
    json.dumps(d)
    hf_cls = transformers.Qwen3MoeConfig if isinstance(cfg, em.Qwen3MoeConfig) else transformers.Qwen3Config
    hf = hf_cls(**d)
    for field in dataclasses.fields(cfg):
        name = field.name
        if name in RUNTIME_FIELDS or name in ("rope_theta", "rope_scaling", "max_window_layers", "hf_extra"):
            continue
        if name == "layer_types" and hf_cls is transformers.Qwen3MoeConfig:  # HF's MoE has none: all or no layers slide
            assert not hasattr(hf, name) and set(cfg.layer_types) == {"full_attention"}
            continue
        value = getattr(hf, name)
        assert (tuple(value) if name in ("mlp_only_layers", "layer_types") else value) == getattr(cfg, name), name
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.rope_parameters["rope_type"] == (cfg.rope_scaling or {"rope_type": "default"})["rope_type"]
    for key, value in (cfg.rope_scaling or {}).items():
        assert hf.rope_parameters[key] == value, key
    back = type(cfg).from_hf_dict(d)
    runtime_defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in RUNTIME_FIELDS}
    assert back == cfg.replace(**runtime_defaults)


# ----------------------------------------------------------------------------------------------------------
# Hashing and static use


@pytest.mark.parametrize("cls, fields", [(em.Qwen3Config, TINY), (em.Qwen3MoeConfig, TINY_MOE)],
                         ids=["dense", "moe"])
def test_configs_hash_by_value(cls, fields):
    """Equal configs (including a `rope_scaling` dict) are equal and hash equal; a changed field changes
    both."""
    a = cls(**fields, rope_scaling=YARN)
    b = cls(**fields, rope_scaling=dict(YARN))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.replace(num_key_value_heads=4) and hash(a) != hash(a.replace(num_key_value_heads=4))
    assert em.Qwen3Config(**TINY) != em.Qwen3MoeConfig(**TINY)


def _zeros_model(cfg):
    cls = em.Qwen3MoeForCausalLM if isinstance(cfg, em.Qwen3MoeConfig) else em.Qwen3ForCausalLM
    skeleton = eqx.filter_eval_shape(cls, cfg, key=jax.random.key(0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), skeleton)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["default-rope", "yarn"])
def test_config_is_a_static_field_jit_does_not_recompile(moe, rope_scaling):
    """Two models whose configs are equal but distinct objects hit the same compiled function (counted by a
    Python side effect at trace time); a changed config retraces."""
    small = dict(TINY, num_hidden_layers=2, vocab_size=32, hidden_size=16, intermediate_size=16, head_dim=4,
                 rope_scaling=rope_scaling)
    if moe:
        small.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    cls = em.Qwen3MoeConfig if moe else em.Qwen3Config
    m1, m2 = _zeros_model(cls(**small)), _zeros_model(cls(**small))
    m3 = _zeros_model(cls(**{**small, "rms_norm_eps": 1e-5}))
    assert m1.config is not m2.config
    traces = []

    @eqx.filter_jit
    def forward(model, ids):
        traces.append(model.config)
        return model(ids)

    ids = jnp.zeros((1, 4), jnp.int32)
    forward(m1, ids)
    forward(m2, ids)
    assert len(traces) == 1
    forward(m3, ids)
    assert len(traces) == 2


def test_replace_rederives_default_layer_types():
    """`replace` re-derives `layer_types` that were the default pattern (fewer layers, a window switched on) and
    keeps given ones, which must then still fit."""
    assert em.Qwen3Config(num_hidden_layers=4).replace(num_hidden_layers=2).layer_types == ("full_attention",) * 2
    moe = em.Qwen3MoeConfig(num_hidden_layers=4).replace(num_hidden_layers=2, use_sliding_window=True, sliding_window=3)
    assert moe.layer_types == ("sliding_attention",) * 2
    assert em.Qwen3NextConfig(num_hidden_layers=8).replace(num_hidden_layers=4).layer_types == (
        "linear_attention", "linear_attention", "linear_attention", "full_attention")
    given = em.Qwen3Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                           layer_types=("sliding_attention", "full_attention"))
    assert given.replace(sliding_window=8).layer_types == ("sliding_attention", "full_attention")
    with pytest.raises(ValueError, match="layer_types must list 3 entries"):
        given.replace(num_hidden_layers=3)


@pytest.mark.parametrize("window_layers", [0, 1, 2, 3])
def test_default_layer_types_match_transformers(window_layers):
    """Without `layer_types`, the layers from `max_window_layers` on slide, as transformers' Qwen3Config derives
    them (the parity tests read the types transformers wrote, so they do not check our derivation)."""
    kw = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=window_layers)
    assert em.Qwen3Config(**kw).layer_types == tuple(transformers.Qwen3Config(**kw).layer_types)


# our text config classes beside transformers' for the same model_type
WITH_HF = pytest.mark.parametrize("ours, theirs", [
    (em.Qwen3Config, transformers.Qwen3Config), (em.Qwen3MoeConfig, transformers.Qwen3MoeConfig),
    (em.Qwen3NextConfig, transformers.Qwen3NextConfig),
    (em.config.Qwen3OmniThinkerTextConfig,
     transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe.Qwen3OmniMoeTextConfig),
], ids=["qwen3", "qwen3_moe", "qwen3_next", "omni_text"])


@WITH_HF
def test_missing_rope_theta_is_transformers_default(ours, theirs):
    """A config.json without rope_theta / rope_parameters gets transformers' base for that model, not our
    dataclass default (a checkpoint's shape)."""
    data = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 128}
    assert ours.from_hf_dict(data).rope_theta == theirs(**data).rope_parameters["rope_theta"]


@WITH_HF
def test_missing_head_dim_and_null_mlp_only_layers_read_as_transformers_does(ours, theirs):
    """Without head_dim, transformers' attention uses its config class default (Qwen3 128, Qwen3-Next 256) or,
    where the class declares none, hidden_size // num_attention_heads; `mlp_only_layers: null` is []."""
    data = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "mlp_only_layers": None}
    if ours is em.config.Qwen3OmniThinkerTextConfig:  # its sections must fill head_dim / 2 = 4
        data["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]}
    hf = theirs(**data)
    cfg = ours.from_hf_dict(data)
    assert cfg.head_dim == getattr(hf, "head_dim", 32 // 4)
    if hasattr(cfg, "mlp_only_layers"):
        assert list(cfg.mlp_only_layers) == list(hf.mlp_only_layers) == []
