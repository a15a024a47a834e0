"""`eqx_models.partitioning` on 8 simulated CPU devices (tests/conftest.py sets
`--xla_force_host_platform_device_count=8`).

- Dense, MoE and Qwen3-Next models on meshes pure data, fsdp, fsdp x tensor, fsdp x context (sequence split,
  attention through GSPMD), data x expert (x tensor): sharded logits, loss and every gradient equal the
  unsharded run (float32, 1e-5 relative per leaf; the only difference is the order of summation across
  devices); parameters are really split (specs asserted leaf by leaf against the rules, and against
  hand-written expectations for the characteristic leaves); gradients come out sharded like the parameters;
  expert-parallel meshes compile to an all-to-all; a full AdamW training step runs sharded and keeps every
  sharding; greedy `generate` on a sharded model gives the unsharded tokens (also on a one-device mesh).
- `shard_batch` across two CPU processes (gloo) assembles the global batch, or refuses rows that do not split.
- The expert-parallel MoE layer alone (both compute paths, expert x tensor split) equals the plain layer in
  output, router statistics and gradients.
- Mesh construction and rule resolution (fallbacks, stacked axes, errors) on abstract meshes; the Qwen3-0.6B
  table printed by `eqx-models partition` matches tests/data/qwen3_0.6b_sharding.txt; the rules
  leave at most 0.1% of every preset model (Qwen3, Qwen3-MoE, Qwen3-Next, Qwen3-Omni thinker with its
  encoders) replicated.
- No module under layers/ or models/ knows about sharding; examples/train_sharded.py runs.
"""

import ast
import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

import eqx_models as em
from eqx_models import cli, partitioning
from eqx_models.layers.moe import RoutedMoE
from eqx_models.training import lm_loss, make_train_step
from tests.reference import assert_close

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "qwen3_0.6b_sharding.txt"
GOLDEN_ARGS = ["--model", "qwen3-0.6b", "--mesh", "data=2,fsdp=2,tensor=2"]
VOCAB, BATCH, SEQ = 64, 8, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
CONFIGS = {
    "dense": em.Qwen3Config(**COMMON, tie_word_embeddings=True),
    "moe": em.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                             norm_topk_prob=True, router_aux_loss_coef=0.1),
    # the fast chunked gated delta rule, chunk 8 so the 12-token rows cross a chunk boundary
    "next": em.Qwen3NextConfig(
        **dict(COMMON, head_dim=16), layer_types=("linear_attention", "full_attention"),
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        router_aux_loss_coef=0.1, gated_delta_impl="chunk", gated_delta_chunk_size=8,
    ),
}
MODEL_CLASSES = {"dense": em.Qwen3ForCausalLM, "moe": em.Qwen3MoeForCausalLM, "next": em.Qwen3NextForCausalLM}

QUERY = "transformer/blocks/0/attention/self_attention/query/kernel"
KEY = "transformer/blocks/0/attention/self_attention/key/kernel"
EMBED = "transformer/embed/embedding"
NEXT_LAYER = "transformer/blocks/0/layers"
# (model, mesh axes, hand-written specs of characteristic leaves, whether a training step runs)
CASES = {
    "dense-data8": ("dense", {"data": 8}, {QUERY: P(None, None, None, None), EMBED: P(None, None)}, False),
    "dense-fsdp2-tensor4": ("dense", {"fsdp": 2, "tensor": 4}, {
        QUERY: P(None, "fsdp", "tensor", None),
        KEY: P(None, "fsdp", None, None),  # 2 kv heads do not split 4 ways: replicated over tensor
        EMBED: P("tensor", "fsdp"),
        "transformer/blocks/0/mlp/wi/kernel": P(None, "fsdp", None, "tensor"),
        "transformer/blocks/0/mlp/wo/kernel": P(None, "tensor", "fsdp"),
    }, True),
    "dense-fsdp2-context4": ("dense", {"fsdp": 2, "context": 4}, {
        QUERY: P(None, ("fsdp", "context"), None, None),  # sequence split over context; FSDP over both
        EMBED: P(None, ("fsdp", "context")),
    }, False),
    "moe-fsdp8": ("moe", {"fsdp": 8}, {
        "transformer/blocks/0/moe_block/wi": P(None, None, "fsdp", None, None),
        "transformer/lm_head/kernel": P("fsdp", None),
    }, False),
    "moe-data2-expert4": ("moe", {"data": 2, "expert": 4}, {
        "transformer/blocks/0/moe_block/wi": P(None, "expert", None, None, None),
        "transformer/blocks/0/moe_block/wo": P(None, "expert", None, None),
        QUERY: P(None, "expert", None, None),  # the expert axis is FSDP for everything but the experts
        "transformer/blocks/0/moe_block/gate/kernel": P(None, "expert", None),
    }, True),
    "next-data2-expert2-tensor2": ("next", {"data": 2, "expert": 2, "tensor": 2}, {
        f"{NEXT_LAYER}/0/mlp/experts/wi": P(None, "expert", None, None, "tensor"),
        f"{NEXT_LAYER}/0/mlp/shared_expert/wi/kernel": P(None, "expert", None, "tensor"),
        f"{NEXT_LAYER}/0/mixer/in_proj_qkvz/kernel": P(None, "expert", "tensor", None),
        f"{NEXT_LAYER}/0/mixer/out_proj/kernel": P(None, "tensor", None, "expert"),
        f"{NEXT_LAYER}/1/mixer/attention/query/kernel": P(None, "expert", "tensor", None),
        f"{NEXT_LAYER}/0/mixer/conv/weight": P(None, None, None),
    }, True),
}


