"""Qwen3-Omni vision and audio encoders vs HF transformers' `Qwen3OmniMoeVisionEncoder` /
`Qwen3OmniMoeAudioEncoder` (float32, eager attention, max relative error <= 2e-6): tiny random configs,
weights moved off their init (LayerNorm weights and all biases + N(0, 0.1), weight matrices at std
1/sqrt(fan_in), so pre-activations are O(1)), loaded through `hf.vision_rules` / `hf.audio_rules`. Also: the
rules' round trip, `audio_output_lengths`, `segment_attention` against a float64 NumPy masked attention,
bad-input errors, gradients (with remat), bfloat16 compute and configs."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoderConfig,
    Qwen3OmniMoeVisionEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder as HFAudioEncoder,
    Qwen3OmniMoeVisionEncoder as HFVisionEncoder,
    _get_feat_extract_output_lengths,
)

from eqx_models import hf
from eqx_models.config import Qwen3OmniAudioConfig, Qwen3OmniVisionConfig
from eqx_models.models.qwen3_omni import (
    Qwen3OmniAudioEncoder,
    Qwen3OmniMoeVisionEncoder,
    audio_output_lengths,
    segment_attention,
)
from tests.reference import assert_close

TOL = 1e-5
PARITY_TOL = 2e-6  # float32 measures <= 7e-7 here with the weights of `_nudge`

# depth 4 with deepstack after blocks 0 and 2: three scan segments, the last one after the deepstack layers
HF_VISION = dict(
    depth=4, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=48, num_heads=2, in_channels=3,
    patch_size=4, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=40, num_position_embeddings=16,
    deepstack_visual_indexes=[0, 2], rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    attn_implementation="eager",
)
# image 4x4, image 8x4 (different grids), video of 2 temporal patches 4x4: frames of 16, 32, 16, 16 patches,
# so the 16-patch segments are not adjacent (gathered) and the video attends per frame
GRID = ((1, 4, 4), (1, 8, 4), (2, 4, 4))
# n_window must stay 50; n_window_infer 400 -> 52-token windows: the 1030-frame clip (134 tokens) is split
# 52, 52, 30
HF_AUDIO = dict(
    num_mel_bins=20, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48, d_model=32,
    activation_function="gelu", max_source_positions=64, n_window=50, n_window_infer=400, conv_chunksize=500,
    downsample_hidden_size=8, output_dim=40, attn_implementation="eager",
)
FEATURE_LENS = (250, 130, 1030)


def _nudge(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """LayerNorm weights and every bias + N(0, 0.1), so `w` vs `1 + w` or dropped-bias bugs cannot hide; weight
    matrices and conv kernels from HF's std 0.02 to 1/sqrt(fan_in), so pre-activations are O(1) and the GELU
    variant matters. The vision patch and position embeddings stay at init: the first block's LayerNorm input
    keeps a variance ~0.05, where its eps shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and not name.startswith(("patch_embed.", "pos_embed.")):
                p.mul_(1 / (0.02 * p[0].numel() ** 0.5))
    return model.eval()


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _jit(fn, model, x):
    """`fn(model, x)` under `eqx.filter_jit` (op-by-op eager execution is several times slower here)."""
    return eqx.filter_jit(fn)(model, jnp.asarray(x))


def _load(cls, cfg, rules_fn, tensors):
    skeleton = eqx.filter_eval_shape(cls, cfg, key=jax.random.key(0))
    return hf.load_rules(skeleton, rules_fn(cfg, hf._leaf_paths(skeleton), prefix=""), tensors)


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    ref = _nudge(HFVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(**HF_VISION)), 1)
    cfg = Qwen3OmniVisionConfig.from_hf_dict(ref.config.to_dict())
    n = sum(t * h * w for t, h, w in GRID)
    pixels = np.random.default_rng(2).standard_normal((n, cfg.patch_dim)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels), grid_thw=torch.tensor(GRID))
    return ref, cfg, pixels, out


@pytest.fixture(scope="module")
def audio():
    torch.manual_seed(0)
    ref = _nudge(HFAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**HF_AUDIO)), 3)
    cfg = Qwen3OmniAudioConfig.from_hf_dict(ref.config.to_dict())
    feats = np.random.default_rng(4).standard_normal((cfg.num_mel_bins, sum(FEATURE_LENS))).astype(np.float32)
    with torch.no_grad():
        out = ref(input_features=torch.from_numpy(feats), feature_lens=torch.tensor(FEATURE_LENS))
    return ref, cfg, feats, out


# ----------------------------------------------------------------------------------------------------------
# HF parity


