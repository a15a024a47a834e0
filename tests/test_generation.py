"""`eqx_models.generation`: greedy decoding equals HF transformers' `generate` token for token (dense and
MoE Qwen3, left-padded batch), EOS handling and early exit, sampling filters (`top_k`, `top_p`, temperature)
checked exactly or statistically on fixed logits and against HF's logits warpers, one compiled decode loop,
and input validation."""

import gc
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import eqx_models as em
import eqx_models.generation as gen
from eqx_models.generation import generate, sample_token
from eqx_models.models.qwen3_omni import Qwen3OmniMoeVisionEncoder
from tests.reference import assert_close

# The tiny configs of /work/shared/reference/hf/tiny_configs.py (copied, not imported).
HF_QWEN3 = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    attention_bias=False, attn_implementation="eager",
)
HF_QWEN3_MOE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    experts_implementation="eager", attn_implementation="eager",
)
MAX_NEW = 14
PAD = 3  # left padding of row 1


def _random_model(cfg, seed: int = 0):
    """Our model with NumPy-random parameters (norm scales 1, every other weight N(0, 0.15^2)), built from
    `filter_eval_shape`: the real initialiser compiles for seconds even at this size."""
    cls = em.Qwen3MoeForCausalLM if isinstance(cfg, em.Qwen3MoeConfig) else em.Qwen3ForCausalLM
    skeleton = eqx.filter_eval_shape(cls, cfg, key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith(".scale"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.15 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, skeleton)


def _hf_pair(tmp_path, moe: bool):
    """HF model saved by HF and loaded by us. Weights N(0, 0.2^2) (`initializer_range=0.2`; HF's 0.02 gives
    near-uniform logits and a constant greedy output) and norm weights + N(0, 0.3), so greedy decoding is
    varied and its argmax margins are wide."""
    cfg_cls, model_cls = (
        (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM) if moe
        else (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)
    )
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**(HF_QWEN3_MOE if moe else HF_QWEN3), initializer_range=0.2)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    return hf, em.from_pretrained(tmp_path)


def _prompt(seed: int = 1, batch: int = 2, seq: int = 9, vocab: int = 256):
    """Token ids with row 1 left-padded by `PAD` (pad id 0, mask 0), as int64 NumPy."""
    ids = np.random.default_rng(seed).integers(1, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, mask


def _hf_greedy(hf, ids, mask, max_new):
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    return out.numpy()


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory):
    return _hf_pair(tmp_path_factory.mktemp("qwen3"), moe=False)


@pytest.fixture(scope="module")
def greedy_run(dense_pair):
    """Our greedy output on the dense model (prompt + MAX_NEW tokens) and its inputs."""
    _, ours = dense_pair
    ids, mask = _prompt()
    out = np.asarray(generate(ours, jnp.asarray(ids), MAX_NEW, attention_mask=jnp.asarray(mask)))
    return ours, ids, mask, out


@pytest.fixture(scope="module")
def tiny():
    """A small random model (vocab 64) for sampling and tracing tests."""
    cfg = em.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return _random_model(cfg)


@pytest.fixture(scope="module")
def tiny_greedy(tiny):
    """A [2, 7] prompt and the tiny model's greedy continuation by 10 tokens."""
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 7)))
    return ids, np.asarray(generate(tiny, ids, 10))


# ----------------------------------------------------------------------------------------------- HF parity


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["qwen3", "qwen3_moe"])
def test_greedy_matches_hf_generate(tmp_path, moe):
    """Greedy `generate` == HF `generate(do_sample=False)` token for token (exact), batch of 2 with a
    left-padded row, 14 new tokens."""
    hf, ours = _hf_pair(tmp_path, moe)
    ids, mask = _prompt()
    ref = _hf_greedy(hf, ids, mask, MAX_NEW)
    out = np.asarray(generate(ours, jnp.asarray(ids), MAX_NEW, attention_mask=jnp.asarray(mask)))
    assert out.shape == ref.shape == (2, ids.shape[1] + MAX_NEW)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[:, : ids.shape[1]], ids)
    assert len(set(out[0, ids.shape[1]:].tolist())) > 3, "degenerate greedy output: the test would be weak"
    np.testing.assert_array_equal(out, ref)


@pytest.mark.slow
def test_left_padding_is_invisible(greedy_run):
    """The left-padded row decodes exactly as the same prompt without padding, alone in its batch (exact)."""
    ours, ids, _, out = greedy_run
    alone = np.asarray(generate(ours, jnp.asarray(ids[1:, PAD:]), MAX_NEW))
    np.testing.assert_array_equal(alone[0], out[1, PAD:])


# ----------------------------------------------------------------------------------------------------- EOS


