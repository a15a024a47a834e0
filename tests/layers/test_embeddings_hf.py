"""HF-parity tests of the rotary and positional embeddings (float32, max relative error <= 1e-6) and of the tied
LM head in bf16.

HF tensors are `[batch, heads, seq, head_dim]`; ours are `[batch, seq, heads, head_dim]`.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV4Config,
    Gemma4TextConfig,
    LlamaConfig,
    Qwen3Config,
    Qwen3NextConfig,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb as v4_apply_rotary_pos_emb
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding
from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb as gemma4_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb as qwen3_apply_rotary_pos_emb
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding
from transformers.models.qwen3_next.modeling_qwen3_next import (
    apply_rotary_pos_emb as next_apply_rotary_pos_emb,
)
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoderConfig,
    Qwen3OmniMoeTextConfig,
    Qwen3OmniMoeVisionEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    Qwen3OmniMoeVisionEncoder,
    SinusoidsPositionEmbedding,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerTextRotaryEmbedding as HFThinkerTextRotaryEmbedding,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    apply_rotary_pos_emb as omni_apply_rotary_pos_emb,
)
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from eqx_models.layers import (
    Embed,
    DeepSeekV4RotaryEmbedding,
    Gemma4PartialRotaryEmbedding,
    LLaMARotaryEmbedding,
    PartialRotaryEmbedding,
    PositionalEmbedding,
    Qwen3OmniMoeThinkerTextRotaryEmbedding,
    Qwen3OmniMoeVisionPosEmbedInterpolate,
    Qwen3OmniMoeVisionRotaryEmbedding,
    RotaryEmbedding,
    YarnRotaryEmbedding,
)
from eqx_models.layers.embeddings import default_inv_freq, half_to_interleaved, interleaved_to_half
from tests.reference import assert_close

TOL = 1e-6
SEEDS = [0, 1]
BATCH, SEQ, Q_HEADS, KV_HEADS, MAX_POS = 2, 16, 4, 2, 400


def _randn(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _positions(rng, batch=BATCH, seq=SEQ, high=MAX_POS):
    """Distinct, sorted, non-contiguous positions per row in `[0, high)`, different for each row."""
    return np.stack([np.sort(rng.choice(high, seq, replace=False)) for _ in range(batch)]).astype(np.int64)


def _to_hf(x):
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2)))


def _from_hf(t):
    return np.swapaxes(t.numpy(), 1, 2)


def _ulps(ours, ref):
    a = np.asarray(ours, np.float32).view(np.int32).astype(np.int64)
    b = np.asarray(ref, np.float32).view(np.int32).astype(np.int64)
    return int(np.abs(a - b).max())


def _assert_bit_equal(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.dtype == ref.dtype == np.float32, (ours.dtype, ref.dtype)
    np.testing.assert_array_equal(
        ours, ref,
        err_msg=f"{what}: max ulp difference {_ulps(ours, ref)} at {np.nonzero(ours != ref)[0].tolist()}",
    )


def _check_rotary(ours, hf_rope, hf_apply, head_dim, seed, what, *, pre=None, post=None, high=MAX_POS):
    """Rotates random q ([B,S,4,D]) and k ([B,S,2,D]) with ours and with `hf_apply(q, k, *hf_rope(q, pos))`.

    `pre` maps our input to HF's input layout, `post` maps HF's output to ours (both jnp functions);
    positions are drawn from `[0, high)`.
    """
    rng = np.random.default_rng(seed)
    pos = _positions(rng, high=high)
    q = _randn(rng, (BATCH, SEQ, Q_HEADS, head_dim))
    k = _randn(rng, (BATCH, SEQ, KV_HEADS, head_dim))
    to_ref = (lambda x: x) if pre is None else (lambda x: np.asarray(pre(jnp.asarray(x))))
    from_ref = (lambda x: x) if post is None else (lambda x: np.asarray(post(jnp.asarray(x))))
    q_hf, k_hf = _to_hf(to_ref(q)), _to_hf(to_ref(k))
    with torch.no_grad():
        cos, sin = hf_rope(q_hf, torch.from_numpy(pos))
        q_ref, k_ref = hf_apply(q_hf, k_hf, cos, sin)
    jpos = jnp.asarray(pos.astype(np.int32))
    assert_close(ours(jnp.asarray(q), jpos), from_ref(_from_hf(q_ref)), TOL, f"{what} q")
    assert_close(ours(jnp.asarray(k), jpos), from_ref(_from_hf(k_ref)), TOL, f"{what} k")


# ----------------------------------------------------------------------------------------------------------
# 1. Qwen3 rotary (default and linear scaling)


def _qwen3_config(head_dim, rope_parameters):
    return Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=rope_parameters, attn_implementation="eager",
    )


QWEN3_DEFAULT = {"rope_type": "default", "rope_theta": 1e6}
QWEN3_LINEAR = {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}


def _qwen3_rotary(head_dim, params):
    ours = RotaryEmbedding(head_dim, max_timescale=1e6, rope_linear_scaling_factor=params.get("factor", 1.0))
    return ours, Qwen3RotaryEmbedding(_qwen3_config(head_dim, params))


@pytest.mark.parametrize("params", [QWEN3_DEFAULT, QWEN3_LINEAR], ids=["default", "linear"])
@pytest.mark.parametrize("head_dim", [16, 128])
def test_qwen3_inv_freq_bit_equal(head_dim, params):
    """Our `inv_freq` equals HF `Qwen3RotaryEmbedding.inv_freq` (theta 1e6; default, and "linear" factor 4)
    to within 1 ulp, and bit-for-bit on all but a few entries.

    Ours is correctly rounded (pow in float64); torch's vectorised float32 pow is not always, and which
    entries it misrounds depends on the CPU's SIMD path (measured: 1 of 64 entries at d=128 on AVX-512),
    so exact equality with HF is not a property of our code alone."""
    ours, hf = _qwen3_rotary(head_dim, params)
    ref = hf.inv_freq.numpy()
    ulps = np.abs(ours.inv_freq.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    differ = int((ulps > 0).sum())
    print(f"qwen3 {params['rope_type']} inv_freq d={head_dim}: {differ} entries differ, max {ulps.max()} ulp")
    assert ulps.max() <= 1
    assert (ulps > 0).sum() <= max(1, ref.size // 32)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_qwen3_rotary_matches_hf(head_dim, seed):
    """HF `Qwen3RotaryEmbedding` + qwen3 `apply_rotary_pos_emb` (theta 1e6); rel err <= 1e-6."""
    ours, hf = _qwen3_rotary(head_dim, QWEN3_DEFAULT)
    _check_rotary(ours, hf, qwen3_apply_rotary_pos_emb, head_dim, seed, f"qwen3 rope d={head_dim}")


@pytest.mark.parametrize("head_dim", [16, 128])
def test_qwen3_linear_scaling_matches_hf(head_dim):
    """HF rope_type "linear" (factor 4) via `Qwen3RotaryEmbedding` + qwen3 `apply_rotary_pos_emb`;
    rel err <= 1e-6."""
    ours, hf = _qwen3_rotary(head_dim, QWEN3_LINEAR)
    assert hf.attention_scaling == 1.0
    _check_rotary(ours, hf, qwen3_apply_rotary_pos_emb, head_dim, 2, f"qwen3 linear rope d={head_dim}")


# ----------------------------------------------------------------------------------------------------------
# 2. Llama-3 frequency scaling (interleaved layout on our side)

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LLAMA3_WIDE = dict(LLAMA3, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=128)
LLAMA3_CASES = pytest.mark.parametrize("params", [LLAMA3, LLAMA3_WIDE], ids=["llama3.1", "wide_band"])


def _llama3(head_dim, params):
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters=params,
        attn_implementation="eager",
    )
    ours = LLaMARotaryEmbedding(
        head_dim, max_timescale=params["rope_theta"], scale_factor=params["factor"],
        low_freq_factor=params["low_freq_factor"], high_freq_factor=params["high_freq_factor"],
        old_context_len=params["original_max_position_embeddings"],
    )
    return ours, LlamaRotaryEmbedding(cfg)


@LLAMA3_CASES
@pytest.mark.parametrize("head_dim", [16, 128])
def test_llama3_inv_freq_bit_equal(head_dim, params):
    """Our Llama-3.1 `inv_freq` equals HF `LlamaRotaryEmbedding.inv_freq` (`_compute_llama3_parameters`)
    bit-for-bit, with all three bands present (`wide_band`: low_freq_factor != 1 enters the smooth band)."""
    ours, hf = _llama3(head_dim, params)
    wavelen = 2 * np.pi / default_inv_freq(head_dim, params["rope_theta"])
    old = params["original_max_position_embeddings"]
    low, high = old / params["low_freq_factor"], old / params["high_freq_factor"]
    assert (wavelen < high).any() and (wavelen > low).any()
    assert ((wavelen >= high) & (wavelen <= low)).any()
    _assert_bit_equal(ours.inv_freq, hf.inv_freq.numpy(), f"llama3 inv_freq head_dim {head_dim}")


@pytest.mark.parametrize("seed", SEEDS)
@LLAMA3_CASES
@pytest.mark.parametrize("head_dim", [16, 128])
def test_llama3_rotary_matches_hf(head_dim, params, seed):
    """`ours(x) == half_to_interleaved(hf(interleaved_to_half(x)))` with HF `LlamaRotaryEmbedding` (llama3) +
    llama `apply_rotary_pos_emb`; rel err <= 1e-6."""
    ours, hf = _llama3(head_dim, params)
    _check_rotary(ours, hf, llama_apply_rotary_pos_emb, head_dim, seed, f"llama3 rope d={head_dim}",
                  pre=interleaved_to_half, post=half_to_interleaved)


@LLAMA3_CASES
@pytest.mark.parametrize("head_dim", [16, 128])
def test_llama3_half_split_matches_hf_qwen3(head_dim, params):
    """`interleaved=False` (a Qwen3 config with rope type llama3) equals HF `Qwen3RotaryEmbedding` + qwen3
    `apply_rotary_pos_emb` with no layout change; rel err <= 1e-6."""
    ours = dataclasses.replace(_llama3(head_dim, params)[0], interleaved=False)
    hf = Qwen3RotaryEmbedding(_qwen3_config(head_dim, params))
    _check_rotary(ours, hf, qwen3_apply_rotary_pos_emb, head_dim, 4, f"llama3 half-split rope d={head_dim}")


# ----------------------------------------------------------------------------------------------------------
# 3. YaRN: DeepSeek-V3 (mscale / mscale_all_dim, interleaved) and plain YaRN (0.1 ln f + 1, half-split)

DEEPSEEK_TINY = dict(qk_rope_head_dim=8, max_position_embeddings=512, rope_theta=10000.0, factor=4.0,
                     original_max_position_embeddings=128, mscale=1.0, mscale_all_dim=1.0)
DEEPSEEK_REAL = dict(qk_rope_head_dim=64, max_position_embeddings=163840, rope_theta=10000.0, factor=40.0,
                     original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
DEEPSEEK_MSCALE = dict(DEEPSEEK_TINY, qk_rope_head_dim=16, mscale=1.0, mscale_all_dim=0.707)
DEEPSEEK_BOTH_MSCALE = dict(DEEPSEEK_TINY, qk_rope_head_dim=16, mscale=1.3, mscale_all_dim=0.8)


def _deepseek(p, **kwargs):
    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=Q_HEADS, num_key_value_heads=Q_HEADS, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=p["qk_rope_head_dim"], qk_nope_head_dim=16, v_head_dim=16,
        max_position_embeddings=p["max_position_embeddings"], rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": p["rope_theta"], "factor": p["factor"],
                         "original_max_position_embeddings": p["original_max_position_embeddings"],
                         "beta_fast": 32, "beta_slow": 1, "mscale": p["mscale"],
                         "mscale_all_dim": p["mscale_all_dim"]},
        attn_implementation="eager",
    )
    ours = YarnRotaryEmbedding(
        embedding_dims=p["qk_rope_head_dim"], max_position_embeddings=p["max_position_embeddings"],
        original_max_position_embeddings=p["original_max_position_embeddings"], beta_fast=32.0, beta_slow=1.0,
        rope_theta=p["rope_theta"], rope_factor=p["factor"], mscale=p["mscale"],
        mscale_all_dim=p["mscale_all_dim"],
        **kwargs,
    )
    return ours, DeepseekV3RotaryEmbedding(cfg)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "params", [DEEPSEEK_TINY, DEEPSEEK_REAL, DEEPSEEK_MSCALE, DEEPSEEK_BOTH_MSCALE],
    ids=["tiny", "real", "mscale", "mscale_both"],
)
def test_deepseek_v3_yarn_matches_hf(params, seed):
    """HF `DeepseekV3RotaryEmbedding` (yarn, cos/sin x attention_scaling) + `apply_rotary_pos_emb_interleave`
    vs `YarnRotaryEmbedding(interleave=True)`; rel err <= 1e-6."""
    ours, hf = _deepseek(params, interleave=True)
    assert ours.attention_factor == pytest.approx(hf.attention_scaling, rel=1e-12, abs=0)
    assert_close(ours.inv_freq, hf.inv_freq.numpy(), TOL, "deepseek yarn inv_freq")
    d = params["qk_rope_head_dim"]
    _check_rotary(ours, hf, apply_rotary_pos_emb_interleave, d, seed, f"deepseek yarn d={d}")


def test_deepseek_v3_yarn_pairwise_matches_hf():
    """`YarnRotaryEmbedding(pairwise=True)` == `half_to_interleaved` of HF `apply_rotary_pos_emb_interleave`
    (DeepseekV3RotaryEmbedding cos/sin); rel err <= 1e-6."""
    ours, hf = _deepseek(DEEPSEEK_MSCALE, interleave=True, pairwise=True)
    _check_rotary(ours, hf, apply_rotary_pos_emb_interleave, 16, 3, "deepseek yarn pairwise",
                  post=half_to_interleaved)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "extra", [{}, {"truncate": False}, {"beta_fast": 16.0, "beta_slow": 2.0}], ids=["default", "no_trunc", "betas"]
)
@pytest.mark.parametrize("head_dim", [16, 128])
def test_plain_yarn_matches_hf(head_dim, extra, seed):
    """Plain YaRN without mscale keys: HF `_compute_yarn_parameters` (via `ROPE_INIT_FUNCTIONS["yarn"]` and
    `Qwen3RotaryEmbedding`, attention factor 0.1 ln f + 1) + qwen3 `apply_rotary_pos_emb` vs
    `YarnRotaryEmbedding(attention_scaling=True, interleave=False)`; rel err <= 1e-6. `extra` (same keys on
    both sides) covers the unrounded correction range and non-default beta_fast / beta_slow."""
    params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 128,
              **extra}
    cfg = _qwen3_config(head_dim, params)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    hf = Qwen3RotaryEmbedding(cfg)
    ours = YarnRotaryEmbedding(
        embedding_dims=head_dim, max_position_embeddings=512, original_max_position_embeddings=128,
        rope_theta=1e6, rope_factor=4.0, attention_scaling=True, interleave=False, **extra,
    )
    assert attention_factor == hf.attention_scaling == pytest.approx(0.1 * np.log(4.0) + 1, rel=1e-15)
    assert ours.attention_factor == pytest.approx(attention_factor, rel=1e-12, abs=0)
    assert_close(ours.inv_freq, inv_freq.numpy(), TOL, f"plain yarn inv_freq d={head_dim}")
    _check_rotary(ours, hf, qwen3_apply_rotary_pos_emb, head_dim, seed, f"plain yarn d={head_dim}")


# ----------------------------------------------------------------------------------------------------------
# 4. Qwen3-Next partial rotary


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("head_dim", [16, 256])
def test_qwen3_next_partial_rotary_matches_hf(head_dim, seed):
    """HF `Qwen3NextRotaryEmbedding` (partial_rotary_factor 0.25, theta 1e7) + qwen3_next
    `apply_rotary_pos_emb`; rel err <= 1e-6, unrotated dims bit-identical."""
    cfg = Qwen3NextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        attn_implementation="eager",
    )
    hf = Qwen3NextRotaryEmbedding(cfg)
    ours = PartialRotaryEmbedding(head_dim, partial_rotary_factor=0.25, max_timescale=1e7)
    assert ours.rotary_dim == head_dim // 4 == 2 * hf.inv_freq.shape[0]
    _check_rotary(ours, hf, next_apply_rotary_pos_emb, head_dim, seed, f"qwen3-next partial d={head_dim}")
    x = _randn(np.random.default_rng(seed), (BATCH, SEQ, Q_HEADS, head_dim))
    y = ours(jnp.asarray(x), jnp.asarray(_positions(np.random.default_rng(seed)).astype(np.int32)))
    np.testing.assert_array_equal(np.asarray(y)[..., head_dim // 4 :], x[..., head_dim // 4 :])


# ----------------------------------------------------------------------------------------------------------
# 5. Qwen3-Omni thinker text MRoPE


def _omni_text(head_dim, section):
    cfg = Qwen3OmniMoeTextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=head_dim,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(section),
                         "interleaved": True},
        attn_implementation="eager",
    )
    ours = Qwen3OmniMoeThinkerTextRotaryEmbedding(head_dim, max_timescale=1e6, mrope_section=section)
    return ours, HFThinkerTextRotaryEmbedding(cfg)


MROPE_CASES = [(32, (6, 5, 5)), (128, (24, 20, 20))]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("head_dim", "section"), MROPE_CASES)
def test_omni_mrope_matches_hf(head_dim, section, seed):
    """HF `Qwen3OmniMoeThinkerTextRotaryEmbedding` (position_ids [3,B,S], distinct t/h/w) + omni text
    `apply_rotary_pos_emb` vs ours with [B,S,3] positions; rel err <= 1e-6."""
    ours, hf = _omni_text(head_dim, section)
    rng = np.random.default_rng(seed)
    t = _positions(rng)
    h = t // 2 + rng.integers(0, 7, t.shape)
    w = t % 13 + rng.integers(0, 50, t.shape)
    pos3 = np.stack([t, h, w])
    assert not (np.array_equal(t, h) or np.array_equal(t, w) or np.array_equal(h, w))

    def hf_rope(x, _):
        return hf(x, torch.from_numpy(pos3))

    def ours_3d(x, _):
        return ours(x, jnp.asarray(np.moveaxis(pos3, 0, -1).astype(np.int32)))

    _check_rotary(ours_3d, hf_rope, omni_apply_rotary_pos_emb, head_dim, seed, f"omni mrope d={head_dim} thw")


@pytest.mark.parametrize(("head_dim", "section"), MROPE_CASES)
def test_omni_mrope_text_positions_match_hf(head_dim, section):
    """[B,S] positions == HF `Qwen3OmniMoeThinkerTextRotaryEmbedding` with the same positions on all three
    axes (+ omni text `apply_rotary_pos_emb`); rel err <= 1e-6."""
    ours, hf = _omni_text(head_dim, section)

    def hf_rope(x, pos):
        return hf(x, pos[None].expand(3, -1, -1))

    _check_rotary(ours, hf_rope, omni_apply_rotary_pos_emb, head_dim, 5, f"omni mrope d={head_dim} 1-D")


# ----------------------------------------------------------------------------------------------------------
# 6-7. Qwen3-Omni vision rotary and position-embedding interpolation


def _vision_encoder(hidden_size, num_heads, num_position_embeddings=16):
    cfg = Qwen3OmniMoeVisionEncoderConfig(
        depth=1, hidden_size=hidden_size, hidden_act="gelu_pytorch_tanh", intermediate_size=64,
        num_heads=num_heads, in_channels=3, patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
        out_hidden_size=64,
        num_position_embeddings=num_position_embeddings, deepstack_visual_indexes=[0],
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return Qwen3OmniMoeVisionEncoder(cfg).eval()


def _hf_vision_rotary(enc, grids):
    """The (cos, sin) `(N, head_dim)` the HF encoder's forward computes for `grid_thw = grids`, per grid."""
    captured = []
    handle = enc.rotary_pos_emb.register_forward_hook(lambda mod, args, out: captured.append(out))
    cfg = enc.config
    grid_thw = torch.tensor(grids)
    n = int(grid_thw.prod(-1).sum())
    pixels = torch.randn(n, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2,
                         generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            enc(pixels, grid_thw=grid_thw)
    finally:
        handle.remove()
    (cos, sin), = captured
    sizes = [t * h * w for t, h, w in grids]
    return list(zip(torch.split(cos, sizes), torch.split(sin, sizes)))


VISION_SIZES = [(32, 2), (144, 2)]
GRIDS = [(1, 4, 6), (2, 6, 4)]


@pytest.mark.parametrize(("hidden_size", "num_heads"), VISION_SIZES)
def test_omni_vision_rotary_matches_hf(hidden_size, num_heads):
    """`compute_cos_sin` and the rotation vs the cos/sin of HF `Qwen3OmniMoeVisionEncoder.forward`
    (`get_vision_position_ids` + `Qwen3OmniMoeVisionRotaryEmbedding`) and `apply_rotary_pos_emb_vision`;
    rel err <= 1e-6."""
    enc = _vision_encoder(hidden_size, num_heads)
    ours = Qwen3OmniMoeVisionRotaryEmbedding(hidden_size, num_heads, spatial_merge_size=2)
    head_dim = hidden_size // num_heads
    rng = np.random.default_rng(0)
    for grid, (cos_hf, sin_hf) in zip(GRIDS, _hf_vision_rotary(enc, GRIDS)):
        cos, sin = ours.compute_cos_sin(*grid)
        assert_close(cos, cos_hf.numpy(), TOL, f"vision cos {grid} d={head_dim}")
        assert_close(sin, sin_hf.numpy(), TOL, f"vision sin {grid} d={head_dim}")
        n = int(np.prod(grid))
        q = _randn(rng, (n, num_heads, head_dim))
        k = _randn(rng, (n, num_heads, head_dim))
        q_ref, k_ref = apply_rotary_pos_emb_vision(torch.from_numpy(q), torch.from_numpy(k), cos_hf, sin_hf)
        assert_close(ours(jnp.asarray(q)[None], *grid)[0], q_ref.numpy(), TOL, f"vision rope q {grid}")
        assert_close(ours(jnp.asarray(k)[None], *grid)[0], k_ref.numpy(), TOL, f"vision rope k {grid}")


@pytest.mark.parametrize(("hidden_size", "num_heads"), VISION_SIZES)
def test_omni_vision_rotary_grid_thw_matches_hf(hidden_size, num_heads):
    """Per-example `grid_thw` padded to a static 1x8x8 grid: each example's valid prefix == HF
    `apply_rotary_pos_emb_vision` with the HF encoder's cos/sin for that image (rel err <= 1e-6); padding
    untouched."""
    enc = _vision_encoder(hidden_size, num_heads)
    ours = Qwen3OmniMoeVisionRotaryEmbedding(hidden_size, num_heads, spatial_merge_size=2)
    head_dim = hidden_size // num_heads
    static = (1, 8, 8)
    x = _randn(np.random.default_rng(1), (len(GRIDS), int(np.prod(static)), num_heads, head_dim))
    y = np.asarray(ours(jnp.asarray(x), *static, grid_thw=jnp.asarray(GRIDS, jnp.int32)))
    for b, (grid, (cos_hf, sin_hf)) in enumerate(zip(GRIDS, _hf_vision_rotary(enc, GRIDS))):
        n = int(np.prod(grid))
        xb = torch.from_numpy(x[b, :n])
        ref, _ = apply_rotary_pos_emb_vision(xb, xb, cos_hf, sin_hf)
        assert_close(y[b, :n], ref.numpy(), TOL, f"vision rope grid_thw example {b} {grid}")
        np.testing.assert_array_equal(y[b, n:], x[b, n:])


def _hf_pos_embeds(enc, grids):
    """HF encoder's interpolated position embeddings (its forward's `pos_embeds`), split per grid."""
    indices, weights = get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), num_grid_per_side=enc.num_grid_per_side, mode=enc.interpolation_mode,
        align_corners=enc.interpolation_align_corners, spatial_merge_size=enc.config.spatial_merge_size,
    )
    with torch.no_grad():
        pos_embeds = (enc.pos_embed(indices) * weights[:, :, None]).sum(1)
    return torch.split(pos_embeds, [t * h * w for t, h, w in grids])


