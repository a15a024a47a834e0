"""`Qwen3OmniThinkerForConditionalGeneration` and `get_rope_index` against HF transformers 5.23
(`Qwen3OmniMoeThinkerForConditionalGeneration`, float32, eager attention and experts): MRoPE position ids and
rope deltas exactly; logits on plain ids and on explicit 3-D positions (1e-5 relative), and on a left-padded
batch with images of two grids, a video and two audio clips (DeepStack added across a repeat boundary of the
layer scan; encoder matrices scaled to O(1) pre-activations; 2e-6 relative); checkpoints both ways
(thinker-only layout, and the full model's `thinker.` prefix); bad-input errors; encoder freezing."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoderConfig,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeTextConfig,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeVisionEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

import eqx_models as em
from eqx_models.config import Qwen3OmniThinkerConfig
from eqx_models.models.qwen3_omni import Qwen3OmniThinkerForConditionalGeneration, get_rope_index
from tests.reference import assert_close

VOCAB = 256
AUDIO, IMAGE, VIDEO, AUDIO_START, VISION_START, END = 250, 251, 252, 253, 254, 255
MERGE, PATCH_DIM, MEL = 2, 3 * 2 * 4 * 4, 16
EAGER = dict(attn_implementation="eager")


def _hf_config(**thinker) -> Qwen3OmniMoeThinkerConfig:
    """Tiny thinker: 4 text layers (dense/MoE alternating, so the scan has period 2 and 2 repeats), vision
    depth 3 with DeepStack after blocks 0, 1, 2 (added after text layers 0, 1, 2), audio with n_window 50."""
    text = Qwen3OmniMoeTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=2, rms_norm_eps=1e-6, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [6, 5, 5],
                         "interleaved": True},
        experts_implementation="eager", **EAGER,
    )
    vision = Qwen3OmniMoeVisionEncoderConfig(
        depth=3, hidden_size=32, hidden_act="gelu_pytorch_tanh", intermediate_size=64, num_heads=2,
        in_channels=3, patch_size=4, temporal_patch_size=2, spatial_merge_size=MERGE, out_hidden_size=64,
        num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2],
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}, **EAGER,
    )
    audio = Qwen3OmniMoeAudioEncoderConfig(
        num_mel_bins=MEL, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
        max_source_positions=64, n_window=50, n_window_infer=200, downsample_hidden_size=8, output_dim=64,
        **EAGER,
    )
    return Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, audio_token_id=AUDIO,
        image_token_id=IMAGE, video_token_id=VIDEO, audio_start_token_id=AUDIO_START,
        vision_start_token_id=VISION_START, position_id_per_seconds=25, **EAGER, **thinker,
    )


def _nudge(model: torch.nn.Module) -> None:
    """Norm weights and biases + N(0, 0.1) (so `w` vs `1 + w` bugs show); router weights x5 (decisive
    routing)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            if name.endswith("mlp.gate.weight"):
                p.mul_(5.0)


def _scale_encoders(model: torch.nn.Module) -> None:
    """Vision and audio weight matrices and conv kernels (not the patch and position embeddings) from HF's std
    0.02 to 1/sqrt(fan_in): O(1) pre-activations, so a wrong GELU variant shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim >= 2 and name.startswith(("model.visual.", "model.audio_tower."))
                    and not name.startswith(("model.visual.patch_embed.", "model.visual.pos_embed."))):
                p.mul_(1 / (0.02 * p[0].numel() ** 0.5))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The HF thinker (nudged, encoders scaled) and ours, loaded from its `save_pretrained` checkpoint by
    `from_pretrained`."""
    torch.manual_seed(0)
    hf = Qwen3OmniMoeThinkerForConditionalGeneration(_hf_config()).eval()
    _nudge(hf)
    _scale_encoders(hf)
    path = tmp_path_factory.mktemp("thinker")
    hf.save_pretrained(path)
    ours = em.from_pretrained(path)
    assert type(ours) is Qwen3OmniThinkerForConditionalGeneration
    return hf, ours


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _row(rng, spec) -> list[int]:
    """Token ids from `(kind, n)` items: text, or a placeholder block `<start> placeholder x n <end>`."""
    ids = []
    for kind, n in spec:
        if kind == "text":
            ids += rng.integers(0, 240, n).tolist()
        elif kind == "av":  # audio in video: <vision_start><audio_start> video+audio placeholders <end><end>
            ids += [VISION_START, AUDIO_START] + [VIDEO] * n[0] + [AUDIO] * n[1] + [END, END]
        else:
            start, token = {"image": (VISION_START, IMAGE), "video": (VISION_START, VIDEO),
                            "audio": (AUDIO_START, AUDIO)}[kind]
            ids += [start] + [token] * n + [END]
    return ids


