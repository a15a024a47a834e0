"""`Qwen3NextForCausalLM`: logits parity with HF `Qwen3NextForCausalLM` (float32, eager, 1e-5 relative;
checkpoints written by HF `save_pretrained`, read by `em.from_pretrained`), the Gated DeltaNet layer against HF's,
cached decoding and chunked prefill (prefill + steps == full forward, also vs HF's cache), greedy generation vs
HF `generate`, packed sequences, the router aux loss vs HF's (with padding), our save -> HF load, and config
errors."""

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet as HFGatedDeltaNet
from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

import eqx_models as em
from eqx_models.layers.kv_cache import KVCache
from eqx_models.models.qwen3 import GatedDeltaState, Qwen3NextGatedDeltaNet, Qwen3NextScannableBlock
from tests.reference import assert_close

VOCAB = 96
HF_NEXT = dict(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, layer_types=["linear_attention"] * 3 + ["full_attention"],
    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=12, linear_num_key_heads=2,
    linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
    num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
    max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
    attn_implementation="eager", experts_implementation="eager",
)

# (id, HF overrides, expected (scannable-block period, repeats))
CASES = [
    ("pattern-lll-f-ratio2", dict(), (4, 1)),
    ("pattern-lf-ratio1-dense-layers-gelu", dict(
        num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, linear_num_value_heads=2,
        mlp_only_layers=[1, 3], hidden_act="gelu",  # a rotary fraction other than the default 0.25
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.5}), (2, 2)),
    ("pattern-llf-x2-ratio2-sparse2-tied", dict(
        num_hidden_layers=6, layer_types=["linear_attention", "linear_attention", "full_attention"] * 2,
        decoder_sparse_step=3, tie_word_embeddings=True, norm_topk_prob=False, num_key_value_heads=4), (3, 2)),
]