def _random_model(kind: str, seed: int = 0):
    """The model with NumPy-random parameters (norm scales 1 + N(0, 0.1^2), every other weight N(0, 0.15^2)),
    built from `filter_eval_shape`: the real initialiser compiles for seconds even at this size."""
    skeleton = eqx.filter_eval_shape(MODEL_CLASSES[kind], CONFIGS[kind], key=jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        offset = 1.0 if partitioning.path_str(path).endswith("scale") and kind != "next" else 0.0
        scale = 0.1 if partitioning.path_str(path).endswith("scale") else 0.15
        return jnp.asarray(offset + scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, skeleton)


def _batch(seed: int = 1) -> dict:
    """8 rows of 12 tokens: full rows, left and right padding, packed documents."""
    rng = np.random.default_rng(seed)
    seg = np.ones((BATCH, SEQ), np.int32)
    seg[1, :4] = 0
    seg[2, 5:9], seg[2, 9:] = 2, 0
    seg[5, 3:], seg[6, 7:] = 2, 3
    seg[7, :] = 0
    seg[7, 2:6] = 1
    ids = rng.integers(0, VOCAB, seg.shape).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg)}


def _run(model, batch, mesh=None):
    """`(loss, logits, grads, compiled HLO text)`: the loss and gradients of `lm_loss` and the forward logits,
    plain or (with `mesh`) through `sharded_loss` / `constrain`, in one compiled program."""
    params, static = eqx.partition(model, eqx.is_array)
    loss_fn = lm_loss if mesh is None else partitioning.sharded_loss(mesh)

    def run(params, batch):
        m = eqx.combine(params, static)
        (loss, _), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(m, batch)
        forward = m if mesh is None else partitioning.constrain(m, mesh)
        return loss, forward(batch["input_ids"], segment_ids=batch["segment_ids"]), grads

    compiled = jax.jit(run).lower(params, batch).compile()
    return *compiled(params, batch), compiled.as_text()


@pytest.fixture(scope="module")
def models():
    return {kind: _random_model(kind) for kind in CONFIGS}