def _pos_interp(enc, key):
    cfg = enc.config
    ours = Qwen3OmniMoeVisionPosEmbedInterpolate(cfg.num_position_embeddings, cfg.hidden_size,
                                                 cfg.spatial_merge_size, key=key)
    return eqx.tree_at(lambda m: m.pos_embed, ours, jnp.asarray(enc.pos_embed.weight.detach().numpy()))


POS_GRIDS = [(1, 4, 6), (2, 6, 4), (1, 8, 2), (1, 12, 10)]


@pytest.mark.parametrize("num_position_embeddings", [16, 2304])
def test_omni_vision_pos_embed_interpolation_matches_hf(num_position_embeddings, getkey):
    """Bilinear (align_corners) resampling of HF `Qwen3OmniMoeVisionEncoder.pos_embed.weight` via
    `get_vision_interpolation_indices_and_weights`, as the encoder's forward does; single grids and a video
    (t=2); rel err <= 1e-6."""
    enc = _vision_encoder(32, 2, num_position_embeddings)
    ours = _pos_interp(enc, getkey())
    for grid, ref in zip(POS_GRIDS, _hf_pos_embeds(enc, POS_GRIDS)):
        what = f"vision pos-embed side^2={num_position_embeddings} {grid}"
        assert_close(ours(*grid), ref.numpy(), TOL, what)