def _truncate_at_eos(tokens: np.ndarray, eos: set[int], pad: int) -> np.ndarray:
    """Reference: each row up to and including its first EOS, then `pad`."""
    tokens = tokens.copy()
    for row in tokens:
        hits = [i for i, t in enumerate(row) if int(t) in eos]
        if hits:
            row[hits[0] + 1:] = pad
    return tokens


def _first_new_token_index(row: np.ndarray, lo: int, hi: int) -> int:
    """The first index in [lo, hi) whose token does not occur earlier in the row."""
    for i in range(lo, hi):
        if int(row[i]) not in set(row[:i].tolist()):
            return i
    pytest.fail(f"greedy output {row} has no fresh token in [{lo}, {hi})")


class _ForwardCounter:
    """Monkeypatches the decoder class's (`Transformer`) `forward` to count trace-time (Python) calls and
    run-time executions (through `jax.debug.callback`, which fires on every while-loop iteration)."""

    def __init__(self, monkeypatch, model):
        self.traced, self.executed = 0, []
        original = type(model.transformer).forward
        gen._generate._cached.clear_cache()  # compile afresh so the counting forward is traced

        def forward(this, input_ids, *args, **kwargs):
            self.traced += 1
            jax.debug.callback(lambda x: self.executed.append(x.shape), input_ids)
            return original(this, input_ids, *args, **kwargs)

        monkeypatch.setattr(type(model.transformer), "forward", forward)

    def runs(self) -> int:
        jax.effects_barrier()
        return len(self.executed)


@pytest.mark.slow
def test_eos_repeats_and_prefix_equals_greedy(greedy_run):
    """With `eos_token_id` = a token greedy emits mid-way, each row equals the greedy run up to its first EOS
    and repeats EOS afterwards (the default pad; exact); int and list forms agree."""
    ours, ids, mask, out = greedy_run
    prompt = ids.shape[1]
    new = out[:, prompt:]
    j = _first_new_token_index(new[0], 4, MAX_NEW - 3)
    eos = int(new[0, j])
    got = np.asarray(generate(ours, jnp.asarray(ids), MAX_NEW, attention_mask=jnp.asarray(mask),
                              eos_token_id=eos))
    assert got.shape == out.shape
    expected = _truncate_at_eos(new, {eos}, eos)
    np.testing.assert_array_equal(got[:, :prompt], ids)
    np.testing.assert_array_equal(got[:, prompt:], expected)
    assert (got[0, prompt + j:] == eos).all() and (got[0, prompt:prompt + j] != eos).all()
    as_list = generate(ours, jnp.asarray(ids), MAX_NEW, attention_mask=jnp.asarray(mask), eos_token_id=[eos])
    np.testing.assert_array_equal(np.asarray(as_list), got)


@pytest.mark.slow
def test_loop_stops_when_all_rows_done(greedy_run, monkeypatch):
    """Once every row has emitted an EOS the decode loop exits: the forward pass runs `1 + f` times (prefill +
    `f` steps, `f` = the last row's first EOS index) instead of `MAX_NEW`; the output keeps its full shape."""
    ours, ids, mask, out = greedy_run
    prompt = ids.shape[1]
    new = out[:, prompt:]
    eos = {int(new[r, _first_new_token_index(new[r], 2, MAX_NEW - 5)]) for r in range(2)}
    expected = _truncate_at_eos(new, eos, min(eos))
    finish = max(min(i for i, t in enumerate(row) if int(t) in eos) for row in new)
    assert finish < MAX_NEW - 2

    counter = _ForwardCounter(monkeypatch, ours)
    # one more column of left padding: must change nothing
    ids2 = jnp.asarray(np.pad(ids, ((0, 0), (1, 0))))
    mask2 = jnp.asarray(np.pad(mask, ((0, 0), (1, 0))), jnp.int32)
    baseline = np.asarray(generate(ours, ids2, MAX_NEW, attention_mask=mask2))
    np.testing.assert_array_equal(baseline[:, 1:], out)
    assert counter.runs() == MAX_NEW
    counter.executed.clear()
    got = np.asarray(generate(ours, ids2, MAX_NEW, attention_mask=mask2, eos_token_id=sorted(eos)))
    assert got.shape == (2, prompt + 1 + MAX_NEW)
    np.testing.assert_array_equal(got[:, prompt + 1:], expected)
    assert counter.runs() == 1 + finish


def test_eos_on_first_token_skips_the_loop(tiny, tiny_greedy, monkeypatch):
    """If every row's first token is an EOS the loop body never runs (1 forward execution) and the whole
    continuation is that EOS."""
    ids, greedy = tiny_greedy
    first = greedy[:, ids.shape[1]]
    counter = _ForwardCounter(monkeypatch, tiny)
    got = np.asarray(generate(tiny, ids, 9, eos_token_id=[int(t) for t in first]))
    assert got.shape == (2, ids.shape[1] + 9)
    np.testing.assert_array_equal(got[:, ids.shape[1]], first)
    np.testing.assert_array_equal(got[:, ids.shape[1] + 1:], int(first[0]))  # the pad: the first eos id
    assert counter.runs() == 1