@pytest.fixture(scope="module")
def references(models):
    """Unsharded results per model kind, computed on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _run(models[kind], _batch())[:3]
        return cache[kind]

    return get


def _leaves(tree):
    return [(partitioning.path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _check_placement(model, mesh, expected):
    """Every leaf carries the spec its rule gives, the hand-written expectations hold, and (off pure data
    parallelism) at least 90% of the parameters are split."""
    leaves = dict(_leaves(model))
    for path, spec in expected.items():
        assert leaves[path].sharding.spec == spec, f"{path}: {leaves[path].sharding.spec} != {spec}"
    split = 0
    specs = jax.tree.leaves(partitioning.partition_specs(model, mesh))
    for (path, leaf), spec in zip(leaves.items(), specs, strict=True):
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == spec, path
        local = leaf.sharding.shard_shape(leaf.shape)
        assert local == leaf.addressable_shards[0].data.shape
        split += leaf.size if local != leaf.shape else 0
    total = sum(leaf.size for leaf in leaves.values())
    print(f"{split / total:.1%} of parameters split")
    if any(size > 1 for name, size in mesh.shape.items() if name != "data"):
        assert split >= 0.9 * total


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_equals_unsharded(case, models, references):
    kind, axes, expected, _ = CASES[case]
    mesh = partitioning.make_mesh(axes)
    sharded = partitioning.shard(models[kind], mesh)
    _check_placement(sharded, mesh, expected)
    batch = partitioning.shard_batch(_batch(), mesh)
    assert batch["input_ids"].sharding.spec == partitioning.batch_spec((BATCH, SEQ), mesh)
    assert batch["input_ids"].addressable_shards[0].data.shape[0] == BATCH // math.prod(
        size for name, size in mesh.shape.items() if name in ("data", "fsdp", "expert"))

    loss, logits, grads, hlo = _run(sharded, batch, mesh)
    ref_loss, ref_logits, ref_grads = references(kind)
    assert_close(loss, ref_loss, 1e-6, f"{case} loss")
    assert_close(logits, ref_logits, 1e-5, f"{case} logits")
    param_shardings = dict(_leaves(sharded))
    for (path, g), (_, ref) in zip(_leaves(grads), _leaves(ref_grads), strict=True):
        assert_close(g, ref, 1e-5, f"{case} grad {path}")
        assert g.sharding.is_equivalent_to(param_shardings[path].sharding, g.ndim), f"{path}: {g.sharding}"
    if axes.get("expert", 1) > 1:
        assert "all-to-all" in hlo, "expert-parallel MoE did not compile to an all-to-all"


def _standard_promotion(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """`opt` traced under standard dtype promotion: optax's Adam bias correction computes `float ** int32`,
    which the suite's strict promotion rejects. The model stays strict."""

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return opt.update(updates, state, params)

    return optax.GradientTransformation(opt.init, update)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c, (*_, train) in CASES.items() if train])
def test_sharded_training_step(case, models, references):
    """Two AdamW steps: optimizer moments are placed like their parameters by the same rules (matched by path
    suffix), the first step's loss is the unsharded loss, and every sharding survives the steps."""
    kind, axes, _, _ = CASES[case]
    mesh = partitioning.make_mesh(axes)
    model = partitioning.shard(models[kind], mesh)
    optimizer = _standard_promotion(optax.adamw(1e-3))
    opt_state = partitioning.shard(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)
    params = dict(_leaves(model))
    for path, leaf in _leaves(opt_state):
        suffix = next((p for p in params if path.endswith("/" + p)), None)
        if suffix is not None:
            assert leaf.sharding.is_equivalent_to(params[suffix].sharding, leaf.ndim), path
        else:
            assert leaf.sharding.is_fully_replicated, path
    shardings = [(p, leaf.sharding) for p, leaf in _leaves((model, opt_state))]
    step = make_train_step(optimizer, loss_fn=partitioning.sharded_loss(mesh))
    batch = partitioning.shard_batch(_batch(), mesh)
    losses = []
    for _ in range(2):
        model, opt_state, metrics = step(model, opt_state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert_close(losses[0], references(kind)[0], 1e-6, f"{case} first-step loss")
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses
    for (path, before), (_, leaf) in zip(shardings, _leaves((model, opt_state)), strict=True):
        assert leaf.sharding.is_equivalent_to(before, leaf.ndim), f"{path}: {before} -> {leaf.sharding}"


def test_sharded_step_without_sharded_loss_compiles_once():
    """A sharded model trained with the plain loss (no `sharded_loss`): XLA returned some leaves placed
    differently (norm scales and their Adam moments split over fsdp), so the second step compiled the whole step
    again; the step now returns every leaf as it came, and three steps trace the loss once."""
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = partitioning.shard(_random_model("dense", seed=2), mesh)
    optimizer = _standard_promotion(optax.adamw(1e-3))
    opt_state = partitioning.shard(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh, params=model)
    shardings = [(p, leaf.sharding) for p, leaf in _leaves((model, opt_state))]
    traces = []

    def loss(model, batch, **kwargs):
        traces.append(1)
        return lm_loss(model, batch, **kwargs)

    step = make_train_step(optimizer, loss_fn=loss)
    for i in range(3):
        model, opt_state, _ = step(model, opt_state, partitioning.shard_batch(_batch(), mesh), jax.random.key(i))
    assert len(traces) == 1
    for (path, before), (_, leaf) in zip(shardings, _leaves((model, opt_state)), strict=True):
        assert leaf.sharding.is_equivalent_to(before, leaf.ndim), f"{path}: {before} -> {leaf.sharding}"


@pytest.mark.slow
def test_adafactor_state_placed_with_params():
    """Adafactor's factored moments (the squared gradient's row and column means) are shaped unlike their
    parameters: `shard` without `params` refuses the ones their rule cannot fit, naming `params=`; with it,
    moments shaped like their parameter are placed like it, factored ones split like the dimensions they keep,
    and `(1,)` placeholders replicated. A sharded step then gives the unsharded loss and parameters (but where
    a gradient's sign is decided by rounding: Adafactor's first update is about sign(g)), and returns every
    leaf as it was placed (so the next step does not compile again)."""
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # factored: the embedding and MLP kernels; not: attention kernels (second-largest dimension 8)
    optimizer = _standard_promotion(optax.adafactor(1e-2, min_dim_size_to_factor=16))
    model = partitioning.shard(_random_model("dense", seed=4), mesh)
    params = eqx.filter(model, eqx.is_inexact_array)
    with pytest.raises(ValueError, match=r"0/v_row/transformer/embed/embedding.*params=model"):
        partitioning.shard(optimizer.init(params), mesh)
    opt_state = partitioning.shard(optimizer.init(params), mesh, params=model)
    placed = dict(_leaves(model))
    shaped_like, factored = 0, 0
    for path, leaf in _leaves(opt_state):
        param = next((placed[p] for p in placed if path.endswith("/" + p)), None)
        if param is not None and param.shape == leaf.shape:
            assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), path
            shaped_like += not param.sharding.is_fully_replicated
        elif leaf.size > 1:
            assert param is not None and leaf.ndim == param.ndim - 1, path
            factored += not leaf.sharding.is_fully_replicated
        else:
            assert leaf.sharding.is_fully_replicated, path
    assert shaped_like >= 4 and factored >= 5, (shaped_like, factored)  # q, k, v, o; embedding, wi, wo
    specs = partitioning.partition_specs(jax.eval_shape(optimizer.init, params), mesh, params=model)
    for (path, spec), (_, leaf) in zip(_leaves(specs), _leaves(opt_state), strict=True):
        assert NamedSharding(mesh, spec).is_equivalent_to(leaf.sharding, leaf.ndim), path
    shardings = [(p, leaf.sharding) for p, leaf in _leaves((model, opt_state))]

    plain = _random_model("dense", seed=4)
    plain, _, ref = make_train_step(optimizer)(plain, optimizer.init(eqx.filter(plain, eqx.is_inexact_array)),
                                               _batch(), jax.random.key(0))
    step = make_train_step(optimizer, loss_fn=partitioning.sharded_loss(mesh))
    model, opt_state, metrics = step(model, opt_state, partitioning.shard_batch(_batch(), mesh), jax.random.key(0))
    assert_close(metrics["loss"], ref["loss"], 1e-6, "adafactor sharded loss")
    start = _random_model("dense", seed=4)
    for (path, a), (_, b), (_, a0) in zip(_leaves(model), _leaves(plain), _leaves(start), strict=True):
        a, b, update = np.asarray(a), np.asarray(b), np.abs(np.asarray(b) - np.asarray(a0)).max()
        assert np.mean(np.abs(a - b) > 1e-4 * update + 1e-7) < 1e-3, path
    for (path, before), (_, leaf) in zip(shardings, _leaves((model, opt_state)), strict=True):
        assert leaf.sharding.is_equivalent_to(before, leaf.ndim), f"{path}: {before} -> {leaf.sharding}"