@pytest.mark.parametrize("num_position_embeddings", [16, 2304])
def test_omni_vision_pos_embed_grid_thw_matches_hf(num_position_embeddings, getkey):
    """Per-example `grid_thw` padded to a static 2x6x10 grid: valid rows == HF's interpolation for each image
    (`get_vision_interpolation_indices_and_weights`, rel err <= 1e-6), padded rows exactly 0."""
    enc = _vision_encoder(32, 2, num_position_embeddings)
    ours = _pos_interp(enc, getkey())
    grids = [(1, 4, 6), (2, 6, 4), (1, 2, 10)]
    out = np.asarray(ours(2, 6, 10, grid_thw=jnp.asarray(grids, jnp.int32)))
    assert out.shape == (len(grids), 120, 32)
    for b, (grid, ref) in enumerate(zip(grids, _hf_pos_embeds(enc, grids))):
        n = int(np.prod(grid))
        assert_close(out[b, :n], ref.numpy(), TOL, f"vision pos-embed grid_thw example {b} {grid}")
        np.testing.assert_array_equal(out[b, n:], 0.0)


# ----------------------------------------------------------------------------------------------------------
# 8. Qwen3-Omni audio sinusoidal positions


@pytest.mark.parametrize("max_wavelength", [10000.0, 10000], ids=["float", "int"])
@pytest.mark.parametrize(("d_model", "max_source_positions"), [(32, 64), (1280, 1500)])
def test_omni_audio_sinusoids_match_hf(d_model, max_source_positions, max_wavelength):
    """`PositionalEmbedding(d_model, max_wavelength=10000)` vs HF
    `SinusoidsPositionEmbedding.positional_embedding` (the buffer of
    `Qwen3OmniMoeAudioEncoder.positional_embedding`, max_timescale 10000), `(seq,)` and `(batch, seq)`
    positions; rel err <= 1e-6 where HF uses them (positions restart in every 13-token audio chunk).

    Over the whole 1500-row table the bound is 2e-4: torch's float32 exp misrounds a few near-tie
    `inv_timescales` by 1 ulp (ours is correctly rounded), and an angle `p * inv` carries that 6e-8 relative
    error times p <= 1500."""
    if d_model == 32:
        cfg = Qwen3OmniMoeAudioEncoderConfig(
            num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=d_model,
            max_source_positions=max_source_positions, n_window=50, n_window_infer=200, conv_chunksize=500,
            downsample_hidden_size=8, output_dim=64, attn_implementation="eager",
        )
        table = Qwen3OmniMoeAudioEncoder(cfg).positional_embedding.positional_embedding.numpy()
    else:
        table = SinusoidsPositionEmbedding(max_source_positions, d_model).positional_embedding.numpy()
    assert table.shape == (max_source_positions, d_model)
    ours = PositionalEmbedding(d_model, max_wavelength=max_wavelength)
    full_table_tol = TOL if max_source_positions <= 64 else 2e-4
    assert_close(ours(max_source_positions), table, full_table_tol, f"audio sinusoids d={d_model} full table")
    assert_close(ours(13), table[:13], TOL, f"audio sinusoids d={d_model} seq=13")
    rng = np.random.default_rng(0)
    pos = rng.integers(0, max_source_positions, (3, 40))
    pos[0, -1] = max_source_positions - 1
    out = ours(40, jnp.asarray(pos.astype(np.int32)))
    assert_close(out, table[pos], full_table_tol, f"audio sinusoids d={d_model} (batch, seq)")