@pytest.mark.slow
@pytest.mark.parametrize("pad", [None, 5])
def test_eos_list_and_pad_match_hf(dense_pair, greedy_run, pad):
    """Two eos ids that rows emit at different steps (as Qwen3's generation config lists two): finished rows hold
    `pad_token_id`, by default the first eos id, as HF's `generate` (rows that ended on the second id repeated it);
    HF stops early with a shorter output, ours keeps its shape and pads."""
    hf, ours = dense_pair
    _, ids, mask, out = greedy_run
    prompt, new = ids.shape[1], out[:, ids.shape[1]:]
    eos = [int(new[r, _first_new_token_index(new[r], 2, MAX_NEW - 5)]) for r in (1, 0)]
    assert len(set(eos)) == 2
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=MAX_NEW,
                          do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if pad is None else pad).numpy()
    got = np.asarray(generate(ours, jnp.asarray(ids), MAX_NEW, attention_mask=jnp.asarray(mask),
                              eos_token_id=eos, pad_token_id=pad))
    assert ref.shape[1] < got.shape[1] == prompt + MAX_NEW
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    np.testing.assert_array_equal(got[:, ref.shape[1]:], eos[0] if pad is None else pad)
    assert any(int(t) == eos[1] for t in ref[:, prompt:].ravel()), "no row ended on the second eos id"


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.slow
def test_sampling_is_keyed(tiny, tiny_greedy):
    """temperature > 0: the same key gives the same tokens (exact), different keys different ones, without
    recompiling; top_k=1 and a tiny top_p reduce to greedy (exact)."""
    ids, greedy = tiny_greedy
    sample = lambda k, **kw: np.asarray(generate(tiny, ids, 10, 1.0, jax.random.key(k), **kw))  # noqa: E731
    a = sample(0)
    size = gen._generate._cached._cache_size()
    b, c = sample(0), sample(1)
    assert gen._generate._cached._cache_size() == size
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != greedy).any()
    np.testing.assert_array_equal(sample(3, top_k=1), greedy)
    np.testing.assert_array_equal(sample(4, top_p=1e-6), greedy)


def test_sampling_steps_use_fresh_randomness(tiny, tiny_greedy):
    """A model with all-zero weights has uniform logits at every step; sampled continuations must then vary
    along each row (the same randomness reused every step would repeat one token)."""
    zero = jax.tree.map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else x, tiny)
    ids, _ = tiny_greedy
    out = np.asarray(generate(zero, ids, 10, 1.0, jax.random.key(0)))[:, ids.shape[1]:]
    assert all(len(set(row.tolist())) > 3 for row in out), out


def _draws(logits: np.ndarray, n: int, **kwargs) -> np.ndarray:
    """`n` samples of `sample_token` on a `[1, vocab]` row, one key each."""
    keys = jax.random.split(jax.random.key(0), n)
    fn = jax.jit(jax.vmap(lambda k: sample_token(jnp.asarray(logits, jnp.float32)[None], k, **kwargs)[0]))
    return np.asarray(fn(keys))


def _check_frequencies(draws: np.ndarray, probs: np.ndarray):
    """Empirical frequencies within 5 binomial standard deviations (+ 0.005) of `probs`; zero-probability
    tokens never drawn."""
    n = len(draws)
    freq = np.bincount(draws, minlength=len(probs)) / n
    assert (freq[probs == 0] == 0).all(), f"drew excluded tokens: {np.nonzero(freq * (probs == 0))[0]}"
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 5e-3), (freq, probs)


def test_sample_token_top_k_restricts_to_k_best():
    """top_k=3 at temperature 0.7: draws (4000 keys) fall only on the 3 largest logits, with frequencies
    softmax(top-3 logits / 0.7) (5 sigma)."""
    logits = np.array([0.3, 2.0, -1.0, 1.5, 0.1, 1.7, -0.5, 0.9, 1.6])
    draws = _draws(logits, 4000, temperature=0.7, top_k=3)
    top = np.argsort(logits)[-3:]
    probs = np.zeros_like(logits)
    probs[top] = np.exp(logits[top] / 0.7) / np.exp(logits[top] / 0.7).sum()
    _check_frequencies(draws, probs)


