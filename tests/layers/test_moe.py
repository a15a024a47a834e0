"""`eqx_models.layers.moe`: parity with HF `Qwen3MoeSparseMoeBlock`, the sorted and dense paths against each
other and against a float64 NumPy GShard implementation (capacity drops), routing and aux-loss formulas,
token masks, gradients and bad-input errors."""

import inspect
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from eqx_models.layers.moe import RoutedMoE, RouterStats, load_balancing_loss, route
from tests.reference import assert_close

H, I, E, K = 32, 16, 8, 2
IMPLS = ("auto", "sorted", "grouped", "grouped_pallas", "dense")


def _weights(rng, hidden=H, mlp=I, experts=E):
    """Router (E, H) scaled so routing is decisive, and HF fused expert weights."""
    return dict(
        gate=(5.0 * rng.standard_normal((experts, hidden)) / math.sqrt(hidden)).astype(np.float32),
        gate_up=(rng.standard_normal((experts, 2 * mlp, hidden)) / math.sqrt(hidden)).astype(np.float32),
        down=(rng.standard_normal((experts, hidden, mlp)) / math.sqrt(mlp)).astype(np.float32),
    )


def _ours(w, *, top_k=K, **kwargs):
    """A `RoutedMoE` holding `w`: `wi[e, :, 0] = gate_e.T`, `wi[e, :, 1] = up_e.T`, `wo[e] = down_e.T`."""
    experts, two_mlp, hidden = w["gate_up"].shape
    mlp = two_mlp // 2
    layer = eqx.filter_eval_shape(RoutedMoE, hidden, mlp, experts, top_k, key=jax.random.key(0), **kwargs)
    gate, up = w["gate_up"][:, :mlp].transpose(0, 2, 1), w["gate_up"][:, mlp:].transpose(0, 2, 1)
    wi = np.stack([gate, up], axis=2)
    wo = w["down"].transpose(0, 2, 1)
    new = (jnp.asarray(w["gate"].T), jnp.asarray(wi), jnp.asarray(wo))
    return eqx.tree_at(lambda m: (m.gate.kernel, m.wi, m.wo), layer, new)


@eqx.filter_jit
def _apply(layer, x, mask=None):
    return layer(x, mask)


@eqx.filter_jit
@eqx.filter_value_and_grad
def _weighted_sum(layer_and_x, c):
    """`sum(layer(x) * c)` in float32 and its gradient with respect to `(layer, x)`."""
    layer, x = layer_and_x
    return jnp.sum(layer(x)[0].astype(jnp.float32) * c)