def _batch(rows: list[list[int]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask."""
    seq = max(len(r) for r in rows)
    ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros((len(rows), seq), np.int64)
    for i, r in enumerate(rows):
        ids[i, seq - len(r):] = r
        mask[i, seq - len(r):] = 1
    return ids, mask


def _tokens(grid) -> int:
    return int(np.prod(grid)) // MERGE**2


def _audio_tokens(frames: int) -> int:
    rest = ((frames % 100 - 1) // 2 + 1 - 1) // 2 + 1
    return (rest - 1) // 2 + 1 + frames // 100 * 13


# (id, row specs, image grids, video grids, seconds per grid, audio frames, use_audio_in_video)
ROPE_CASES = [
    ("text", [[("text", 9)], [("text", 6)]], None, None, None, None, False),
    ("text+image", [[("text", 3), ("image", 4), ("text", 4)]], [(1, 4, 4)], None, None, None, False),
    ("two-images", [[("text", 2), ("image", 4), ("text", 3), ("image", 6), ("text", 2)]],
     [(1, 4, 4), (1, 6, 4)], None, None, None, False),
    ("video", [[("text", 2), ("video", 8), ("text", 3)]], None, [(2, 4, 4)], [0.5], None, False),
    ("audio-only", [[("text", 2), ("audio", 17), ("text", 3)]], None, None, None, [130], False),
    ("image+audio", [[("text", 2), ("audio", 8), ("text", 1), ("image", 4), ("text", 2)]],
     [(1, 4, 4)], None, None, [60], False),
    ("left-padded", [[("text", 2), ("image", 6), ("text", 5)], [("text", 1), ("image", 4), ("text", 2)]],
     [(1, 6, 4), (1, 4, 4)], None, None, None, False),
    ("audio-in-video", [[("text", 2), ("av", (8, 33)), ("text", 3)]], None, [(2, 4, 4)], [2.0], [250], True),
]


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_get_rope_index_matches_hf(models, case):
    """Position ids `[batch, seq, 3]` (HF `[3, batch, seq]` transposed) and rope_deltas equal HF's exactly."""
    hf, ours = models
    _, specs, images, videos, seconds, audio, use_aiv = case
    rng = np.random.default_rng(1)
    ids, mask = _batch([_row(rng, s) for s in specs])
    as_torch = lambda x, dtype=torch.long: None if x is None else torch.tensor(x, dtype=dtype)  # noqa: E731
    ref_pos, ref_delta = hf.get_rope_index(
        torch.tensor(ids), as_torch(images), as_torch(videos), torch.tensor(mask), use_aiv, as_torch(audio),
        as_torch(seconds, torch.float32),
    )
    pos, delta = get_rope_index(ours.config, ids, images, videos, mask, use_aiv, audio, seconds)
    assert pos.shape == (*ids.shape, 3) and pos.dtype == np.float32
    np.testing.assert_array_equal(pos, ref_pos.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().astype(np.float32).reshape(-1, 1))
    if images is not None or videos is not None:
        assert not np.array_equal(pos[..., 0], pos[..., 1]), "the case should exercise distinct MRoPE axes"


# ----------------------------------------------------------------------------------------------------------
# Logits


def test_text_logits_match_hf(models):
    """Plain ids (left-padded row; HF attention_mask) and explicit distinct 3-D positions (no images): logits
    equal HF's at real tokens, 1e-5 relative."""
    hf, ours = models
    rng = np.random.default_rng(2)
    ids, mask = _batch([_row(rng, [("text", 13)]), _row(rng, [("text", 9)])])
    pos = np.stack([np.arange(13), np.arange(13) // 2 + 3, np.arange(13) % 5], -1)[None].repeat(2, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        hf_pos = torch.tensor(pos).permute(2, 0, 1)
        ref_pos = hf(input_ids=torch.tensor(ids), position_ids=hf_pos).logits.numpy()
    ids_j, mask_j, pos_j = (jnp.asarray(x, jnp.int32) for x in (ids, mask, pos))
    run = eqx.filter_jit(lambda m, i, a, p: (m(i, attention_mask=a), m(i, position_ids=p)))
    got, got_pos = run(ours, ids_j, mask_j, pos_j)
    assert got.dtype == jnp.float32 and got.shape == (2, 13, VOCAB)
    valid = mask.astype(bool)
    assert_close(np.asarray(got)[valid], ref[valid], 1e-5, "thinker text logits (left-padded)")
    assert_close(got_pos, ref_pos, 1e-5, "thinker text logits (explicit 3-D positions)")


def _multimodal_inputs(seed: int = 3):
    """Row 0: text, image (1,4,4), text, audio (130 frames), text. Row 1 (left-padded): image (1,6,4), video
    (2,4,4) at 2 s per grid, audio (60 frames)."""
    rng = np.random.default_rng(seed)
    images, videos = [(1, 4, 4), (1, 6, 4)], [(2, 4, 4)]
    frames = [130, 60]
    rows = [
        _row(rng, [("text", 3), ("image", _tokens(images[0])), ("text", 2), ("audio", _audio_tokens(130)),
                   ("text", 5)]),
        _row(rng, [("text", 1), ("image", _tokens(images[1])), ("text", 1), ("video", _tokens(videos[0])),
                   ("text", 1), ("audio", _audio_tokens(60)), ("text", 2)]),
    ]
    ids, mask = _batch(rows)
    assert mask[1, 0] == 0, "row 1 should be left-padded"
    pixels = rng.standard_normal((sum(int(np.prod(g)) for g in images), PATCH_DIM)).astype(np.float32)
    video = rng.standard_normal((int(np.prod(videos[0])), PATCH_DIM)).astype(np.float32)
    features = np.zeros((2, MEL, max(frames)), np.float32)
    feature_mask = np.zeros((2, max(frames)), np.int64)
    for i, n in enumerate(frames):
        features[i, :, :n] = rng.standard_normal((MEL, n))
        feature_mask[i, :n] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=images,
                pixel_values_videos=video, video_grid_thw=videos, video_second_per_grid=[2.0],
                input_features=features, feature_attention_mask=feature_mask)


def _hf_logits(hf, inputs) -> np.ndarray:
    torch_inputs = {k: torch.tensor(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return hf(**torch_inputs).logits.numpy()


_STATIC = ("image_grid_thw", "video_grid_thw", "video_second_per_grid", "feature_attention_mask")


@eqx.filter_jit
def _jit_logits(model, arrays, static):
    """Python ints / floats / tuples in `static` are static under `filter_jit`; one compilation per layout."""
    return model(**arrays, **static)


def _our_logits(model, inputs, *, close_over_ids: bool = False) -> np.ndarray:
    """Our logits under `filter_jit`, the grids and the feature mask static (tuples). By default the MRoPE
    positions come from `get_rope_index` on the host and are passed in (traced ids cannot give them);
    `close_over_ids` closes over the concrete ids and mask instead, so the model computes its positions."""
    arrays = {k: jnp.asarray(inputs[k], jnp.float32)
              for k in ("pixel_values", "pixel_values_videos", "input_features")}
    ids = {k: jnp.asarray(inputs[k], jnp.int32) for k in ("input_ids", "attention_mask")}
    static = {k: _as_tuples(inputs[k]) for k in _STATIC}
    if close_over_ids:
        return np.asarray(eqx.filter_jit(lambda m, a: m(**a, **ids, **static))(model, arrays))
    position_ids, _ = model.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["attention_mask"],
        audio_seqlens=inputs["feature_attention_mask"].sum(axis=1),
        second_per_grids=inputs["video_second_per_grid"],
    )
    arrays = {**arrays, **ids, "position_ids": jnp.asarray(position_ids)}
    return np.asarray(_jit_logits(model, arrays, static))


def _as_tuples(x):
    """Nested tuples of Python numbers (static under `filter_jit`)."""
    x = np.asarray(x).tolist()
    return tuple(map(_as_tuples, x)) if isinstance(x, list) else x


def test_multimodal_logits_match_hf(models):
    """Two images of different grids, a video and two audio clips in a left-padded batch: placeholder merging,
    DeepStack (image and video features jointly, after text layers 0, 1, 2 of a period-2 scan), MRoPE from
    `get_rope_index`: logits equal HF's at real tokens, 2e-6 relative (float32 measures 6e-7)."""
    hf, ours = models
    assert (len(ours.transformer.blocks), ours.transformer.num_repeats) == (2, 2)
    inputs = _multimodal_inputs()
    ref = _hf_logits(hf, inputs)
    valid = inputs["attention_mask"].astype(bool)
    for close_over_ids, how in ((False, "positions from get_rope_index"), (True, "positions made inside")):
        got = _our_logits(ours, inputs, close_over_ids=close_over_ids)
        assert_close(got[valid], ref[valid], 2e-6, f"thinker logits (image, video, audio, padded; {how})")


def test_positions_and_segment_ids_like_every_model(models):
    """`positions` / `segment_ids` (the library's common names) on the multimodal batch equal HF's
    `position_ids` / `attention_mask` (0/1 segments); a packed text row equals its documents run alone; both
    names at once, or packed rows with images and no positions, are ValueErrors."""
    _, ours = models
    inputs = _multimodal_inputs()
    arrays = {k: jnp.asarray(inputs[k], jnp.float32)
              for k in ("pixel_values", "pixel_values_videos", "input_features")}
    static = {k: _as_tuples(inputs[k]) for k in _STATIC}
    ids, mask = jnp.asarray(inputs["input_ids"], jnp.int32), jnp.asarray(inputs["attention_mask"], jnp.int32)
    hf_names = np.asarray(ours(ids, attention_mask=mask, **arrays, **static))
    common = np.asarray(ours(ids, segment_ids=mask, **arrays, **static))
    valid = inputs["attention_mask"].astype(bool)
    assert_close(common[valid], hf_names[valid], 1e-6, "segment_ids as the attention mask")

    text = jnp.asarray(np.random.default_rng(4).integers(0, 200, (1, 14)), jnp.int32)
    packed = np.asarray(ours(text, segment_ids=jnp.asarray([[1] * 6 + [2] * 8], jnp.int32)))
    alone = [np.asarray(ours(text[:, :6]))[0], np.asarray(ours(text[:, 6:]))[0]]
    assert_close(packed[0], np.concatenate(alone), 1e-5, "packed text row vs its documents alone")
    with pytest.raises(ValueError, match="give positions or position_ids"):
        ours(text, positions=jnp.zeros((1, 14), jnp.int32), position_ids=jnp.zeros((1, 14), jnp.int32))
    with pytest.raises(ValueError, match="give attention_mask .* or segment_ids"):
        ours(text, attention_mask=jnp.ones((1, 14), jnp.int32), segment_ids=jnp.ones((1, 14), jnp.int32))
    with pytest.raises(ValueError, match="packed rows .* need position_ids"):
        ours(ids, segment_ids=mask * jnp.where(jnp.arange(ids.shape[1]) > ids.shape[1] // 2, 2, 1), **arrays, **static)


# ----------------------------------------------------------------------------------------------------------
# Generation

GEN_NEW = 12


@pytest.fixture(scope="module")
def generation_models(tmp_path_factory):
    """The HF thinker (nudged) with its text decoder's matrices x10 (std 0.2: at HF's 0.02 greedy decoding
    repeats one token, so token-for-token equality would be weak) and the vision mergers' output matrices
    scaled to match (x10 the final merger's, x30 the DeepStack mergers', so DeepStack sways the tokens), and
    ours loaded from its checkpoint."""
    torch.manual_seed(0)
    hf = Qwen3OmniMoeThinkerForConditionalGeneration(_hf_config()).eval()
    _nudge(hf)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and (".language_model." in name or name.startswith("lm_head")):
                p.mul_(10.0)
            elif name.endswith("merger.mlp.2.weight"):
                p.mul_(10.0)
            elif "merger_list" in name and name.endswith("mlp.2.weight"):
                p.mul_(30.0)
    path = tmp_path_factory.mktemp("thinker_generation")
    hf.save_pretrained(path)
    return hf, em.from_pretrained(path)


def _hf_generate(hf, inputs: dict, max_new: int) -> np.ndarray:
    torch_inputs = {k: v if isinstance(v, bool) else torch.tensor(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        out = hf.generate(**torch_inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out.numpy()


def _our_generate(model, inputs: dict, max_new: int, **kwargs) -> np.ndarray:
    static_keys = (*_STATIC, "use_audio_in_video")
    arrays = {k: jnp.asarray(v) for k, v in inputs.items() if k not in static_keys}
    static = {k: inputs[k] for k in static_keys if k in inputs}
    ids = arrays.pop("input_ids").astype(jnp.int32)
    return np.asarray(em.generate(model, ids, max_new, **arrays, **static, **kwargs))


def _tall_audio_in_video_inputs(seed: int = 1):
    """Row 0: text, then a video (1, 20, 4) with its 30-frame audio track (use_audio_in_video), then one text
    token: the video's row positions outrun the audio's, so the prompt's largest position is not its last
    token's."""
    rng = np.random.default_rng(seed)
    video, frames = (1, 20, 4), 30
    ids, mask = _batch([_row(rng, [("text", 2), ("av", (_tokens(video), _audio_tokens(frames))), ("text", 1)])])
    return dict(input_ids=ids, attention_mask=mask, video_grid_thw=[video], video_second_per_grid=[1.0],
                pixel_values_videos=rng.standard_normal((int(np.prod(video)), PATCH_DIM)).astype(np.float32),
                input_features=rng.standard_normal((1, MEL, frames)).astype(np.float32),
                feature_attention_mask=np.ones((1, frames), np.int64), use_audio_in_video=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["multimodal", "tall-audio-in-video", "text"])
def test_greedy_generate_matches_hf(generation_models, case):
    """Greedy `generate` == HF `generate(do_sample=False)` token for token: a left-padded batch with two images
    of different grids, a video and two audio clips (MRoPE prefill positions, DeepStack); an audio-in-video
    prompt whose largest position comes before its last token (decoding goes on from the last token's
    positions + 1, as HF extends them); a left-padded text-only batch. The scanned and the unrolled decoder
    agree."""
    hf, ours = generation_models
    if case == "multimodal":
        inputs = _multimodal_inputs()
    elif case == "tall-audio-in-video":
        inputs = _tall_audio_in_video_inputs()
        positions, _ = get_rope_index(ours.config, inputs["input_ids"], None, inputs["video_grid_thw"],
                                      inputs["attention_mask"], True, [30], [1.0])
        assert positions[0].max() > positions[0, -1].max(), "the case needs a largest position before the end"
    else:
        rng = np.random.default_rng(5)
        ids, mask = _batch([_row(rng, [("text", 11)]), _row(rng, [("text", 6)])])
        inputs = dict(input_ids=ids, attention_mask=mask)
    ref = _hf_generate(hf, inputs, GEN_NEW)
    got = _our_generate(ours, inputs, GEN_NEW)
    prompt = inputs["input_ids"].shape[1]
    assert got.shape == ref.shape == (len(inputs["input_ids"]), prompt + GEN_NEW)
    for row in got[:, prompt:]:
        assert len(set(row.tolist())) > 3, "degenerate greedy output: the test would be weak"
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(_our_generate(ours, inputs, GEN_NEW, unroll_layers=False), ref)


def test_prompt_inputs_match_the_forward(models):
    """`prompt_inputs`: the merged embeddings and DeepStack residuals are the forward's (the logits from them
    equal the model's), positions are `get_rope_index`'s, and each row's last position + 1, where `generate`
    continues, is real tokens + delta (here the last token holds the largest position)."""
    _, ours = models
    inputs = _multimodal_inputs()
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kwargs = {k: (v if k in _STATIC else jnp.asarray(v)) for k, v in kwargs.items()}
    ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    prompt = ours.prompt_inputs(ids, inputs["attention_mask"], **kwargs)
    positions, deltas = ours.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["attention_mask"],
        audio_seqlens=inputs["feature_attention_mask"].sum(axis=1), second_per_grids=inputs["video_second_per_grid"],
    )
    np.testing.assert_array_equal(prompt.positions, positions)
    expected = inputs["attention_mask"].sum(axis=1) + deltas[:, 0]
    np.testing.assert_array_equal(prompt.positions[:, -1] + 1, np.repeat(expected[:, None], 3, axis=1))
    assert prompt.layer_residuals.shape == (3, *ids.shape, 64)
    segments = jnp.asarray(inputs["attention_mask"], jnp.int32)
    hidden = ours.transformer.forward(ids, prompt.positions, segments, inputs_embeds=prompt.inputs_embeds,
                                      layer_residuals=prompt.layer_residuals).hidden
    valid = inputs["attention_mask"].astype(bool)
    expected = _our_logits(ours, inputs)
    assert_close(np.asarray(ours.logits(hidden))[valid], expected[valid], 1e-6, "logits from prompt_inputs")


def test_prompt_padding_may_hold_any_id(models):
    """As for every model under `generate`: ids under attention_mask 0 never reach the embedding (-1 padding gave
    "token ids must lie in [0, 256)"), and a bool mask is taken (it was refused)."""
    _, ours = models
    inputs = _multimodal_inputs()
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    kwargs = {k: (v if k in _STATIC else jnp.asarray(v)) for k, v in kwargs.items()}
    mask = inputs["attention_mask"]
    assert not mask.all(), "the case needs left padding"
    ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    expected = ours.prompt_inputs(jnp.where(mask != 0, ids, 0), mask, **kwargs)
    got = ours.prompt_inputs(jnp.where(mask != 0, ids, -1), mask.astype(bool), **kwargs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_checks_placeholders_before_encoding(models):
    """Under `generate` the ids are concrete, so a placeholder count that does not match the features is
    caught (a clear ValueError), unlike under a user's `jit`."""
    _, ours = models
    inputs = _multimodal_inputs()
    ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    with pytest.raises(ValueError, match=r"Image features and image tokens do not match: 10 place.*4 fea"):
        em.generate(ours, ids, 2, attention_mask=jnp.asarray(inputs["attention_mask"]),
                    pixel_values=jnp.asarray(inputs["pixel_values"])[:16], image_grid_thw=[(1, 4, 4)])


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def test_save_pretrained_loads_in_hf(models, tmp_path):
    """Our `save_pretrained` -> HF `from_pretrained`: the thinker-only layout and config; HF's logits on the
    multimodal batch equal ours, 1e-5."""
    _, ours = models
    em.save_pretrained(ours, tmp_path)
    hf = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tmp_path, **EAGER).eval()
    assert hf.config.model_type == "qwen3_omni_moe_thinker"
    assert hf.config.text_config.rope_parameters["mrope_section"] == [6, 5, 5]
    assert hf.config.vision_config.deepstack_visual_indexes == [0, 1, 2]
    hf.config.text_config._experts_implementation = "eager"
    inputs = _multimodal_inputs(seed=4)
    valid = inputs["attention_mask"].astype(bool)
    assert_close(_our_logits(ours, inputs)[valid], _hf_logits(hf, inputs)[valid], 1e-5,
                 "ours -> save_pretrained -> HF logits")


def test_full_model_checkpoint_reads_thinker(models, tmp_path):
    """A full `Qwen3OmniMoeForConditionalGeneration` checkpoint (model_type `qwen3_omni_moe`, tensors under
    `thinker.`; extra `talker.*` tensors ignored as HF does) loads as the thinker with identical parameters;
    saving it writes the thinker-only layout."""
    hf, ours = models
    full = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(
        thinker_config=hf.config.to_dict(), enable_audio_output=False)).eval()
    full.thinker.load_state_dict(hf.state_dict())
    full.save_pretrained(tmp_path / "full")
    save_file({"talker.extra.weight": np.zeros((2, 2), np.float32)}, tmp_path / "full" / "talker.safetensors")
    loaded = em.from_pretrained(tmp_path / "full")
    assert loaded.config.checkpoint_prefix == "thinker."
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    em.save_pretrained(loaded, tmp_path / "thinker")
    from safetensors import safe_open
    with safe_open(tmp_path / "thinker" / "model.safetensors", framework="numpy") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "visual.merger.mlp.0.weight" in keys
    assert not any(k.startswith("thinker.") for k in keys)


# ----------------------------------------------------------------------------------------------------------
# Errors and freezing


def test_bad_inputs_raise(models):
    """Placeholder counts not matching the features (both counts named), pixel rows not matching the grid,
    pixels without a grid, audio without (or with a misshapen) feature mask, traced grids: clear ValueErrors,
    all raised before any encoder runs."""
    _, ours = models
    inputs = _multimodal_inputs()
    ids = jnp.asarray(inputs["input_ids"], jnp.int32)
    pixels = jnp.asarray(inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"Image features and image tokens do not match: 10 place.*4 fea"):
        ours(ids, pixel_values=pixels[:16], image_grid_thw=[(1, 4, 4)])
    # every frame marked valid: two 130-frame clips give 2 x 17 audio features for 17 + 8 placeholders
    features = jnp.asarray(inputs["input_features"])
    all_valid = np.ones_like(inputs["feature_attention_mask"])
    with pytest.raises(ValueError, match=r"Audio features and audio tokens do not match: 25 place.*34 fea"):
        ours(ids, input_features=features, feature_attention_mask=all_valid)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(36, 96\).*sum\(t\*h\*w\) = 40"):
        ours(ids, pixel_values=pixels[:-4], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="without their grid"):
        ours(ids, pixel_values=pixels)
    with pytest.raises(ValueError, match="feature_attention_mask"):
        ours(ids, input_features=features)
    with pytest.raises(ValueError, match=r"feature_attention_mask \(2, 129\) must be \(audios, frames\)"):
        ours(ids, input_features=features, feature_attention_mask=inputs["feature_attention_mask"][:, :-1])
    with pytest.raises(ValueError, match="image_grid_thw must be static"):
        jax.jit(lambda g: ours(ids, pixel_values=pixels, image_grid_thw=g))(jnp.asarray(inputs["image_grid_thw"]))
    # ranks, past the shape checker (without it these were an IndexError and a TypeError from concatenate)
    audio_inputs, vision_inputs = (inspect.unwrap(getattr(type(ours), n)) for n in ("_audio_inputs", "_vision_inputs"))
    with pytest.raises(ValueError, match=r"input_features must be \[audios, mel, frames\], got shape \(16, 130\)"):
        audio_inputs(ours, ids, features[0], inputs["feature_attention_mask"], True)
    with pytest.raises(ValueError, match=r"video pixels must be \[patches, patch_dim\], got shape \(1, 40, 96\)"):
        vision_inputs(ours, ids, (pixels[None], inputs["image_grid_thw"], ours.config.video_token_id, "video", True))


def test_placeholder_blocks_must_match_their_items_in_order(models):
    """Totals that agree hid blocks that do not: features fill placeholders in order, so a block of the wrong
    length took rows of the next image or clip (HF does the same, silently). Each block is now checked against its
    image / clip, grids or clips left over are named, and so are a clip with no valid frame and video seconds that
    are not positive and finite (NaN made every logit NaN)."""
    _, ours = models
    rng = np.random.default_rng(0)
    # three grids (4 + 1 + 1 tokens) against two image blocks of 4 and 2 tokens
    ids = jnp.asarray([_row(rng, [("text", 2), ("image", 4), ("text", 1), ("image", 2), ("text", 1)])])
    grids = [(1, 4, 4), (1, 2, 2), (1, 2, 2)]
    pixels = jnp.asarray(rng.standard_normal((24, PATCH_DIM)), jnp.float32)
    with pytest.raises(ValueError, match=r"image placeholder blocks in input_ids hold \[4, 2\] tokens \(id 251\), "
                                         r"but the images given make \[4, 1, 1\] feature rows"):
        ours(ids, pixel_values=pixels, image_grid_thw=grids)
    with pytest.raises(ValueError, match="image_grid_thw holds 3 entries, but the input_ids have 2 such blocks"):
        get_rope_index(ours.config, ids, grids)
    # clips of 37 and 130 frames (5 and 17 tokens) with their blocks the other way round
    ids = jnp.asarray([_row(rng, [("text", 1), ("audio", 17), ("text", 1), ("audio", 5), ("text", 1)])])
    features = jnp.asarray(rng.standard_normal((2, MEL, 130)), jnp.float32)
    frames = np.zeros((2, 130), np.int64)
    frames[0, :37] = frames[1] = 1
    with pytest.raises(ValueError, match=r"audio placeholder blocks in input_ids hold \[17, 5\] tokens.*\[5, 17\]"):
        ours(ids, input_features=features, feature_attention_mask=frames)
    ours(ids, input_features=features[::-1], feature_attention_mask=frames[::-1])  # the clips in block order
    frames[0] = 0
    with pytest.raises(ValueError, match=r"feature_attention_mask rows \[0\] mark no valid frame"):
        ours(ids, input_features=features, feature_attention_mask=frames)
    ids = np.asarray([_row(rng, [("text", 1), ("video", 8), ("text", 1)])])
    for seconds in (np.nan, np.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="second_per_grids \\(video_second_per_grid\\) must be positive"):
            get_rope_index(ours.config, ids, None, [(2, 4, 4)], second_per_grids=[seconds])


def test_freeze_encoders_stops_encoder_gradients(models):
    """With `freeze_encoders` (default) the vision and audio encoders (DeepStack mergers included) get exactly
    zero gradient while their projectors (vision merger, audio proj1/proj2) and the text model do not; without
    it every parameter gets a gradient. A shallower thinker (2 text layers, 2 vision blocks with DeepStack
    after block 0, 1 audio layer) with N(0, 0.2) NumPy weights (no eager initialisers to compile) keeps the
    test short."""
    cfg = models[1].config
    cfg = cfg.replace(text_config=cfg.text_config.replace(num_hidden_layers=2),
                      vision_config=cfg.vision_config.replace(depth=2, deepstack_visual_indexes=(0,)),
                      audio_config=cfg.audio_config.replace(encoder_layers=1))
    rng = np.random.default_rng(5)
    leaves = None
    inputs = _multimodal_inputs()
    arrays = {k: jnp.asarray(inputs[k], jnp.float32)
              for k in ("pixel_values", "pixel_values_videos", "input_features")}
    arrays |= {k: jnp.asarray(inputs[k], jnp.int32) for k in ("input_ids", "attention_mask")}
    static = {k: inputs[k] for k in _STATIC}

    @eqx.filter_jit
    def grads(model):
        return eqx.filter_grad(lambda m: jnp.mean(m(**arrays, **static) ** 2))(model)

    for freeze in (True, False):
        skeleton = eqx.filter_eval_shape(Qwen3OmniThinkerForConditionalGeneration,
                                         cfg.replace(freeze_encoders=freeze), key=jax.random.key(0))
        leaves = leaves or [jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
                            for x in jax.tree.leaves(skeleton)]
        model = jax.tree.unflatten(jax.tree.structure(skeleton), leaves)
        assert model.freeze_encoders is freeze
        norms = {jax.tree_util.keystr(p): float(jnp.max(jnp.abs(leaf)))
                 for p, leaf in jax.tree_util.tree_flatten_with_path(grads(model))[0]}
        encoder = {k: v for k, v in norms.items()
                   if k.startswith((".visual", ".audio_tower")) and ".projector." not in k}
        others = {k: v for k, v in norms.items() if k not in encoder}
        assert encoder and any(".visual.deepstack_mergers" in k for k in encoder)
        for projector in (".visual.projector.", ".audio_tower.projector."):
            assert any(projector in k for k in others)
        assert all(np.isfinite(v) for v in norms.values())
        if freeze:
            assert all(v == 0.0 for v in encoder.values()), [k for k, v in encoder.items() if v != 0.0]
        else:
            assert all(v > 0.0 for v in encoder.values()), [k for k, v in encoder.items() if v == 0.0]
        assert all(v > 0.0 for v in others.values()), [k for k, v in others.items() if v == 0.0]


def test_train_step_leaves_frozen_encoders_unchanged(models):
    """`make_train_step` with `make_optimizer`'s AdamW (weight decay 0.1): with `freeze_encoders` the encoders
    before their projectors are bit-identical after two steps (weight decay shrank them by 0.3% per three steps,
    ~15% over a 10k-step fine-tune) while the projectors and the text model train; unfrozen, the encoders change."""
    from eqx_models.training import make_optimizer, make_train_step

    cfg = models[1].config
    cfg = cfg.replace(text_config=cfg.text_config.replace(num_hidden_layers=1),
                      vision_config=cfg.vision_config.replace(depth=1, deepstack_visual_indexes=(0,)),
                      audio_config=cfg.audio_config.replace(encoder_layers=1))
    rng = np.random.default_rng(6)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 50, (2, 8)), jnp.int32)}
    for freeze in (True, False):
        skeleton = eqx.filter_eval_shape(Qwen3OmniThinkerForConditionalGeneration,
                                         cfg.replace(freeze_encoders=freeze), key=jax.random.key(0))
        model = jax.tree.map(lambda x: jnp.asarray(0.2 * np.random.default_rng(1).standard_normal(x.shape), x.dtype),
                             skeleton)
        optimizer = make_optimizer(1e-2, total_steps=10)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = make_train_step(optimizer)
        before = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(model)}
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int32 count
            for _ in range(2):
                model, opt_state, _ = step(model, opt_state, batch, None)
        changed = {jax.tree_util.keystr(p): not np.array_equal(np.asarray(x), before[jax.tree_util.keystr(p)])
                   for p, x in jax.tree_util.tree_leaves_with_path(model)}
        encoder = {k: v for k, v in changed.items()
                   if k.startswith((".visual", ".audio_tower")) and ".projector." not in k}
        others = {k: v for k, v in changed.items() if k not in encoder}
        assert encoder and all(others.values()), [k for k, v in others.items() if not v]
        if freeze:
            assert not any(encoder.values()), [k for k, v in encoder.items() if v]
        else:
            assert all(encoder.values()), [k for k, v in encoder.items() if not v]


def test_config_from_full_and_thinker_dicts():
    """`from_hf_dict` reads a thinker config.json and a full Qwen3-Omni one (nested `thinker_config`, legacy
    `rope_scaling` MRoPE keys); `to_hf_dict` round-trips; inconsistent configs raise naming the values."""
    thinker = _hf_config().to_dict()
    cfg = Qwen3OmniThinkerConfig.from_hf_dict(thinker, dtype="float32", param_dtype="float32")
    assert cfg.text_config.mrope_section == (6, 5, 5) and cfg.checkpoint_prefix == ""
    assert cfg.vision_start_token_id == VISION_START
    assert cfg.vision_config.deepstack_visual_indexes == (0, 1, 2)
    assert Qwen3OmniThinkerConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    legacy_text = dict(thinker["text_config"])
    legacy_text.pop("rope_parameters")
    legacy_text.update(rope_theta=1e6, rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5],
                                                     "mrope_interleaved": True, "interleaved": True})
    full = {"model_type": "qwen3_omni_moe", "thinker_config": {**thinker, "text_config": legacy_text}}
    cfg_full = Qwen3OmniThinkerConfig.from_hf_dict(full)
    assert cfg_full.checkpoint_prefix == "thinker." and cfg_full.replace(checkpoint_prefix="") == cfg
    for tie in (True, False):  # the override `from_pretrained`'s tied-head error suggests (it raised a TypeError)
        tied = Qwen3OmniThinkerConfig.from_hf_dict(thinker, tie_word_embeddings=tie)
        assert tied.tie_word_embeddings is tied.text_config.tie_word_embeddings is tie
    with pytest.raises(ValueError, match=r"mrope_section \[6, 5, 6\] sums to 17.*16"):
        cfg.text_config.replace(mrope_section=(6, 5, 6))
    with pytest.raises(ValueError, match=r"out_hidden_size \(32\).*hidden_size \(64\)"):
        cfg.replace(vision_config=cfg.vision_config.replace(out_hidden_size=32))
    with pytest.raises(ValueError, match="distinct"):
        cfg.replace(image_token_id=VIDEO)