def test_vision_encoder_matches_hf(vision):
    """Merged features (HF `pooler_output`), last hidden state (`encode`, here with a numpy `grid_thw`) and
    both deepstack features, rel <= 2e-6."""
    ref, cfg, pixels, out = vision
    ours = _load(Qwen3OmniMoeVisionEncoder, cfg, hf.vision_rules, _state(ref))
    (hidden, deepstack), (features, deepstack_call) = _jit(
        lambda m, x: (m.encode(x, np.asarray(GRID)), m(x, GRID)), ours, pixels)
    assert_close(hidden, out.last_hidden_state.numpy(), PARITY_TOL, "vision last hidden state")
    assert features.shape == (sum(t * h * w for t, h, w in GRID) // 4, cfg.out_hidden_size)
    assert_close(features, out.pooler_output.numpy(), PARITY_TOL, "vision merged features")
    assert len(deepstack) == len(deepstack_call) == len(out.deepstack_features) == 2
    for j, (a, b) in enumerate(zip(deepstack_call, out.deepstack_features)):
        assert_close(a, b.numpy(), PARITY_TOL, f"vision deepstack feature {j}")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(deepstack[j]))


def test_vision_unsorted_deepstack_indexes_match_hf():
    """`deepstack_visual_indexes=[2, 0]`: HF applies `merger_list[1]` after block 0 and `merger_list[0]` after
    block 2 and returns them in block order; so do we (rel <= 2e-6)."""
    torch.manual_seed(5)
    ref = _nudge(HFVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(
        **{**HF_VISION, "depth": 3, "deepstack_visual_indexes": [2, 0]})), 6)
    cfg = Qwen3OmniVisionConfig.from_hf_dict(ref.config.to_dict())
    grid = ((1, 4, 6),)
    pixels = np.random.default_rng(7).standard_normal((24, cfg.patch_dim)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
    ours = _load(Qwen3OmniMoeVisionEncoder, cfg, hf.vision_rules, _state(ref))
    features, deepstack = _jit(lambda m, x: m(x, grid), ours, pixels)
    assert_close(features, out.pooler_output.numpy(), PARITY_TOL, "vision features, unsorted deepstack")
    for j, (a, b) in enumerate(zip(deepstack, out.deepstack_features)):
        assert_close(a, b.numpy(), PARITY_TOL, f"vision deepstack {j}, unsorted indexes")


def test_audio_encoder_matches_hf(audio):
    """Clips of 250, 130 (not multiples of 100) and 1030 frames (three attention windows) in one call: output
    rel <= 2e-6, `encode` shape, and `audio_output_lengths` tokens per clip. Each LayerNorm also matches HF's
    on an input of variance ~1e-5, where eps 1e-5 vs 1e-6 matters (the sinusoidal positions keep the
    encoder's own LayerNorm inputs at variance >= 0.25)."""
    ref, cfg, feats, out = audio
    ours = _load(Qwen3OmniAudioEncoder, cfg, hf.audio_rules, _state(ref))
    both = lambda m, x: (m(x, FEATURE_LENS), m.encode(x, np.asarray(FEATURE_LENS)))  # noqa: E731
    result, encoded = _jit(both, ours, feats)
    assert result.shape == (sum(audio_output_lengths(FEATURE_LENS)), cfg.output_dim) == (33 + 17 + 134, 40)
    assert_close(result, out.last_hidden_state.numpy(), PARITY_TOL, "audio encoder output")
    assert encoded.shape == (184, cfg.d_model)
    x = 3e-3 * np.random.default_rng(5).standard_normal((8, cfg.d_model)).astype(np.float32)
    norms = [(ours.ln_post, ref.ln_post, "ln_post")]
    for i, hf_layer in enumerate(ref.layers):
        layer = jax.tree.map(lambda a, i=i: a[i], ours.layers)
        norms += [(layer.input_layer_norm, hf_layer.self_attn_layer_norm, f"layer {i} input_layer_norm"),
                  (layer.post_attention_layer_norm, hf_layer.final_layer_norm, f"layer {i} post-attention norm")]
    for norm, hf_norm, what in norms:
        with torch.no_grad():
            expected = hf_norm(torch.from_numpy(x)).numpy()
        assert_close(norm(jnp.asarray(x)), expected, PARITY_TOL, f"audio {what}, input variance 1e-5")


def test_audio_output_lengths_match_hf():
    """`audio_output_lengths` == HF `_get_feat_extract_output_lengths` for 1..1000 frames, on an int, a tuple,
    a numpy array and a jax array."""
    lens = np.arange(1, 1001)
    expected = _get_feat_extract_output_lengths(torch.from_numpy(lens)).numpy()
    np.testing.assert_array_equal(audio_output_lengths(lens), expected)
    np.testing.assert_array_equal(np.asarray(audio_output_lengths(jnp.asarray(lens, jnp.int32))), expected)
    assert audio_output_lengths(tuple(lens[:5].tolist())) == tuple(expected[:5].tolist())
    assert audio_output_lengths(250) == 33 and audio_output_lengths(100) == 13


# ----------------------------------------------------------------------------------------------------------
# Weight mapping


@pytest.mark.parametrize("which", ["vision", "audio"])
def test_rules_round_trip_and_strict_loading(which, vision, audio):
    """Every HF tensor maps to exactly one slice of ours and back bit-exactly (also with a `visual.` /
    `audio_tower.` prefix); missing, unexpected and wrongly shaped tensors are all named."""
    ref, cfg = (vision if which == "vision" else audio)[:2]
    cls, rules_fn, prefix = ((Qwen3OmniMoeVisionEncoder, hf.vision_rules, "visual.") if which == "vision"
                             else (Qwen3OmniAudioEncoder, hf.audio_rules, "audio_tower."))
    tensors = {prefix + k: v for k, v in _state(ref).items()}
    skeleton = eqx.filter_eval_shape(cls, cfg, key=jax.random.key(0))
    rules = rules_fn(cfg, hf._leaf_paths(skeleton), prefix)
    ours = hf.load_rules(skeleton, rules, tensors)
    flat = jax.tree_util.tree_flatten_with_path(ours)[0]
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
    assert {r.hf_key for r in rules} == set(tensors)
    for rule in rules:
        np.testing.assert_array_equal(rule.to_hf(leaves[rule.leaf][rule.index]), tensors[rule.hf_key])

    broken = dict(tensors)
    first, second = sorted(broken)[:2]
    del broken[first]
    broken[second] = np.zeros((3, 3), np.float32)
    broken[prefix + "extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError) as info:
        hf.load_rules(skeleton, rules, broken)
    for name in (first, second, prefix + "extra.weight"):
        assert name in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Segment attention


def test_segment_attention_matches_masked_numpy():
    """Segments [5, 3, 5, 2, 5] (the length-5 ones not adjacent) == float64 NumPy attention with a
    block-diagonal mask, rel <= 1e-5; a single segment is plain full attention."""
    rng = np.random.default_rng(8)
    lengths = (5, 3, 5, 2, 5)
    q, k, v = (rng.standard_normal((sum(lengths), 2, 8)) for _ in range(3))

    def reference(segment_ids):
        same = segment_ids[:, None] == segment_ids[None]
        logits = np.einsum("qhd,khd->hqk", q, k) * 8**-0.5 + np.where(same, 0.0, -np.inf)[None]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return np.einsum("hqk,khd->qhd", probs / probs.sum(-1, keepdims=True), v)

    as32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    ours = segment_attention(as32(q), as32(k), as32(v), lengths, scale=8**-0.5)
    assert_close(ours, reference(np.repeat(np.arange(len(lengths)), lengths)), TOL, "segment attention")
    whole = segment_attention(as32(q), as32(k), as32(v), (sum(lengths),), scale=8**-0.5, kernel="dot_product")
    assert_close(whole, reference(np.zeros(sum(lengths))), TOL, "one segment")
    with pytest.raises(ValueError, match="sum to seq"):
        segment_attention(as32(q), as32(k), as32(v), (5, 5), scale=1.0)


# ----------------------------------------------------------------------------------------------------------
# Bad input, gradients, dtypes


def test_vision_bad_input(vision):
    _, cfg, pixels, _ = vision
    ours = eqx.filter_eval_shape(Qwen3OmniMoeVisionEncoder, cfg, key=jax.random.key(0))
    ours = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ours)
    x = jnp.asarray(pixels)
    with pytest.raises(ValueError, match=r"sum\(t\*h\*w\) = 80"):
        ours(x[:-4], GRID)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
        ours(x[:60], ((1, 4, 15),))
    with pytest.raises(ValueError, match="flattened"):
        ours(x[:, :-1], GRID)
    with pytest.raises(ValueError, match="must be positive"):
        ours(x, ((0, 4, 4), (1, 8, 10)))
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda g: ours(x, g)[0])(jnp.asarray(GRID))