def _x(rng, shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def np_moe(w, x, *, top_k=K, norm_topk_prob=False, routing="softmax_topk", capacity_factor=None, mask=None):
    """Float64 GShard MoE: route, give each expert `ceil(T k / E * cf)` slots, fill them with (token, choice)
    pairs in token-major order, and drop (weight 0) the pairs beyond capacity. Masked tokens take no slot."""
    x = np.asarray(x, np.float64).reshape(-1, w["gate"].shape[1])
    tokens, experts = x.shape[0], w["gate"].shape[0]
    mask = np.ones(tokens, bool) if mask is None else np.asarray(mask).reshape(-1)
    logits = x @ w["gate"].astype(np.float64).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    if routing == "softmax_topk":
        weights = np.take_along_axis(probs, ids, -1)
        if norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
    else:
        top = np.take_along_axis(logits, ids, -1)
        weights = np.exp(top - top.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
    capacity = tokens
    if capacity_factor is not None:
        capacity = min(tokens, max(1, math.ceil(tokens * top_k / experts * capacity_factor)))
    filled = np.zeros(experts, int)
    kept = np.zeros(ids.shape, bool)
    for t in range(tokens):
        if not mask[t]:
            continue
        for j in range(top_k):
            e = ids[t, j]
            kept[t, j] = filled[e] < capacity
            filled[e] += 1
    mlp = w["down"].shape[2]
    y = np.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            if kept[t, j]:
                gu = w["gate_up"][ids[t, j]].astype(np.float64) @ x[t]
                h = gu[:mlp] / (1 + np.exp(-gu[:mlp])) * gu[mlp:]
                y[t] += weights[t, j] * (w["down"][ids[t, j]].astype(np.float64) @ h)
    counts = np.zeros(experts)
    np.add.at(counts, ids[mask].reshape(-1), 1.0)
    stats = dict(counts=counts, probs=probs[mask].sum(0), n=float(mask.sum()))
    return y, stats, kept


def _hf_block(w, *, norm_topk_prob, hidden_act="silu"):
    experts, two_mlp, hidden = w["gate_up"].shape
    cfg = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=two_mlp // 2, num_experts=experts, num_experts_per_tok=K,
        norm_topk_prob=norm_topk_prob, hidden_act=hidden_act, experts_implementation="eager",
    )
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(w["gate"]))
        block.experts.gate_up_proj.copy_(torch.from_numpy(w["gate_up"]))
        block.experts.down_proj.copy_(torch.from_numpy(w["down"]))
    return block


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_hf_sparse_moe_block(rng, impl, norm_topk_prob):
    """`RoutedMoE` (dropless) vs HF `Qwen3MoeSparseMoeBlock` (eager experts), float32, 1e-5 relative."""
    w = _weights(rng)
    x = _x(rng, (2, 11, H))
    with torch.no_grad():
        ref = _hf_block(w, norm_topk_prob=norm_topk_prob)(torch.tensor(np.asarray(x))).numpy()
    y, _ = _apply(_ours(w, impl=impl, norm_topk_prob=norm_topk_prob), x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert_close(y, ref, 1e-5, f"RoutedMoE[{impl}, norm_topk_prob={norm_topk_prob}] vs HF")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_non_silu_activation_matches_hf(rng, impl, act):
    """`activations=(act, "linear")` vs HF `Qwen3MoeSparseMoeBlock` with `hidden_act=act`, float32, 1e-5: the
    gated activation is the configured one on every path, not a hard-wired silu."""
    w = _weights(rng)
    x = _x(rng, (2, 11, H))
    with torch.no_grad():
        ref = _hf_block(w, norm_topk_prob=True, hidden_act=act)(torch.tensor(np.asarray(x))).numpy()
    y, _ = _apply(_ours(w, impl=impl, norm_topk_prob=True, activations=(act, "linear")), x)
    assert_close(y, ref, 1e-5, f"RoutedMoE[{impl}, {act}] vs HF")


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_paths_agree_and_match_numpy_gshard(rng, capacity_factor):
    """The three paths equal each other (1e-6) and the float64 NumPy GShard reference (1e-5), dropless and with
    a capacity that drops pairs in token-major order."""
    w = _weights(rng)
    x = _x(rng, (3, 8, H))
    ref, _, kept = np_moe(w, x, capacity_factor=capacity_factor)
    if capacity_factor is not None:
        assert 0 < kept.sum() < kept.size, "the capacity should drop some pairs and keep others"
    ys = {impl: _apply(_ours(w, impl=impl, capacity_factor=capacity_factor), x)[0] for impl in IMPLS}
    assert_close(ys["sorted"], ys["dense"], 1e-6, f"sorted vs dense (cf={capacity_factor})")
    assert_close(ys["grouped"], ys["dense"], 1e-6, f"grouped vs dense (cf={capacity_factor})")
    for impl, y in ys.items():
        assert_close(y.reshape(ref.shape), ref, 1e-5, f"{impl} vs NumPy GShard (cf={capacity_factor})")


def test_capacity_drop_order_is_token_major(rng):
    """With capacity 1 per expert (cf -> 1 slot) only the first (token, choice) pair of each expert survives;
    the output equals the NumPy reference to 1e-5 and the later tokens routed to a full expert get nothing."""
    w = _weights(rng)
    x = _x(rng, (1, 6, H))
    ref, _, kept = np_moe(w, x, capacity_factor=1e-6)
    assert kept.sum() <= E and not kept.all()
    for impl in IMPLS:
        y, _ = _apply(_ours(w, impl=impl, capacity_factor=1e-6), x)
        assert_close(y.reshape(ref.shape), ref, 1e-5, f"{impl} capacity-1 vs NumPy")


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_softmax_routing_matches_numpy(rng, impl):
    """`routing="topk_softmax"` (softmax over the chosen logits) vs the NumPy formula, 1e-5."""
    w = _weights(rng)
    x = _x(rng, (2, 7, H))
    ref, _, _ = np_moe(w, x, routing="topk_softmax")
    y, _ = _apply(_ours(w, impl=impl, routing="topk_softmax"), x)
    assert_close(y.reshape(ref.shape), ref, 1e-5, f"topk_softmax MoE[{impl}] vs NumPy")


def test_route_formulas(rng):
    """`route` weights, ids and probabilities vs NumPy (float64), 1e-6; weights sum to 1 when renormalised or
    with `topk_softmax`."""
    logits = rng.standard_normal((13, E)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, -1)[:, :K]
    top_p = np.take_along_axis(probs, ids, -1)
    top_l = np.take_along_axis(logits.astype(np.float64), ids, -1)
    expected = {
        ("softmax_topk", False): top_p,
        ("softmax_topk", True): top_p / top_p.sum(-1, keepdims=True),
        ("topk_softmax", False): np.exp(top_l) / np.exp(top_l).sum(-1, keepdims=True),
    }
    for (routing, norm), ref in expected.items():
        weights, got_ids, got_probs = route(jnp.asarray(logits), K, routing=routing, norm_topk_prob=norm)
        np.testing.assert_array_equal(np.asarray(got_ids), ids)
        assert_close(weights, ref, 1e-6, f"route {routing} norm={norm}")
        assert_close(got_probs, probs, 1e-6, "router probabilities")


def test_load_balancing_loss_matches_numpy(rng):
    """Router statistics and `load_balancing_loss` = `E * sum_e (count_e / N) (sum p_e / N)` vs NumPy,
    1e-6."""
    w = _weights(rng)
    x = _x(rng, (2, 9, H))
    _, st, _ = np_moe(w, x)
    _, stats = _apply(_ours(w), x)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), st["counts"])
    assert_close(stats.expert_probs, st["probs"], 1e-6, "expert prob sums")
    assert float(stats.num_tokens) == st["n"] == 18
    ref = E * np.sum(st["counts"] / st["n"] * st["probs"] / st["n"])
    assert_close(load_balancing_loss(stats, E), ref, 1e-6, "load balancing loss")
    doubled = RouterStats(*(2 * s for s in stats))
    assert_close(load_balancing_loss(doubled, E), ref, 1e-6, "loss of stats summed over two identical layers")
    uniform = RouterStats(jnp.full((E,), K * 4.0), jnp.full((E,), 4.0 * 1.0), jnp.asarray(4.0 * E))
    assert_close(load_balancing_loss(uniform, E), K, 1e-6, "balanced routing gives top_k")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_token_mask_excludes_tokens_from_stats_and_capacity(rng, impl, capacity_factor):
    """Masked tokens contribute nothing to the router statistics and take no expert slot: outputs at valid
    tokens equal the NumPy reference with the mask (1e-5) and do not depend on the masked tokens' values."""
    w = _weights(rng)
    x = _x(rng, (2, 8, H))
    mask = np.ones((2, 8), bool)
    mask[0, :3] = False
    mask[1, 5] = False
    ref, st, _ = np_moe(w, x, capacity_factor=capacity_factor, mask=mask)
    layer = _ours(w, impl=impl, capacity_factor=capacity_factor)
    y, stats = _apply(layer, x, jnp.asarray(mask))
    valid = mask.reshape(-1)
    assert_close(y.reshape(-1, H)[valid], ref[valid], 1e-5, f"{impl} masked MoE vs NumPy")
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), st["counts"])
    assert_close(stats.expert_probs, st["probs"], 1e-6, "masked prob sums")
    assert float(stats.num_tokens) == mask.sum()
    x2 = jnp.where(jnp.asarray(mask)[..., None], x, 10.0 * _x(rng, x.shape))
    y2, stats2 = _apply(layer, x2, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(y2).reshape(-1, H)[valid], np.asarray(y).reshape(-1, H)[valid])
    np.testing.assert_array_equal(np.asarray(stats2.expert_counts), np.asarray(stats.expert_counts))