def test_sample_token_temperature_only():
    """No filters: draws follow softmax(logits / T) for T = 1.5 (4000 keys, 5 sigma)."""
    logits = np.array([0.3, 2.0, -1.0, 1.5, 0.1])
    draws = _draws(logits, 4000, temperature=1.5)
    probs = np.exp(logits / 1.5) / np.exp(logits / 1.5).sum()
    _check_frequencies(draws, probs)


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.3, [1]), (0.6, [1, 3]), (0.7, [1, 3, 4]), (0.97, [0, 1, 2, 3, 4])]
)
def test_sample_token_top_p_keeps_smallest_prefix(top_p, kept):
    """Probabilities [.05, .40, .10, .25, .20]: top_p keeps the smallest most-probable set whose mass reaches
    top_p (0.3 -> {1}, 0.6 -> {1, 3}, 0.7 -> {1, 3, 4}, 0.97 -> all), renormalised (4000 keys, 5 sigma)."""
    probs = np.array([0.05, 0.40, 0.10, 0.25, 0.20])
    draws = _draws(np.log(probs), 4000, temperature=1.0, top_p=top_p)
    expected = np.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    _check_frequencies(draws, expected)


def _hf_filtered(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """HF `generate`'s filtered float32 scores: the warpers its `_get_logits_processor` builds for these
    settings (temperature, then top-k, then top-p), from a tiny HF Qwen3."""
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**dict(HF_QWEN3, num_hidden_layers=1)))
    config = transformers.GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k or 0,
                                           top_p=1.0 if top_p is None else top_p)
    processors = hf._get_logits_processor(config)
    expected = [name for name, used in (("TemperatureLogitsWarper", temperature != 1.0),
                                        ("TopKLogitsWarper", top_k is not None),
                                        ("TopPLogitsWarper", top_p is not None)) if used]
    assert [type(p).__name__ for p in processors] == expected
    scores = torch.from_numpy(np.asarray(logits, np.float32))
    return processors(torch.zeros((len(scores), 1), dtype=torch.long), scores).numpy()