def test_audio_bad_input(audio):
    _, cfg, feats, _ = audio
    ours = eqx.filter_eval_shape(Qwen3OmniAudioEncoder, cfg, key=jax.random.key(0))
    ours = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ours)
    x = jnp.asarray(feats)
    with pytest.raises(ValueError, match="sum to 1409"):
        ours(x, (250, 130, 1029))
    with pytest.raises(ValueError, match="num_mel_bins=20"):
        ours(x[:-1], FEATURE_LENS)
    with pytest.raises(ValueError, match="positive frame counts"):
        ours(x, (1410, 0))
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda lens: ours(x, lens))(jnp.asarray(FEATURE_LENS))


def test_gradients_flow_with_remat(vision, audio):
    """Finite, non-zero gradients for every parameter of both encoders under `remat_policy="full"`; the loss
    (sum of squares of the features and deepstack features) equals HF's outputs' within 1e-5."""
    for (ref, cfg, inputs, out), cls, rules_fn, static in (
        (vision, Qwen3OmniMoeVisionEncoder, hf.vision_rules, GRID),
        (audio, Qwen3OmniAudioEncoder, hf.audio_rules, FEATURE_LENS),
    ):
        model = _load(cls, cfg.replace(remat_policy="full"), rules_fn, _state(ref))

        def loss(m, x, static=static):
            result = m(x, static)
            features, deep = result if isinstance(result, tuple) else (result, ())
            return jnp.sum(features**2) + sum(jnp.sum(d**2) for d in deep)

        value, grads = _jit(eqx.filter_value_and_grad(loss), model, inputs)
        hf_outputs = [out.pooler_output, *getattr(out, "deepstack_features", ())]
        expected = sum(float((o.double() ** 2).sum()) for o in hf_outputs)
        assert_close(value, expected, TOL, f"{cls.__name__} remat loss vs HF outputs")
        for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
            name = jax.tree_util.keystr(path)
            assert np.isfinite(np.asarray(g)).all(), name
            assert np.abs(np.asarray(g)).max() > 0, f"zero gradient for {name}"