@pytest.mark.parametrize("impl", IMPLS)
def test_token_mask_of_segment_ids_and_its_shape(rng, impl):
    """Without the type-check hook a mask of packed segment ids (1, 2, 3; 0 = padding) routes as its nonzero
    entries do (it once weighted slot positions and counts by the id, dropping tokens); a mask of another shape
    than the tokens' is refused."""
    w = _weights(rng)
    x = _x(rng, (2, 6, H))
    segments = jnp.asarray([[1, 1, 2, 2, 3, 0], [1, 2, 2, 3, 3, 3]], jnp.int32)
    layer = _ours(w, impl=impl)
    forward = inspect.unwrap(RoutedMoE.forward)
    y, stats = forward(layer, x, segments)
    y_ref, stats_ref = _apply(layer, x, segments > 0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), np.asarray(stats_ref.expert_counts))
    assert float(stats.num_tokens) == 11
    with pytest.raises(ValueError, match=r"token_mask has shape \(12,\); the tokens' is \(2, 6\)"):
        forward(layer, x, jnp.ones(12, bool))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_tokens(impl):
    """An empty batch gives an empty output and zero statistics on every path (the sorted and grouped ones once
    divided by zero shaping their buffers)."""
    layer = RoutedMoE(H, I, 4, 2, impl=impl, key=jax.random.key(0))
    y, stats = layer(jnp.zeros((1, 0, H)))
    assert y.shape == (1, 0, H)
    assert float(stats.num_tokens) == 0 and not np.asarray(stats.expert_counts).any()


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_gradients_of_all_impls_agree(rng, capacity_factor):
    """d(sum(y * c))/d(x, gate, wi, wo) of the auto, sorted and grouped paths (XLA and Pallas) agree with the
    dense path's to 1e-6 relative (per leaf)."""
    w = _weights(rng)
    x = _x(rng, (2, 6, H))
    c = _x(rng, (2, 6, H))
    grads = {impl: _weighted_sum((_ours(w, impl=impl, capacity_factor=capacity_factor), x), c)[1]
             for impl in IMPLS}
    gd, gxd = grads["dense"]
    for impl in ("auto", "sorted", "grouped", "grouped_pallas"):
        gs, gxs = grads[impl]
        assert_close(gxs, gxd, 1e-6, f"dL/dx {impl} vs dense")
        for name in ("wi", "wo"):
            assert np.isfinite(np.asarray(getattr(gs, name))).all()
            assert_close(getattr(gs, name), getattr(gd, name), 1e-6, f"dL/d{name} {impl} vs dense")
        assert_close(gs.gate.kernel, gd.gate.kernel, 1e-6, f"dL/dgate {impl} vs dense")
        assert np.abs(np.asarray(gs.gate.kernel)).max() > 0, "the router gets a gradient through the weights"