def test_adafactor_statistics_of_a_square_parameter_keep_optax_s_dimension():
    """A square parameter's row and column statistics have the same shape, so the shape cannot say which
    dimension each keeps. Which one optax keeps is read from the values (a gradient that varies along rows
    only), and each statistic must be split like that dimension of the parameter."""
    mesh = partitioning.make_mesh({"fsdp": 2, "tensor": 4})
    cfg = em.Qwen3Config(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=16)
    params = eqx.filter(em.Qwen3ForCausalLM(cfg, key=jax.random.key(0)), eqx.is_inexact_array)
    full = partitioning.partition_specs(params, mesh).transformer.embed.embedding
    assert len(set(full)) == 2, full
    optimizer = optax.adafactor(1e-3)
    grads = jax.tree.map(jnp.zeros_like, params)
    grads = eqx.tree_at(lambda g: g.transformer.embed.embedding, grads,
                        jnp.broadcast_to(jnp.arange(128.0)[:, None], (128, 128)))
    with jax.numpy_dtype_promotion("standard"):
        _, state = optimizer.update(grads, optimizer.init(params), params)
    specs = dict(_leaves(partitioning.partition_specs(state, mesh, params=params)))
    statistics = [(path, leaf) for path, leaf in _leaves(state) if path.endswith("embed/embedding") and leaf.size > 1]
    assert len(statistics) == 2
    for path, leaf in statistics:
        kept = 0 if np.ptp(np.asarray(leaf)) > 0 else 1  # varies along the rows: the row dimension was kept
        assert specs[path] == P(full[kept]), (path, specs[path], full)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_generate_on_a_sharded_model(kind):
    """`generate` on a model placed by `shard` (data x fsdp x tensor) gives the unsharded greedy tokens (a
    left-padded batch of 4; the KV cache and Gated DeltaNet state are laid out by GSPMD). A model of its own:
    the training-step test donates buffers that `shard` may share with the `models` fixture."""
    model = _random_model(kind, seed=2)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (4, 7)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    ref = np.asarray(em.generate(model, ids, 10, attention_mask=mask))
    assert len(set(ref[:, 7:].ravel().tolist())) > 5, "degenerate greedy output: the test would be weak"
    out = em.generate(partitioning.shard(model, mesh), ids, 10, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(out), ref)
    one = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])  # a one-CPU host: layers as views
    out = em.generate(partitioning.shard(model, one), ids, 10, attention_mask=mask, unroll_layers=True)
    np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("impl", ["sorted", "dense"])