def _nudge(model: torch.nn.Module) -> None:
    """Move every parameter the HF init leaves neutral: norms + N(0, 0.1) (zero-centred norms start at 0, the
    gated norm at 1), dt_bias + N(0, 0.5), A_log + N(0, 0.1), router and shared-expert gate x5."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.add_(0.5 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight"):
                p.mul_(5.0)


def _hf_model(seed: int = 0, **overrides) -> transformers.Qwen3NextForCausalLM:
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**{**HF_NEXT, **overrides})).eval()
    _nudge(model)
    return model


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_next")
    hf = _hf_model()
    hf.save_pretrained(path)
    return hf, em.from_pretrained(path), path


def _ids(seed: int, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)


@eqx.filter_jit
def _logits(model, ids, segment_ids=None):
    return model(ids, segment_ids=segment_ids)


# ----------------------------------------------------------------------------------------------------------
# HF parity


def _hf_float64(hf: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """HF's logits at the real tokens, computed in float64 row by row without the padding (with the tokens'
    original positions). At this init scale HF's own float32 forward is ~1.5e-5 from its float64 one, so the
    float64 model is the reference that can hold us to 1e-5; rows run alone because HF's float64 eager attention
    turns fully masked padded rows into NaN, which its GDN layers then spread."""
    hf64 = copy.deepcopy(hf).double()
    rows = []
    with torch.no_grad():
        for row, row_mask in zip(ids, mask):
            real = np.flatnonzero(row_mask)
            logits = hf64(torch.from_numpy(row[real][None]), position_ids=torch.from_numpy(real[None])).logits
            rows.append(logits[0].numpy())
    return np.concatenate(rows)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logits_match_hf(tmp_path, case):
    """Length 70 > the 64-token chunk, so the chunked rule crosses a chunk boundary; row 1 is left-padded by 5
    (we give padding g = beta = 0 and mask it from attention): compared on real tokens only."""
    _, overrides, (period, repeats) = case
    hf = _hf_model(seed=1, **overrides)
    hf.save_pretrained(tmp_path)
    ours = em.from_pretrained(tmp_path)
    block = ours.transformer.blocks[0]
    assert isinstance(block, Qwen3NextScannableBlock)
    assert (len(ours.transformer.blocks), len(block.layers), ours.transformer.num_repeats) == (1, period, repeats)
    ids, mask = _ids(2, 2, 70), np.ones((2, 70), np.int64)
    mask[1, :5] = 0
    logits = _logits(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    ref = _hf_float64(hf, ids, mask)
    assert_close(np.asarray(logits)[mask.astype(bool)], ref, 1e-5, f"Qwen3-Next logits vs HF float64 ({case[0]})")


def test_gated_deltanet_layer_matches_hf(default_pair):
    """The GDN layer alone (projection grouping, conv channel order, gates, gated norm) vs HF's module."""
    hf, ours, _ = default_pair
    hf_layer = hf.model.layers[0].linear_attn
    layer = ours.transformer.layer(0).layers[0].mixer
    assert isinstance(hf_layer, HFGatedDeltaNet) and isinstance(layer, Qwen3NextGatedDeltaNet)
    x = np.random.default_rng(3).standard_normal((2, 37, HF_NEXT["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        ref = hf_layer(torch.from_numpy(x)).numpy()
    y, state = layer(jnp.asarray(x))
    assert_close(y, ref, 1e-5, "Qwen3NextGatedDeltaNet")
    assert state.recurrent.dtype == jnp.float32
    assert state.conv.shape == (2, 3, 2 * 2 * 16 + 4 * 12)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_our_save_loads_in_hf(tmp_path, case):
    """HF save -> our load -> our save -> HF load: the HF model rebuilt from our config.json and tensors gives
    the original HF model's logits (1e-6) and ours (1e-5) (each case's non-default fields, e.g. `hidden_act`,
    `mlp_only_layers`, `decoder_sparse_step`, `norm_topk_prob`, tied embeddings, must reach config.json); our
    load of our save is bit-identical."""
    name, overrides, _ = case
    original = _hf_model(seed=1, **overrides)
    original.save_pretrained(tmp_path / "hf")
    ours = em.from_pretrained(tmp_path / "hf")
    em.save_pretrained(ours, tmp_path / "out")
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    ids = _ids(4, 2, 20)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
        assert_close(ref, original(torch.from_numpy(ids)).logits.numpy(), 1e-6, f"{name}: HF from our save")
    assert_close(_logits(ours, jnp.asarray(ids, jnp.int32)), ref, 1e-5, f"{name}: our save -> HF load")
    again = em.from_pretrained(tmp_path / "out")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(again)))
    # a model unrolled for decoding saves the same files (it raised AttributeError)
    unrolled = eqx.tree_at(lambda m: m.transformer, ours, ours.transformer.unroll())
    em.save_pretrained(unrolled, tmp_path / "unrolled")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "unrolled" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_mtp_tensors_of_real_checkpoints_are_ignored(tmp_path, default_pair):
    """Hub Qwen3-Next checkpoints carry `mtp.*` tensors that HF skips on load; so do we."""
    _, _, path = default_pair
    tensors = load_file(path / "model.safetensors")
    tensors["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    em.from_pretrained(tmp_path)
    tensors["model.bogus.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.bogus.weight"):
        em.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Generation state


@eqx.filter_jit
def _forward(model, ids, positions, segment_ids, cache):
    out = model.forward(ids, positions, segment_ids, cache=cache)
    return model.logits(out.hidden), out.cache


def test_cache_layout(default_pair):
    _, ours, _ = default_pair
    (cache,) = ours.init_cache(3, 50)
    gdn, attention = cache[0], cache[3]
    assert isinstance(gdn, GatedDeltaState) and isinstance(attention, KVCache)
    assert gdn.recurrent.shape == (1, 3, 4, 16, 12) and gdn.recurrent.dtype == jnp.float32
    assert gdn.conv.shape == (1, 3, 3, 2 * 2 * 16 + 4 * 12)


def test_prefill_then_steps_equal_full_forward_and_hf_cache(default_pair):
    """Prefill 64 + 6 single-token steps == the full 70-token forward (ours) == HF's cached decode."""
    hf, ours, _ = default_pair
    ids = _ids(5, 1, 70)
    full = np.asarray(_logits(ours, jnp.asarray(ids, jnp.int32)))
    cache = ours.init_cache(1, 70)
    positions = jnp.arange(70, dtype=jnp.int32)[None]
    ones = jnp.ones((1, 70), jnp.int32)
    ids32 = jnp.asarray(ids, jnp.int32)
    logits, cache = _forward(ours, ids32[:, :64], positions[:, :64], ones[:, :64], cache)
    steps = [logits[:, -1]]
    for t in range(64, 69):
        logits, cache = _forward(ours, ids32[:, t : t + 1], positions[:, t : t + 1], ones[:, :1], cache)
        steps.append(logits[:, 0])
    steps = np.stack(steps, axis=1)
    assert_close(steps, full[:, 63:69], 1e-5, "prefill 64 + decode == full forward")

    with torch.no_grad():
        out = hf(torch.from_numpy(ids[:, :64]), use_cache=True)
        hf_steps, past = [out.logits[:, -1]], out.past_key_values
        for t in range(64, 69):
            out = hf(torch.from_numpy(ids[:, t : t + 1]), past_key_values=past, use_cache=True)
            hf_steps.append(out.logits[:, -1])
            past = out.past_key_values
    assert_close(steps, torch.stack(hf_steps, 1).numpy(), 1e-5, "our decode == HF cached decode")


def test_chunked_prefill_equals_one_prefill(default_pair):
    """Prefill 30 then 25 more tokens from the returned state (conv window + recurrent state + KV cache)."""
    _, ours, _ = default_pair
    ids = jnp.asarray(_ids(6, 2, 55), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(55, dtype=jnp.int32), (2, 55))
    ones = jnp.ones((2, 55), jnp.int32)
    full = np.asarray(_logits(ours, ids))
    cache = ours.init_cache(2, 55)
    first, cache = _forward(ours, ids[:, :30], positions[:, :30], ones[:, :30], cache)
    second, _ = _forward(ours, ids[:, 30:], positions[:, 30:], ones[:, 30:], cache)
    assert_close(np.concatenate([first, second], axis=1), full, 1e-5, "prefill 30 + 25 == one prefill")


def test_greedy_generate_matches_hf_with_left_padding(default_pair):
    """Batched prompts of different lengths (left padding must not leak into the GDN state)."""
    hf, ours, _ = default_pair
    ids, mask = _ids(7, 2, 12), np.ones((2, 12), np.int64)
    mask[0, :4] = 0
    ids[0, :4] = 0
    out = em.generate(ours, jnp.asarray(ids, jnp.int32), max_new_tokens=10, temperature=0.0,
                      attention_mask=jnp.asarray(mask, jnp.int32))
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=10,
                          do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(out), ref.numpy())

    alone = em.generate(ours, jnp.asarray(ids[:1, 4:], jnp.int32), max_new_tokens=10, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out)[0, 12:], np.asarray(alone)[0, 8:])