# ----------------------------------------------------------------------------------------------------------
# 9. Gemma-4 "proportional" partial rotary (full-attention layers)

GEMMA4_REAL_HEAD_DIM, GEMMA4_MAX_POS = 512, 131072


def _gemma4(global_head_dim, factor, theta=1e6):
    cfg = Gemma4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=16, global_head_dim=global_head_dim,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=256, max_position_embeddings=GEMMA4_MAX_POS,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": factor, "rope_theta": theta},
        },
        attn_implementation="eager",
    )
    return Gemma4PartialRotaryEmbedding(global_head_dim, factor, max_timescale=theta), Gemma4TextRotaryEmbedding(cfg)


def _assert_inv_freq_within_1ulp(ours, ref, what):
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    print(f"{what}: {int((ulps > 0).sum())} of {ref.size} entries differ, max {ulps.max()} ulp")
    assert ulps.max() <= 1 and (ulps > 0).sum() <= max(1, ref.size // 32), what


def _gemma4_apply(q, k, cos, sin):
    return gemma4_apply_rotary_pos_emb(q, cos, sin), gemma4_apply_rotary_pos_emb(k, cos, sin)


def test_gemma4_real_config_matches_hf():
    """The full-attention rope of HF's default `Gemma4TextConfig` ("proportional", factor 0.25 = our default,
    theta 1e6, global head_dim 512): `inv_freq` vs that config's `Gemma4TextRotaryEmbedding`."""
    cfg = Gemma4TextConfig()
    params = cfg.rope_parameters["full_attention"]
    head_dim = cfg.per_layer_config["full_attention"].head_dim
    assert params["rope_type"] == "proportional" and head_dim == GEMMA4_REAL_HEAD_DIM
    ours = Gemma4PartialRotaryEmbedding(head_dim, max_timescale=params["rope_theta"])
    assert ours.partial_rotary_factor == params["partial_rotary_factor"]
    hf = Gemma4TextRotaryEmbedding(cfg)
    assert hf.full_attention_attention_scaling == 1.0
    _assert_inv_freq_within_1ulp(ours.inv_freq, hf.full_attention_inv_freq.numpy(), "gemma4 real inv_freq")


GEMMA4_CASES = pytest.mark.parametrize(
    ("head_dim", "factor"), [(32, 0.25), (256, 0.5), (GEMMA4_REAL_HEAD_DIM, 0.25)], ids=["tiny", "half", "real"]
)


@GEMMA4_CASES
def test_gemma4_inv_freq_matches_hf(head_dim, factor):
    """Our `inv_freq` vs HF `_compute_proportional_rope_parameters` (via `Gemma4TextRotaryEmbedding`, theta
    1e6): `1/theta^(2i/head_dim)` on the first `head_dim * factor / 2` pairs (within 1 ulp: HF's float32 pow is
    not correctly rounded), exact zeros on the rest."""
    ours, hf = _gemma4(head_dim, factor)
    ref = hf.full_attention_inv_freq.numpy()
    assert ref.shape == (head_dim // 2,) and hf.full_attention_attention_scaling == 1.0
    np.testing.assert_array_equal(ours.inv_freq == 0, ref == 0)
    assert int((ref > 0).sum()) == ours.rotary_dim // 2
    _assert_inv_freq_within_1ulp(ours.inv_freq, ref, f"gemma4 inv_freq d={head_dim} f={factor}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("high", [MAX_POS, GEMMA4_MAX_POS], ids=["pos400", "pos131072"])
@pytest.mark.parametrize(("head_dim", "factor"), [(32, 0.25), (256, 0.5)], ids=["tiny", "half"])
def test_gemma4_partial_rotary_matches_hf(head_dim, factor, high, seed):
    """HF `Gemma4TextRotaryEmbedding` ("full_attention", proportional, theta 1e6) + gemma4
    `apply_rotary_pos_emb`; rel err <= 1e-6; same layout on both sides (half-split over the full head dim, no
    permutation). Unrotated dims `[r/2, d/2)` and `[d/2 + r/2, d)` are bit-identical to the input.

    Not at the real head_dim 512: HF's float32 pow misrounds one rotated frequency there by 1 ulp on this
    CPU (see `test_gemma4_inv_freq_matches_hf`), which moves angles at position p by ~p * 1.5e-8 rad."""
    ours, hf = _gemma4(head_dim, factor)
    np.testing.assert_array_equal(ours.inv_freq, hf.full_attention_inv_freq.numpy())

    def hf_rope(x, pos):
        return hf(x, pos, "full_attention")

    what = f"gemma4 proportional d={head_dim} f={factor} pos<{high}"
    _check_rotary(ours, hf_rope, _gemma4_apply, head_dim, seed, what, high=high)
    rng = np.random.default_rng(seed)
    x = _randn(rng, (BATCH, SEQ, Q_HEADS, head_dim))
    y = np.asarray(ours(jnp.asarray(x), jnp.asarray(_positions(rng, high=high).astype(np.int32))))
    half, rot = head_dim // 2, ours.rotary_dim // 2
    np.testing.assert_array_equal(y[..., rot:half], x[..., rot:half])
    np.testing.assert_array_equal(y[..., half + rot :], x[..., half + rot :])


# ----------------------------------------------------------------------------------------------------------
# 10. DeepSeek-V4 partial interleaved rotary ("main" and un-scaled "compress" rope, and the output's reverse)

V4_REAL_HEAD_DIM, V4_MAX_POS = 512, 1_048_576
V4_THETA = {"main": 10000.0, "compress": 160000.0}


def _deepseek_v4(head_dim, factor):
    cfg = DeepseekV4Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=Q_HEADS, head_dim=head_dim,
        partial_rotary_factor=factor, q_lora_rank=16, o_lora_rank=8, o_groups=2,
        max_position_embeddings=V4_MAX_POS, rope_theta=V4_THETA["main"], compress_rope_theta=V4_THETA["compress"],
        attn_implementation="eager",
    )
    return DeepseekV4RotaryEmbedding(cfg)


def _v4_apply(reverse):
    """HF's attention applies `apply_rotary_pos_emb(x, cos, sin)` to q / kv and `(out, cos, -sin)` to the output."""
    def apply(q, k, cos, sin):
        sin = -sin if reverse else sin
        return v4_apply_rotary_pos_emb(q, cos, sin), v4_apply_rotary_pos_emb(k, cos, sin)
    return apply


def test_deepseek_v4_defaults_match_hf_config():
    """Our defaults are the "main" rope of HF's default `DeepseekV4Config` (default type, theta 1e4, partial
    factor 64/512 of head_dim 512, so the rotary dim is `qk_rope_head_dim` = 64)."""
    cfg = DeepseekV4Config()
    params = cfg.rope_parameters["main"]
    assert params["rope_type"] == "default" and cfg.head_dim == V4_REAL_HEAD_DIM
    ours = DeepSeekV4RotaryEmbedding(cfg.head_dim)
    assert (ours.partial_rotary_factor, ours.rope_theta) == (params["partial_rotary_factor"], params["rope_theta"])
    assert ours.rotary_dim == cfg.qk_rope_head_dim == 2 * DeepseekV4RotaryEmbedding(cfg).main_inv_freq.shape[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("high", [MAX_POS, V4_MAX_POS], ids=["pos400", "pos1M"])
@pytest.mark.parametrize("rope", ["main", "compress"])
@pytest.mark.parametrize(("head_dim", "factor"), [(32, 0.25), (V4_REAL_HEAD_DIM, 64 / 512)], ids=["tiny", "real"])
def test_deepseek_v4_rotary_matches_hf(head_dim, factor, rope, high, reverse, seed):
    """HF `DeepseekV4RotaryEmbedding` (layer type `rope`, default rope type) + deepseek_v4
    `apply_rotary_pos_emb`, with `-sin` for `reverse=True`; rel err <= 1e-6; same layout on both sides
    (`[nope | rope]`, interleaved pairs on the trailing rotary dims, no permutation). Nope dims bit-identical."""
    hf = _deepseek_v4(head_dim, factor)
    ours = DeepSeekV4RotaryEmbedding(head_dim, factor, rope_theta=V4_THETA[rope])
    assert ours.rotary_dim == 2 * getattr(hf, f"{rope}_inv_freq").shape[0]

    def hf_rope(x, pos):
        return hf(x, pos, rope)

    def ours_fn(x, pos):
        return ours(x, pos, reverse=reverse)

    what = f"deepseek-v4 {rope} d={head_dim} pos<{high} reverse={reverse}"
    _check_rotary(ours_fn, hf_rope, _v4_apply(reverse), head_dim, seed, what, high=high)
    rng = np.random.default_rng(seed)
    x = _randn(rng, (BATCH, SEQ, Q_HEADS, head_dim))
    y = ours_fn(jnp.asarray(x), jnp.asarray(_positions(rng, high=high).astype(np.int32)))
    np.testing.assert_array_equal(np.asarray(y)[..., : -ours.rotary_dim], x[..., : -ours.rotary_dim])


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_deepseek_v4_rotary_bfloat16_matches_hf_bitwise(reverse):
    """bfloat16 input: bit-identical to HF (cos/sin rounded to bfloat16 by `DeepseekV4RotaryEmbedding`, the
    rotation done in float32 by `apply_rotary_pos_emb`, then one rounding to bfloat16)."""
    hf = _deepseek_v4(V4_REAL_HEAD_DIM, 64 / 512)
    ours = DeepSeekV4RotaryEmbedding(V4_REAL_HEAD_DIM)
    rng = np.random.default_rng(7)
    pos = _positions(rng)
    x = jnp.asarray(_randn(rng, (BATCH, SEQ, Q_HEADS, V4_REAL_HEAD_DIM)), jnp.bfloat16)
    x_hf = _to_hf(np.asarray(x.astype(jnp.float32))).to(torch.bfloat16)
    with torch.no_grad():
        cos, sin = hf(x_hf, torch.from_numpy(pos), "main")
        ref = v4_apply_rotary_pos_emb(x_hf, cos, -sin if reverse else sin)
    assert cos.dtype == ref.dtype == torch.bfloat16
    y = ours(x, jnp.asarray(pos.astype(np.int32)), reverse=reverse)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), _from_hf(ref.float()))


# ----------------------------------------------------------------------------------------------------------
# 11. Tied LM head in bfloat16


def test_tied_logits_in_bfloat16_match_hf_lm_head():
    """`Embed.attend` with bf16 compute vs HF's tied `lm_head` of a bf16 model (`F.linear` in bf16 on the shared
    embedding weight): the same bf16-rounded logits, returned as float32; all within 1 bf16 ulp and 99% bit
    equal (the two float32 accumulations may round a near-tie apart; measured: none)."""
    rng = np.random.default_rng(0)
    embed = Embed(300, 64, dtype=jnp.bfloat16, key=jax.random.key(0))
    x = jnp.asarray(_randn(rng, (2, 16, 64)), jnp.bfloat16)
    ours = embed.attend(x)
    weight = torch.from_numpy(np.array(embed.embedding)).to(torch.bfloat16)
    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.from_numpy(np.array(x.astype(jnp.float32))).to(torch.bfloat16),
                                         weight)
    assert ours.dtype == jnp.float32 and ref.dtype == torch.bfloat16
    ulp = np.spacing(np.abs(ref.float().numpy()).astype(np.float32)) * 2**16  # float32 spacing -> bf16 spacing
    diff = np.abs(np.asarray(ours) - ref.float().numpy())
    print(f"tied bf16 logits: {int((diff > 0).sum())} of {diff.size} differ, max {float((diff / ulp).max()):.2f} ulp")
    assert (diff <= ulp).all() and (diff == 0).mean() >= 0.99