def test_expert_parallel_moe_layer(impl, getkey):
    """`expert_parallel` on a data x expert x tensor mesh (8 experts, 2 per device, expert width split in two)
    equals the plain layer: outputs and router statistics 1e-6, gradients of x and of every weight 1e-5."""
    mesh = partitioning.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    moe = RoutedMoE(16, 12, 8, 2, norm_topk_prob=True, impl=impl, key=getkey())
    moe = eqx.tree_at(lambda m: m.gate.kernel, moe, moe.gate.kernel * 5.0)
    x = jax.random.normal(getkey(), (4, 6, 16))
    mask = jnp.arange(6)[None, :] < jnp.array([6, 3, 5, 0])[:, None]
    weights = jax.random.normal(getkey(), x.shape)

    def objective(moe, x, forward):
        y, stats = forward(moe, x)
        return jnp.sum(y * weights) + jnp.sum(stats.expert_counts * stats.expert_probs), (y, stats)

    plain = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, x: objective(m, x, lambda m, x: m(x, mask)),
                                                     has_aux=True))
    parallel = eqx.filter_jit(eqx.filter_value_and_grad(
        lambda m, x: objective(m, x, lambda m, x: partitioning.expert_parallel(m, x, mask, mesh)),
        has_aux=True))
    (_, (y_ref, stats_ref)), g_ref = plain(moe, x)
    args = (partitioning.shard(moe, mesh), partitioning.shard_batch(x, mesh))
    compiled = parallel.lower(*args).compile()
    (_, (y, stats)), g = compiled(*args)
    assert compiled.compiled.as_text().count("all-to-all") >= 4  # tokens out and back, forward and backward
    assert_close(y, y_ref, 1e-6, f"{impl} expert-parallel output")
    for name, a, b in zip(stats._fields, stats, stats_ref):
        assert_close(a, b, 1e-6, f"{impl} router {name}")
    for (path, a), (_, b) in zip(_leaves(g), _leaves(g_ref), strict=True):
        assert_close(a, b, 1e-5, f"{impl} grad {path}")
    for axes in ({"expert": 4, "context": 2}, {"data": 8}):  # tokens as [tokens, embed] and one [embed] token
        flat = partitioning.make_mesh(axes)
        for tokens, token_mask in ((x.reshape(-1, 16), mask.reshape(-1)), (x[0, 0], mask[0, 0])):
            y = eqx.filter_jit(lambda m, x, k: partitioning.expert_parallel(m, x, k, flat)[0])(moe, tokens, token_mask)
            assert_close(y, moe(tokens, token_mask)[0], 1e-6, f"{impl} expert-parallel on {tokens.shape} over {axes}")
    data_only = partitioning.Rules(params=((".*", ()),), axes={"batch": ("data",), "length": ()})
    data_mesh = partitioning.make_mesh({"data": 2}, devices=jax.devices()[:2])
    y = eqx.filter_jit(lambda m, x: partitioning.expert_parallel(m, x, mask, data_mesh, data_only))(moe, x)[0]
    assert_close(y, y_ref, 1e-6, f"{impl} with rules that map no experts or mlp dimension")


_SHARD_BATCH_PROCESS = """
import sys
import numpy as np, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from eqx_models import partitioning
mesh = partitioning.make_mesh({"data": -1})
rows = int(sys.argv[3])
local = np.arange(rows * 4).reshape(rows, 4) + 1000 * jax.process_index()
try:
    batch = partitioning.shard_batch({"x": local}, mesh)["x"]
except ValueError as e:
    print("error:", e)
else:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    print("shape", batch.shape, "sum", int(jax.jit(lambda x: x[:, 0].sum(), out_shardings=replicated)(batch)))
"""