def test_bfloat16_compute(vision, audio):
    """`dtype="bfloat16"` (float32 parameters) runs under strict promotion, returns bf16, and stays within
    3e-2 relative of HF float32 (bf16 has an 8-bit mantissa)."""
    ref, cfg, pixels, out = vision
    ours = _load(Qwen3OmniMoeVisionEncoder, cfg.replace(dtype="bfloat16"), hf.vision_rules, _state(ref))
    features, deepstack = _jit(lambda m, x: m(x, GRID), ours, pixels)
    assert features.dtype == deepstack[0].dtype == jnp.bfloat16
    assert_close(features.astype(jnp.float32), out.pooler_output.numpy(), 3e-2, "vision bf16 features")
    ref, cfg, feats, out = audio
    ours = _load(Qwen3OmniAudioEncoder, cfg.replace(dtype="bfloat16"), hf.audio_rules, _state(ref))
    result = _jit(lambda m, x: m(x, FEATURE_LENS), ours, feats)
    assert result.dtype == jnp.bfloat16
    assert_close(result.astype(jnp.float32), out.last_hidden_state.numpy(), 3e-2, "audio bf16 output")


# ----------------------------------------------------------------------------------------------------------
# Configs


def test_configs_round_trip_hf_dicts():
    """`from_hf_dict(HF config.to_dict())` reads every field; `to_hf_dict` gives back HF's values; defaults
    equal HF's class defaults."""
    for ours_cls, hf_cls, kwargs in ((Qwen3OmniVisionConfig, Qwen3OmniMoeVisionEncoderConfig, HF_VISION),
                                     (Qwen3OmniAudioConfig, Qwen3OmniMoeAudioEncoderConfig, HF_AUDIO)):
        for hf_cfg in (hf_cls(**kwargs), hf_cls()):
            data = hf_cfg.to_dict()
            ours = ours_cls.from_hf_dict(data)
            written = ours.to_hf_dict()
            for key, value in written.items():
                assert data[key] == value, (ours_cls.__name__, key, data[key], value)
            assert ours_cls.from_hf_dict(written) == ours
    assert Qwen3OmniVisionConfig().to_hf_dict()["rope_parameters"]["rope_theta"] == 10000.0


@pytest.mark.parametrize(("cls", "changes", "message"), [
    (Qwen3OmniAudioConfig, dict(n_window=25), "13 tokens per 100-frame chunk"),
    (Qwen3OmniAudioConfig, dict(n_window_infer=50), "n_window_infer"),
    (Qwen3OmniAudioConfig, dict(d_model=30, encoder_attention_heads=4), "divisible"),
    (Qwen3OmniAudioConfig, dict(activation_function="swiglu"), "activation_function"),
    (Qwen3OmniVisionConfig, dict(deepstack_visual_indexes=(1, 27)), "deepstack_visual_indexes"),
    (Qwen3OmniVisionConfig, dict(num_position_embeddings=20), "perfect square"),
    (Qwen3OmniVisionConfig, dict(hidden_size=36, num_heads=6), "multiple of 4"),
    (Qwen3OmniVisionConfig, dict(dtype="float64"), "dtype"),
])
def test_config_validation(cls, changes, message):
    with pytest.raises(ValueError, match=message):
        cls(**changes)
    assert dataclasses.replace(cls(), **{k: getattr(cls(), k) for k in changes}) == cls()