def test_packed_sequences_do_not_see_each_other(default_pair):
    """A row packing [a | b] (segments 1, 2) equals a and b run separately (HF float64 on each, see
    `_hf_float64`): the GDN state and conv window restart at b, attention is segment-masked."""
    hf, ours, _ = default_pair
    a, b = _ids(8, 1, 23), _ids(9, 1, 41)
    packed = jnp.asarray(np.concatenate([a, b], axis=1), jnp.int32)
    segments = jnp.asarray(np.concatenate([np.ones((1, 23)), 2 * np.ones((1, 41))], axis=1), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(23), np.arange(41)])[None], jnp.int32)
    logits = np.asarray(ours(packed, positions, segments))
    assert_close(logits[0, :23], _hf_float64(hf, a, np.ones_like(a)), 1e-5, "packed segment a")
    assert_close(logits[0, 23:], _hf_float64(hf, b, np.ones_like(b)), 1e-5, "packed segment b")


# ----------------------------------------------------------------------------------------------------------
# Training and configs


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_router_aux_loss_matches_hf(tmp_path, case):
    """`aux_loss` of the forward's router statistics vs HF's `aux_loss` (`output_router_logits=True`), 1e-5
    relative, with no padding and with row 1 left-padded by 5 (HF's `attention_mask`, our segment id 0: padding
    is left out of the router statistics; counting it moves HF's loss by > 1e-3). Every layer is MoE in the
    first case, only layers 2 and 5 of 6 in the second (dense layers must not count)."""
    name, overrides, _ = case
    hf = _hf_model(seed=12, **overrides)
    hf.save_pretrained(tmp_path)
    ours = em.from_pretrained(tmp_path)
    ids, mask = _ids(13, 2, 24), np.ones((2, 24), np.int64)
    mask[1, :5] = 0
    aux_of = eqx.filter_jit(lambda m, i, s: m.aux_loss(m.forward(i, segment_ids=s).stats))
    for what, hf_mask in (("no padding", None), ("left-padded", mask)):
        with torch.no_grad():
            attention_mask = None if hf_mask is None else torch.from_numpy(hf_mask)
            ref = hf(torch.from_numpy(ids), attention_mask=attention_mask, output_router_logits=True)
        assert len(ref.router_logits) == (4 if name == CASES[0][0] else 2)
        segments = np.ones_like(ids) if hf_mask is None else hf_mask
        aux = aux_of(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(segments, jnp.int32))
        assert_close(aux, float(ref.aux_loss), 1e-5, f"{name} router aux loss ({what})")
    cfg = hf.config
    with_padding = load_balancing_loss_func(ref.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
    assert abs(float(with_padding) / float(ref.aux_loss) - 1) > 1e-3, "padding does not move the loss"


def test_gradients_are_finite(default_pair):
    """Gradients of mean logit^2 + router aux loss are finite everywhere and non-zero for the GDN-only
    parameters (A_log, dt_bias, conv)."""
    _, ours, _ = default_pair
    ids = jnp.asarray(_ids(10, 2, 40), jnp.int32)

    @eqx.filter_grad
    def grad(model):
        out = model.forward(ids, inference=False)
        return jnp.mean(model.logits(out.hidden) ** 2) + model.aux_loss(out.stats)

    grads = grad(ours)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    gdn = grads.transformer.blocks[0].layers[0].mixer
    assert float(jnp.abs(gdn.A_log).max()) > 0 and float(jnp.abs(gdn.dt_bias).max()) > 0
    assert float(jnp.abs(gdn.conv.weight).max()) > 0


def test_model_from_config_runs_with_every_gated_delta_impl():
    cfg = em.Qwen3NextConfig.from_hf_dict(HF_NEXT)
    ids = jnp.asarray(_ids(11, 1, 20), jnp.int32)
    results = {}
    for impl in ("recurrent", "naive_chunk", "chunk", "chunk_pallas"):
        model = em.Qwen3NextForCausalLM(cfg.replace(gated_delta_impl=impl, gated_delta_chunk_size=8),
                                        key=jax.random.key(0))
        results[impl] = np.asarray(_logits(model, ids))
    for impl in ("naive_chunk", "chunk", "chunk_pallas"):
        assert_close(results[impl], results["recurrent"], 1e-5, f"{impl} vs recurrent in the model")


def test_config_round_trip_and_errors():
    cfg = em.Qwen3NextConfig.from_hf_dict(HF_NEXT)
    assert cfg.partial_rotary_factor == 0.25 and cfg.layer_types[3] == "full_attention"
    assert em.Qwen3NextConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    assert em.Qwen3NextConfig(num_hidden_layers=8).layer_types == ("linear_attention",) * 3 + ("full_attention",) + (
        "linear_attention",) * 3 + ("full_attention",)
    with pytest.raises(ValueError, match="layer_types"):
        em.Qwen3NextConfig(num_hidden_layers=4, layer_types=("linear_attention",) * 3)
    with pytest.raises(ValueError, match="linear_num_value_heads"):
        em.Qwen3NextConfig(linear_num_key_heads=3, linear_num_value_heads=4)
    with pytest.raises(ValueError, match="gated_delta_impl"):
        em.Qwen3NextConfig(gated_delta_impl="fast")
    # the jaxtyping hook in the test run rejects it first; without the hook, our own ValueError does
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="Qwen3NextConfig"):
        em.Qwen3NextForCausalLM(em.Qwen3MoeConfig(), key=jax.random.key(0))