@pytest.mark.parametrize("impl", ["auto", "grouped_pallas"])
@pytest.mark.parametrize("tokens,experts,top_k", [(600, 8, 2), (1, 16, 4), (300, 16, 4)])
def test_grouped_path_many_blocks_and_empty_experts(rng, tokens, experts, top_k, impl):
    """The grouped path at sizes where blocks are larger than 8 rows, experts span several blocks and a skewed
    router leaves some experts empty, and at a single token (a decode step): == float64 NumPy GShard, 1e-5."""
    w = _weights(rng, experts=experts)
    w["gate"][: experts // 2] -= 1.0  # with inputs of mean 1, the first half of the experts gets (almost) nothing
    x = _x(rng, (1, tokens, H)) + 1.0
    ref, st, _ = np_moe(w, x, top_k=top_k)
    if tokens > 1:
        assert (st["counts"] == 0).any() and st["counts"].max() > 64, st["counts"]
    y, _ = _apply(_ours(w, top_k=top_k, impl=impl), x)
    assert_close(y.reshape(ref.shape), ref, 1e-5, f"{impl} MoE {tokens} tokens x {experts} experts top-{top_k}")


def test_auto_impl_and_expert_fn():
    """"auto" stays "auto" (decided per call) when dropless and is sorted with a capacity; a call with
    `expert_fn` gets the `[experts, capacity, embed]` buffers of the sorted path whatever the impl."""
    assert RoutedMoE(H, I, 4, 2, key=jax.random.key(0)).impl == "auto"
    assert RoutedMoE(H, I, 4, 2, capacity_factor=1.5, key=jax.random.key(0)).impl == "sorted"
    seen = []
    layer = RoutedMoE(H, I, 4, 2, key=jax.random.key(0))
    x = jnp.ones((5, H))
    y, _ = layer.forward(x, expert_fn=lambda b: seen.append(b.shape) or layer._expert_mlp(b))
    assert seen == [(4, 5, H)]
    assert_close(y, layer(x)[0], 1e-6, "expert_fn path vs auto path")


def _spy_paths(monkeypatch) -> list[str]:
    """Makes `RoutedMoE._sorted` / `_grouped` record their name each time they run (a `jax.debug.callback`, so
    inside a `lax.cond` only the branch taken records); returns the record."""
    ran = []
    for name in ("_sorted", "_grouped"):
        def spy(self, tokens, *args, _original=getattr(RoutedMoE, name), _name=name):
            jax.debug.callback(lambda: ran.append(_name))
            return _original(self, tokens, *args)

        monkeypatch.setattr(RoutedMoE, name, spy)
    return ran


@pytest.mark.parametrize("routing", ["balanced", "skewed"])
def test_auto_dropless_runs_sorted_buffers_when_loads_fit(rng, monkeypatch, routing):
    """Dropless "auto": when every expert's load fits `fast_capacity_factor` (1.5 here) x the mean load, the
    sorted path runs with buffers of that size, else the grouped path (which branch ran is recorded at run time).
    Either way the output equals float64 NumPy GShard (1e-5) and the gradients the dense path's (1e-6)."""
    tokens, experts, top_k = 256, 8, 2
    w = _weights(rng, experts=experts)
    if routing == "balanced":
        w["gate"] *= 0.02  # near-uniform router: loads close to the mean of 64
        x = _x(rng, (1, tokens, H))
    else:
        w["gate"][: experts // 2] -= 1.0  # with inputs of mean 1, half of the experts get (almost) nothing
        x = _x(rng, (1, tokens, H)) + 1.0
    ref, st, _ = np_moe(w, x, top_k=top_k)
    fits = st["counts"].max() <= math.ceil(tokens * top_k / experts * 1.5)
    assert fits == (routing == "balanced"), st["counts"]
    ran = _spy_paths(monkeypatch)
    layer = _ours(w, top_k=top_k, fast_capacity_factor=1.5)
    y, _ = eqx.filter_jit(lambda m, x: m(x))(layer, x)
    jax.effects_barrier()
    assert ran == (["_sorted"] if fits else ["_grouped"])
    assert_close(y.reshape(ref.shape), ref, 1e-5, f"auto MoE, {routing} routing, vs NumPy")
    c = _x(rng, x.shape)
    grad = jax.jit(jax.grad(lambda m, x: jnp.sum(m(x)[0] * c), argnums=(0, 1)))
    (g, gx), (gd, gxd) = grad(layer, x), grad(_ours(w, top_k=top_k, impl="dense"), x)
    assert_close(gx, gxd, 1e-6, f"dL/dx auto ({routing}) vs dense")
    for name in ("wi", "wo"):
        assert_close(getattr(g, name), getattr(gd, name), 1e-6, f"dL/d{name} auto ({routing}) vs dense")
    assert_close(g.gate.kernel, gd.gate.kernel, 1e-6, f"dL/dgate auto ({routing}) vs dense")


def test_auto_decode_step_is_grouped(rng, monkeypatch):
    """With a single token the sorted buffers would read every expert's weights where the grouped blocks read
    top_k experts', so "auto" is grouped without a run-time check: the sorted path never runs."""
    ran = _spy_paths(monkeypatch)
    w = _weights(rng, experts=16)
    layer = _ours(w, top_k=4)
    x = _x(rng, (1, 1, H))
    y, _ = eqx.filter_jit(lambda m, x: m(x))(layer, x)
    jax.effects_barrier()
    assert ran == ["_grouped"]
    assert_close(y.reshape(1, H), np_moe(w, x, top_k=4)[0], 1e-5, "auto decode step vs NumPy")


def test_bad_arguments_raise():
    """k > E, k = 0, unknown impl, unknown routing, a fast capacity below the mean load, a capacity factor that is
    not positive and finite, and no activations are ValueErrors naming the problem."""
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        RoutedMoE(H, I, 4, 5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        RoutedMoE(H, I, 4, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="impl"):
        RoutedMoE(H, I, 4, 2, impl="ragged", key=jax.random.key(0))
    with pytest.raises(ValueError, match="routing"):
        RoutedMoE(H, I, 4, 2, routing="sigmoid", key=jax.random.key(0))
    for bad in (0.9, math.nan, math.inf):
        with pytest.raises(ValueError, match="fast_capacity_factor must be finite and >= 1"):
            RoutedMoE(H, I, 4, 2, fast_capacity_factor=bad, key=jax.random.key(0))
    for bad in (0.0, -1.0, math.nan, math.inf):  # MaxText's -1 means dropless; ours is None
        with pytest.raises(ValueError, match="capacity_factor must be positive and finite, or None"):
            RoutedMoE(H, I, 4, 2, capacity_factor=bad, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least one activation"):
        RoutedMoE(H, I, 4, 2, activations=(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="routing"):
        route(jnp.zeros((3, 4)), 2, routing="sigmoid")


def test_grouped_bfloat16_matches_sorted(rng):
    """bf16 compute: the grouped path's output and weight gradients (expert blocks summed in float32) equal the
    sorted path's to bf16 rounding (2e-2 relative)."""
    w = _weights(rng)
    x = _x(rng, (2, 40, H))
    c = _x(rng, (2, 40, H))
    results = {impl: _weighted_sum((_ours(w, impl=impl, dtype=jnp.bfloat16), x), c)
               for impl in ("sorted", "grouped", "grouped_pallas")}
    ls, (gs, _) = results["sorted"]
    for impl in ("grouped", "grouped_pallas"):
        lg, (gg, _) = results[impl]
        assert_close(lg, ls, 2e-2, f"bf16 loss {impl} vs sorted")
        for name in ("wi", "wo"):
            assert getattr(gg, name).dtype == jnp.float32
            assert_close(getattr(gg, name), getattr(gs, name), 2e-2, f"bf16 dL/d{name} {impl} vs sorted")