@pytest.mark.slow
def test_shard_batch_assembles_the_global_batch_across_processes(tmp_path):
    """Two CPU processes x 2 devices: 2 rows each make a global [4, 4] batch; 3 rows each (6 do not split over
    data=4) are refused, not assembled into a [3, 4] array whose 'replicas' differ per process."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    script = tmp_path / "process.py"
    script.write_text(_SHARD_BATCH_PROCESS)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    for rows, expected in ((2, "shape (4, 4) sum 2008"), (3, "do not split over the batch axes")):
        runs = [subprocess.Popen([sys.executable, str(script), address, str(i), str(rows)], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
        outs = [run.communicate(timeout=300) for run in runs]
        for run, (out, err) in zip(runs, outs, strict=True):
            assert run.returncode == 0 and expected in out, (out, err[-2000:])


# ---------------------------------------------------------------------------------------------- meshes, rules


def test_make_mesh():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
    mesh = partitioning.make_mesh({"fsdp": -1, "data": 2})
    assert mesh.axis_names == partitioning.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    assert dict(partitioning.make_mesh({"tensor": 8}).shape)["tensor"] == 8
    assert partitioning.make_mesh({"data": 2}, devices=jax.devices()[:2]).size == 2
    for axes, message in [
        ({"data": 3}, "multiply to 3, with 8 devices"),
        ({"data": 3, "fsdp": -1}, "not divisible by 3"),
        ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
        ({"model": 2, "data": 4}, "unknown mesh axes ['model']"),
        ({"data": 0}, "positive ints or -1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            partitioning.make_mesh(axes)
    assert dict(partitioning.make_mesh({"data": np.int64(8)}).shape)["data"] == 8
    with pytest.raises(ValueError, match="devices must be distinct"):
        partitioning.make_mesh({"data": 2}, devices=[jax.devices()[0]] * 2)
    assert partitioning.parse_mesh("data=2, fsdp=-1") == {"data": 2, "fsdp": -1}
    with pytest.raises(ValueError, match="name=size"):
        partitioning.parse_mesh("data:2")
    with pytest.raises(ValueError, match="mesh axis 'data' is given twice"):
        partitioning.parse_mesh("data=2,data=4")


def _abstract(**axes):
    return AbstractMesh(tuple(axes.get(n, 1) for n in partitioning.MESH_AXES), partitioning.MESH_AXES)


def test_rule_resolution_and_fallbacks():
    """Axes are taken in order while the size stays divisible; taken axes are skipped; leading (stacked) axes
    stay unsharded; size-1 and absent axes never appear."""
    spec = partitioning.spec_for
    mesh = _abstract(fsdp=2, expert=4, tensor=4)
    assert spec(("embed", "heads", "head_dim"), (28, 1024, 16, 128), mesh) == P(
        None, ("fsdp", "expert"), "tensor", None)
    assert spec(("embed", "kv_heads", "head_dim"), (12, 2, 8), mesh) == P("fsdp", None, None)
    assert spec(("embed",), (6,), _abstract(fsdp=4, expert=2)) == P("expert")
    assert spec(("experts", "embed", None, "mlp"), (8, 32, 2, 16), mesh) == P(
        "expert", "fsdp", None, "tensor")
    assert spec(("vocab", "embed"), (63, 32), mesh) == P(None, ("fsdp", "expert"))
    assert spec(("batch", "length"), (8, 12), _abstract(data=2, fsdp=2, context=2)) == P(
        ("data", "fsdp"), "context")
    custom = partitioning.Rules(axes={**partitioning.AXIS_RULES, "embed": ("tensor", "fsdp")})
    assert spec(("embed",), (32,), mesh, custom) == P(("tensor", "fsdp"))
    with pytest.raises(ValueError, match="need 3 or more dimensions"):
        spec(("embed", "heads", "head_dim"), (4, 4), mesh)
    with pytest.raises(ValueError, match="names \\['width'\\], unmapped in Rules.axes"):
        partitioning.Rules(params=(("wi/kernel", ("embed", None, "width")),))
    with pytest.raises(ValueError, match="is not a regex"):
        partitioning.Rules(params=(("wi/(kernel", ()),))
    with pytest.raises(ValueError, match="must be a tuple of mesh axes, got 'fsdp'"):
        partitioning.Rules(axes={**partitioning.AXIS_RULES, "embed": "fsdp"})
    with pytest.raises(ValueError, match="must map 'batch'"):
        partitioning.Rules(params=(), axes={"embed": ("fsdp",), "length": ()})
    # our own checks, which users meet (the suite's type-check hook would catch these first)
    unchecked_init = inspect.unwrap(partitioning.Rules.__init__)
    for params, message in [
        ((("mlp_0/bias", ("mlp")),), re.escape("a single name needs a comma: ('mlp',)")),
        ((("query/kernel",),), "entries are \\(pattern, names\\) pairs"),
        ({"query/kernel": ("embed", "heads", "head_dim")}, "must be a sequence of \\(pattern, names\\) pairs"),
    ]:
        with pytest.raises(ValueError, match=message):
            unchecked_init(object.__new__(partitioning.Rules), params=params)


def test_meshes_and_rules_that_would_replicate_everything_are_errors():
    """A mesh axis that no rule uses (a mesh not made by `make_mesh`) and a rule naming an axis that exists
    nowhere (a typo) would leave the arrays replicated along it without a word."""
    foreign = AbstractMesh((2, 4), ("dp", "tp"))
    with pytest.raises(ValueError, match="mesh axes \\['dp', 'tp'\\] are used by no sharding rule"):
        partitioning.shard({"query": {"kernel": jnp.zeros((8, 4, 2))}}, jax.make_mesh((2, 4), ("dp", "tp")))
    with pytest.raises(ValueError, match="are used by no sharding rule"):
        partitioning.batch_spec((8, 12), foreign)
    typo = partitioning.Rules(axes={**partitioning.AXIS_RULES, "embed": ("fdsp",)})
    with pytest.raises(ValueError, match="name mesh axes \\['fdsp'\\], which are neither in the mesh"):
        partitioning.spec_for(("embed",), (8,), _abstract(fsdp=2), typo)
    mapped = partitioning.Rules(axes={**partitioning.AXIS_RULES, "batch": ("dp",), "mlp": ("tp",)})
    assert partitioning.spec_for(("batch", None, "mlp"), (8, 3, 8), foreign, mapped) == P("dp", None, "tp")


def test_constrain_runs_an_unrolled_model():
    """`constrain` wraps each layer of an unrolled model (the layout `generate` decodes with) and computes the
    plain model's logits."""
    model = _random_model("dense")
    unrolled = eqx.tree_at(lambda m: m.transformer, model, model.transformer.unroll())
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ids = _batch()["input_ids"]
    sharded = partitioning.shard(unrolled, mesh)
    logits = eqx.filter_jit(lambda m, x: partitioning.constrain(m, mesh)(x))(sharded, ids)
    assert_close(logits, model(ids), 1e-5, "constrained unrolled logits")