def _filtered(logits: np.ndarray, **kwargs) -> np.ndarray:
    """The logits `sample_token` draws from, captured at its `jax.random.categorical` call."""
    seen = []

    def categorical(key, logits, axis=-1):
        seen.append(np.asarray(logits))
        return jnp.argmax(logits, axis=axis)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax.random, "categorical", categorical)
        sample_token(jnp.asarray(logits, jnp.float32), jax.random.key(0), **kwargs)
    (filtered,) = seen
    return filtered


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(np.asarray(logits, np.float64) - np.max(logits, -1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _filter_cases() -> list:
    """(logits rows, temperature, top_k, top_p, kept tokens per row or None). Random rows have no ties; the
    hand-made ones put a tie on the top-k boundary (HF and we keep every tied token), a tie inside the nucleus,
    and top_p 1e-4 above and below the mass of the two most probable tokens after temperature (that mass itself
    is not well-defined in float32: HF sums the tail ascending, we sum the head)."""
    rows = np.random.default_rng(3).normal(0.0, 1.5, (16, 64))
    tied_k = np.array([[2.0, 1.0, 1.0, 0.5, -1.0, 0.2, 0.8, -0.4]])
    tied_p = np.array([[1.0, 1.0, -0.5, 0.3, 0.1, -1.2, 0.6, 0.6]])
    edge = np.array([[1.2, 0.3, 0.9, -0.4, 0.0, 0.5, -1.0, 0.2]])
    head = np.sort(_softmax(edge / 0.6)[0])[::-1][:2].sum()
    return [
        (rows, 0.5, None, 0.8, None), (rows, 1.7, None, 0.8, None), (rows, 0.5, 10, None, None),
        (rows, 0.6, 10, 0.7, None), (rows, 1.7, 5, 0.9, None), (rows, 1.0, 7, 0.6, None),
        (tied_k, 0.5, 2, None, [[0, 1, 2]]), (tied_k, 1.8, 2, 0.9, [[0, 1, 2]]),
        (tied_p, 1.5, None, 0.55, [[0, 1, 6, 7]]), (tied_p, 0.4, 6, 0.9, [[0, 1, 6, 7]]),
        (edge, 0.6, None, head + 1e-4, [[0, 2, 5]]), (edge, 0.6, None, head - 1e-4, [[0, 2]]),
    ]


@pytest.mark.parametrize(("logits", "temperature", "top_k", "top_p", "kept"), _filter_cases(), ids=[
    "top_p-T0.5", "top_p-T1.7", "top_k-T0.5", "top_k-top_p-T0.6", "top_k-top_p-T1.7", "top_k-top_p-T1",
    "top_k-tie-T0.5", "top_k-tie-T1.8", "top_p-tie-T1.5", "top_k-top_p-tie-T0.4", "top_p-above-edge-T0.6",
    "top_p-below-edge-T0.6"])
def test_sample_token_filters_match_hf_warpers(logits, temperature, top_k, top_p, kept):
    """The logits `sample_token` samples from vs HF `generate`'s warpers (`_hf_filtered`), temperature != 1
    with top_k and top_p alone and together: the same tokens survive (exact; the expected set where given)
    with the same probabilities (1e-6). The nucleus is taken after temperature and top-k, as in HF."""
    ours = _filtered(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    ref = _hf_filtered(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    if kept is not None:
        assert [np.flatnonzero(np.isfinite(row)).tolist() for row in ours] == kept
    assert_close(_softmax(ours), _softmax(ref), 1e-6, f"filtered probabilities, T={temperature}")


@pytest.mark.parametrize("logits, top_p", [([[0.0, 0.0, 0.0, 0.0]], 0.3), ([[2.0, 1.0, 1.0, 1.0, 0.0]], 0.5),
                                            ([[1.0, 0.5, 0.5, 0.5, 0.5, -1.0]], 0.6)])
def test_top_p_cuts_tokens_tied_at_its_edge_by_position(logits, top_p):
    """Tokens tied at the nucleus edge are cut by position, as HF's warper does: as many tokens survive as the
    smallest prefix that reaches top_p needs (keeping every tied token kept up to twice as many). Which of the tied
    ones survive is arbitrary in both, so the kept counts and the kept logits are compared."""
    logits = np.asarray(logits)
    ours, ref = _filtered(logits, temperature=1.0, top_p=top_p), _hf_filtered(logits, 1.0, None, top_p)
    assert np.isfinite(ours).sum() == np.isfinite(ref).sum()
    np.testing.assert_array_equal(np.sort(ours[np.isfinite(ours)]), np.sort(ref[np.isfinite(ref)]))


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    """top_p=1 filters nothing (HF adds no warper), even where the float32 running sum of 151,936 probabilities
    reaches 1 before the last token."""
    logits = np.random.default_rng(0).normal(0.0, 3.0, (4, 151_936))
    assert np.isfinite(_filtered(logits, temperature=1.0, top_p=1.0)).all()


def test_sample_token_top_k_top_p_frequencies_match_hf():
    """Sampling end to end (4000 keys) at temperature 1.6 with top_k=5 and top_p=0.7: frequencies follow HF's
    filtered distribution (5 sigma, excluded tokens never drawn)."""
    logits = np.array([0.3, 2.0, -1.0, 1.5, 0.1, 1.7, -0.5, 0.9, 1.6])
    probs = _softmax(_hf_filtered(logits[None], 1.6, 5, 0.7))[0]
    _check_frequencies(_draws(logits, 4000, temperature=1.6, top_k=5, top_p=0.7), probs)


def test_sample_token_greedy_and_dtype():
    """temperature 0 is argmax per row (exact), int32, no key needed."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 11)), jnp.float32)
    out = sample_token(logits, None)
    assert out.dtype == jnp.int32 and out.shape == (3,)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


# ------------------------------------------------------------------------------------- unrolled layout


def test_unrolled_layers_equal_the_scan(tiny, tiny_greedy):
    """`Transformer.unroll()` (what `generate` decodes with) gives the scanned stack's logits, router statistics
    and cache contents; generating with and without it gives the same tokens."""
    cfg = em.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    moe = _random_model(cfg, seed=4)
    unrolled = eqx.tree_at(lambda m: m.transformer, moe, moe.transformer.unroll())
    assert unrolled.transformer.unrolled and unrolled.transformer.num_layers == 3
    assert unrolled.transformer.unroll() is unrolled.transformer
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 9)))

    @eqx.filter_jit
    def forward(model):
        out = model.forward(ids, cache=model.init_cache(2, 12))
        return model.logits(out.hidden), out.stats, out.cache

    logits, stats, cache = forward(moe)
    logits_u, stats_u, cache_u = forward(unrolled)
    assert_close(logits_u, logits, 1e-6, "unrolled vs scanned logits")  # XLA fuses the two differently
    np.testing.assert_allclose(np.asarray(moe.aux_loss(stats_u)), np.asarray(moe.aux_loss(stats)), rtol=1e-6)
    for layer in range(3):
        assert_close(cache_u[layer][0].key, cache[0].key[layer], 1e-6, f"unrolled vs scanned cache, layer {layer}")
    np.testing.assert_array_equal(np.asarray(generate(moe, ids, 6, unroll_layers=False)),
                                  np.asarray(generate(moe, ids, 6)))
    ids, greedy = tiny_greedy
    np.testing.assert_array_equal(np.asarray(generate(tiny, ids, 10, unroll_layers=False)), greedy)


def test_unrolled_layers_are_views_of_the_stacked_arrays_on_cpu():
    """On one CPU device `unroll()` copies nothing: each layer is the stacked array's memory at its offset
    (wherever that offset is 64-byte aligned, as jax needs to take a host buffer as it is), so `generate` holds
    the weights once; once the unrolled layers are dropped, the stacked arrays can be donated again."""
    cfg = em.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    model = _random_model(cfg, seed=6)
    stacked = jax.tree.leaves(eqx.filter(model.transformer.blocks, eqx.is_array))
    unrolled = model.transformer.unroll()
    layers = [jax.tree.leaves(eqx.filter(block, eqx.is_array)) for block in unrolled.blocks]
    aligned = 0
    for i, leaf in enumerate(stacked):
        size = leaf.nbytes // leaf.shape[0]
        for r in range(3):
            np.testing.assert_array_equal(np.asarray(layers[r][i]), np.asarray(leaf)[r])
            if size % 64 == 0:
                assert layers[r][i].unsafe_buffer_pointer() == leaf.unsafe_buffer_pointer() + r * size
                aligned += 1
    assert aligned >= 3 * (len(stacked) - 2)  # all but the q/k norm scales (32 bytes a layer)
    del unrolled, layers
    gc.collect()
    jax.jit(lambda x: x + 1, donate_argnums=0)(stacked[0])
    assert stacked[0].is_deleted()


def test_generate_unrolls_where_the_copy_fits(tiny, tiny_greedy, monkeypatch):
    """By default `generate` unrolls the layers only where each device has room for their copy beside the KV
    cache (to the byte); devices without memory statistics (the CPU, where the layers become views) always do.
    `unroll_layers=True` / `False` force it. The tokens are the same either way."""
    ids, greedy = tiny_greedy
    unrolled = []
    unroll = em.models.transformer.Transformer.unroll
    monkeypatch.setattr(em.models.transformer.Transformer, "unroll", lambda self: unrolled.append(1) or unroll(self))
    copy = sum(leaf.nbytes for leaf in jax.tree.leaves(eqx.filter(tiny.transformer.blocks, eqx.is_array)))
    cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(lambda: tiny.init_cache(2, 17))))
    cases = [(None, None, True), (copy + cache, None, True), (copy + cache - 1, None, False), (0, True, True),
             (10**12, False, False)]
    for free, unroll_layers, unrolls in cases:
        monkeypatch.setattr(gen, "_free_bytes", lambda device: free)
        unrolled.clear()
        np.testing.assert_array_equal(np.asarray(generate(tiny, ids, 10, unroll_layers=unroll_layers)), greedy)
        assert bool(unrolled) == unrolls, (free, unroll_layers)


def test_quantized_cache_generates_with_int8_keys_and_values(tiny, monkeypatch):
    """`quantized_cache=True` builds the int8 cache and decodes from it: the tokens equal a greedy loop written
    out by hand over `init_cache(quantized=True)` (prefill, then one token at a time)."""
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 64, (2, 7)))
    cache = tiny.init_cache(2, 7 + 6, quantized=True)
    out = tiny.forward(ids, cache=cache)
    tokens = [jnp.argmax(tiny.logits(out.hidden[:, -1]), -1)]
    for step in range(5):
        positions = jnp.full((2, 1), 7 + step, jnp.int32)
        out = tiny.forward(tokens[-1][:, None], positions, cache=out.cache)
        tokens.append(jnp.argmax(tiny.logits(out.hidden[:, 0]), -1))
    expected = np.concatenate([np.asarray(ids), np.stack(tokens, 1)], axis=1)

    built = []
    init_cache = type(tiny).init_cache
    monkeypatch.setattr(type(tiny), "init_cache",
                        lambda self, *a, **kw: built.append(kw) or init_cache(self, *a, **kw))
    np.testing.assert_array_equal(np.asarray(generate(tiny, ids, 6, quantized_cache=True)), expected)
    assert built == [{"quantized": True}]


def test_hand_written_decode_loops_over_init_cache(tiny):
    """`init_cache` for loops written by hand: an unrolled model's layers get their own buffers, so the caches
    can be donated step to step; `empty=False` gives the structure a forward returns, so `lax.scan` carries the
    cache from the prompt's first token. Both give the greedy tokens of `generate`."""
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 64, (2, 7)))
    expected = np.asarray(generate(tiny, ids, 4))[:, 7:]
    unrolled = eqx.tree_at(lambda m: m.transformer, tiny, tiny.transformer.unroll())

    @eqx.filter_jit(donate="all-except-first")
    def step(model, cache, tokens, positions):
        out = model.forward(tokens, positions, cache=cache)
        return out.cache, jnp.argmax(model.logits(out.hidden[:, -1]), -1)

    for quantized in (False, True):
        cache = unrolled.init_cache(2, 11, quantized=quantized)
        leaves = jax.tree.leaves(cache)
        assert len({id(leaf) for leaf in leaves}) == len(leaves) == 2 * (4 + 2 * quantized)
        cache, token = step(unrolled, cache, ids, jnp.broadcast_to(jnp.arange(7), (2, 7)))
        tokens = [token]
        for i in range(3):
            cache, token = step(unrolled, cache, tokens[-1][:, None], jnp.full((2, 1), 7 + i))
            tokens.append(token)
        if not quantized:
            np.testing.assert_array_equal(np.stack(tokens, 1), expected)

    def scanned(cache, token_position):
        token, position = token_position
        out = tiny.forward(token[:, None], jnp.broadcast_to(position, (2, 1)), cache=cache)
        return out.cache, jnp.argmax(tiny.logits(out.hidden[:, -1]), -1)

    cache, predicted = jax.lax.scan(scanned, tiny.init_cache(2, 11, empty=False), (ids.T, jnp.arange(7)))
    np.testing.assert_array_equal(predicted[-1], expected[:, 0])


# ------------------------------------------------------------------------------------------------- tracing


def test_one_compiled_loop(tiny, monkeypatch):
    """The model's forward is traced twice per compilation (prefill + loop body) whatever `max_new_tokens` is,
    and a second call with the same shapes and options neither retraces nor grows the jit cache."""
    counter = _ForwardCounter(monkeypatch, tiny)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 64, (3, 11)))
    generate(tiny, ids, 4).block_until_ready()
    assert counter.traced == 2
    generate(tiny, ids, 16).block_until_ready()
    assert counter.traced == 4
    size = gen._generate._cached._cache_size()
    again = generate(tiny, jnp.asarray(rng.integers(0, 64, (3, 11))), 16)
    again.block_until_ready()
    assert counter.traced == 4
    assert gen._generate._cached._cache_size() == size