def test_rules_match_whole_trailing_components():
    rules = partitioning.DEFAULT_RULES
    assert rules.names_for("transformer/blocks/0/attention/self_attention/out/kernel")[1] == (
        "heads", "head_dim", "embed")
    assert rules.names_for("audio_tower/conv_out/kernel")[1] == (None, "embed")  # not the `out/kernel` rule
    assert rules.names_for("1/0/mu/transformer/lm_head/kernel")[1] == ("embed", "vocab")  # optimizer state
    assert rules.names_for("transformer/norm/scale") == (".*", ())
    bad = partitioning.Rules(params=(("norm/scale", ("embed", "mlp")),))
    with pytest.raises(ValueError, match="rule 'norm/scale' does not fit transformer/norm/scale"):
        partitioning.partition_specs({"transformer": {"norm": {"scale": jnp.ones(4)}}}, _abstract(fsdp=2),
                                     bad)


def test_shard_abstract_leaves_and_batch():
    """`shard` attaches shardings to `ShapeDtypeStruct`s (a restore target, nothing allocated); `shard_batch`
    falls back to fewer axes when the batch does not divide."""
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = eqx.filter_eval_shape(em.Qwen3ForCausalLM, CONFIGS["dense"], key=jax.random.key(0))
    placed = partitioning.shard(abstract, mesh)
    leaf = placed.transformer.blocks[0].attention.self_attention.query.kernel
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P(None, "fsdp", "tensor", None)
    odd = partitioning.shard_batch({"input_ids": jnp.zeros((6, 5), jnp.int32)}, mesh)["input_ids"]
    assert odd.sharding.spec == P("data", None)


@pytest.mark.parametrize("kind", ["moe", "next"])
def test_from_pretrained_onto_a_mesh(tmp_path, kind):
    """`from_pretrained(path, mesh=mesh, rules=...)` places each parameter as it is read: the leaves carry the
    rules' shardings (default rules, and rules that keep `embed` whole) and equal
    `shard(from_pretrained(path), mesh, rules)` bit for bit; `rules=` without a mesh is an error."""
    em.save_pretrained(_random_model(kind), tmp_path)
    mesh = partitioning.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    unsplit_embed = partitioning.Rules(axes={**partitioning.DEFAULT_RULES.axes, "embed": ()})
    whole = em.from_pretrained(tmp_path)
    for rules in (None, unsplit_embed):
        loaded = em.from_pretrained(tmp_path, mesh=mesh, rules=rules)
        want = partitioning.shard(whole, mesh, rules)
        for (path, leaf), (_, ref) in zip(_leaves(loaded), _leaves(want), strict=True):
            assert leaf.sharding == ref.sharding, path
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=path)
    _check_placement(em.from_pretrained(tmp_path, mesh=mesh), mesh, {})
    assert loaded.transformer.embed.embedding.sharding.spec == P("tensor", None)
    with pytest.raises(ValueError, match="pass mesh= too"):
        em.from_pretrained(tmp_path, rules=partitioning.DEFAULT_RULES)


@pytest.mark.parametrize("name", sorted(partitioning.PRESETS))
def test_presets_are_sharded(name):
    """At most 0.1% of a preset model's parameters stay replicated on an fsdp x expert x tensor mesh
    (MaxText's `assert_params_sufficiently_sharded` allows 2%): no large weight escapes the rules."""
    model = partitioning.abstract_model(name)
    mesh = _abstract(fsdp=4, expert=2, tensor=2)
    replicated, total = [], 0
    for (path, leaf), spec in zip(_leaves(model), jax.tree.leaves(partitioning.partition_specs(model, mesh)),
                                  strict=True):
        total += leaf.size
        if all(entry is None for entry in spec):
            replicated.append((leaf.size, path))
    fraction = sum(n for n, _ in replicated) / total
    print(f"{name}: {fraction:.2e} replicated; largest {max(replicated)}")
    assert fraction <= 1e-3, sorted(replicated)[-5:]


def test_sharding_table_matches_golden(capsys):
    """The printed table equals the golden file. After an intended rule change, regenerate it with
    `eqx-models partition --model qwen3-0.6b --mesh data=2,fsdp=2,tensor=2 --output
    tests/data/qwen3_0.6b_sharding.txt` and review the diff."""
    assert cli.main(["partition", *GOLDEN_ARGS]) == 0
    table = capsys.readouterr().out
    assert table == GOLDEN.read_text(), "sharding table changed; see this test's docstring to regenerate"
    rows = {line.split()[0]: line for line in table.splitlines() if not line.startswith("#")}
    assert len(rows) == 12  # embedding, 10 stacked layer leaves, final norm (tied embeddings: no lm_head)
    # Qwen3-0.6B: vocab 151936 / 2 (tensor), embed 1024 / 2 (fsdp); q heads 16 / 2; 28 layers unsplit
    assert rows[EMBED].endswith("(75968, 512)")
    assert rows[QUERY].endswith("(28, 512, 8, 128)")
    assert rows["transformer/blocks/0/mlp/wo/kernel"].endswith("(28, 1536, 512)")


def test_table_command_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["partition", "--help"])
    assert exit_info.value.code == 0 and "--mesh" in capsys.readouterr().out
    for argv, message in [(["--mesh", "model=2"], "unknown mesh axes"), (["--mesh", "fsdp=-1"], "positive"),
                          (["--model", "qwen9"], "--model must be one of")]:
        assert cli.main(["partition", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("eqx-models: error: ") and message in err


# ------------------------------------------------------------------------------------------- rule 4, example

FORBIDDEN = ("jax.sharding", "PartitionSpec", "NamedSharding", "shard_map", "with_sharding_constraint",
             "make_mesh", "Mesh(")


def test_layers_and_models_know_nothing_of_sharding():
    files = [f for d in ("layers", "models") for f in sorted((ROOT / "eqx_models" / d).rglob("*.py"))]
    assert len(files) >= 10
    for file in files:
        text = file.read_text()
        for word in FORBIDDEN:
            assert word not in text, f"{file.relative_to(ROOT)} mentions {word}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any("sharding" in n or "partitioning" in n for n in names), f"{file}: imports {names}"


@pytest.mark.slow
def test_train_sharded_example():
    """examples/train_sharded.py trains a tiny Qwen3-MoE on 8 simulated devices: the loss falls."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_sharded.py"), "--steps", "8"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 8 and losses[-1] < losses[0], result.stdout