# ------------------------------------------------------------------------------------------------- errors


def _unchecked(fn):
    """`fn` without the jaxtyping/beartype wrapper the test suite's import hook adds, so we see our own
    validation rather than the annotation check (which users without the hook do not have)."""
    return inspect.unwrap(fn)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=jnp.zeros((2, 5), jnp.float32)), "input_ids must be integer"),
        (dict(input_ids=jnp.zeros((5,), jnp.int32)), "input_ids must be integer"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive int"),
        (dict(temperature=-0.5, key=jax.random.key(0)), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan"), key=jax.random.key(0)), "temperature must be a finite number >= 0"),
        (dict(input_ids=jnp.zeros((2, 0), jnp.int32)), r"prompt >= 1"),
        (dict(attention_mask=jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])), r"left-padded .* rows \[0\]"),
        (dict(attention_mask=jnp.asarray([[1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])), r"left-padded .* rows \[1\]"),
        (dict(attention_mask=jnp.zeros((2, 5), jnp.int32)), r"left-padded .* rows \[0, 1\]"),
        (dict(temperature=0.7), "needs a PRNG key"),
        (dict(top_k=0), "top_k must be an int in"),
        (dict(top_k=65), "top_k must be an int in"),
        (dict(top_k=2.0), "top_k must be an int in"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive int"),
        (dict(input_ids=jnp.full((2, 5), 64, jnp.int32)), r"token ids must lie in \[0, 64\), got range \[64, 64\]"),
        (dict(input_ids=jnp.full((2, 5), -1, jnp.int32), attention_mask=jnp.asarray([[0, 1, 1, 1, 1]] * 2)),
         "token ids must lie in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(attention_mask=jnp.ones((2, 4), jnp.int32)), "attention_mask .* must match input_ids"),
        (dict(eos_token_id=3, pad_token_id=64), r"pad_token_id must be an id in \[0, 64\), got 64"),
        (dict(eos_token_id=64), r"eos_token_id must be an id or a list of ids in \[0, 64\), got 64"),
        (dict(eos_token_id=[2, -1]), r"eos_token_id must be .*got \[2, -1\]"),
        (dict(eos_token_id=2.5), r"eos_token_id must be .*got 2.5"),
        (dict(eos_token_id=[]), r"eos_token_id must be .*got \[\]"),
    ],
    ids=["float-ids", "1d-ids", "max-new-0", "max-new-neg", "neg-temperature", "nan-temperature", "empty-prompt",
         "right-padded", "hole-in-mask", "no-real-token", "no-key", "top-k-0",
         "top-k-too-big", "top-k-float", "max-new-bool", "id-past-vocab", "negative-real-id", "top-p-1.5", "top-p-0",
         "mask-shape", "pad-past-vocab", "eos-past-vocab", "eos-negative", "eos-float", "eos-empty"],
)
def test_bad_input_raises(tiny, kwargs, message):
    """Invalid arguments raise ValueError naming the problem, before anything is traced."""
    args = dict(input_ids=jnp.zeros((2, 5), jnp.int32), max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        _unchecked(generate)(tiny, **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(temperature=-1.0), "temperature must be"), (dict(temperature=0.5, key=None), "needs a PRNG key"),
     (dict(top_k=0), "top_k must be"), (dict(top_k=4), "top_k must be"), (dict(top_p=0.0), "top_p must be")],
    ids=["neg-temperature", "no-key", "top-k-0", "top-k-past-vocab", "top-p-0"],
)
def test_sample_token_checks_its_arguments(kwargs, message):
    """`sample_token` called directly validates as `generate` does (a negative temperature would sample the
    inverted distribution; a bad top_k fails deep inside lax.top_k)."""
    args = dict(key=jax.random.key(0), temperature=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        sample_token(jnp.zeros((2, 3)), **args)


def test_plain_ints_pass_the_type_hook(tiny):
    """Under the jaxtyping + beartype hook, int literals are fine where a float is meant (temperature=0,
    top_p=1), as Python's numeric tower has it."""
    ids = jnp.zeros((1, 3), jnp.int32)
    np.testing.assert_array_equal(np.asarray(generate(tiny, ids, 2, temperature=0)), np.asarray(generate(tiny, ids, 2)))
    assert sample_token(jnp.zeros((2, 3)), jax.random.key(0), temperature=1, top_p=1).shape == (2,)


def test_padding_slots_may_hold_any_id(tiny):
    """Ids under attention_mask 0 never reach the embedding: -1 padding decodes as 0 padding does (a NaN
    embedding row would otherwise spread through attention); NumPy integer counts and lists are taken."""
    ids = np.asarray([[0, 0, 5, 9, 3], [7, 1, 5, 9, 3]], np.int32)
    mask = np.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    expected = generate(tiny, jnp.asarray(ids), 4, attention_mask=jnp.asarray(mask))
    padded = np.where(mask == 1, ids, -1)
    out = _unchecked(generate)(tiny, padded.tolist(), np.int64(4), attention_mask=mask, top_k=np.int64(1))
    np.testing.assert_array_equal(np.asarray(out)[:, 5:], np.asarray(expected)[:, 5:])
    np.testing.assert_array_equal(np.asarray(out)[:, :5], padded)


def test_mask_values_and_scalar_arguments_are_normalised(tiny):
    """Any non-zero mask value marks a real token (a mask of 2s hid the prompt: every row decoded alike); a list
    mask, a NumPy `top_p` (it reached the compiled call as a tracer) and `eos_token_id` under the caller's jit
    (it was read back from a tracer) all work."""
    ids = np.asarray([[0, 0, 5, 9, 3], [7, 1, 5, 9, 3]], np.int32)
    mask = np.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    expected = np.asarray(generate(tiny, jnp.asarray(ids), 4, attention_mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(np.asarray(generate(tiny, jnp.asarray(ids), 4, attention_mask=jnp.asarray(2 * mask))),
                                  expected)
    np.testing.assert_array_equal(np.asarray(_unchecked(generate)(tiny, ids, 4, attention_mask=mask.tolist())),
                                  expected)
    key = jax.random.key(3)
    sampled = generate(tiny, jnp.asarray(ids), 4, 1.0, key, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(_unchecked(generate)(tiny, jnp.asarray(ids), 4, 1.0, key,
                                                                  top_p=np.float64(0.9))), np.asarray(sampled))
    eos = int(expected[0, 6])
    eager = generate(tiny, jnp.asarray(ids), 4, eos_token_id=eos)
    jitted = eqx.filter_jit(lambda m, i: generate(m, i, 4, eos_token_id=eos))(tiny, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


def test_bad_input_raises_under_the_type_hook(tiny):
    """With the jaxtyping hook active, wrongly typed or shaped arrays still fail loudly (a ValueError from
    us or the hook's TypeCheckError), never silently decode."""
    from jaxtyping import TypeCheckError

    with pytest.raises((ValueError, TypeCheckError)):
        generate(tiny, jnp.zeros((2, 5), jnp.float32), 3)
    with pytest.raises((ValueError, TypeCheckError)):
        generate(tiny, jnp.zeros((2, 5), jnp.int32), 3, attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, jnp.zeros((2, 5), jnp.int32), 0)


def test_model_without_generation_state_is_a_clear_error(tiny):
    """A module without a cache (the Omni vision encoder) and a causal LM given inputs it has no use for:
    ValueErrors naming the problem, not an AttributeError or a TypeError from deep inside (shapes only: the
    default encoder config allocates nothing)."""
    encoder = eqx.filter_eval_shape(Qwen3OmniMoeVisionEncoder, em.Qwen3OmniThinkerConfig().vision_config,
                                    key=jax.random.key(0))
    with pytest.raises(ValueError, match="Qwen3OmniMoeVisionEncoder has none"):
        generate(encoder, jnp.zeros((1, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM takes no prompt inputs .*got pixel_values"):
        generate(tiny, jnp.zeros((1, 4), jnp.int32), 2, pixel_values=jnp.zeros((4, 8)))
