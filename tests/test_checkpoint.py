"""Checkpointer: bitwise round trips (model, optax state, typed PRNG key, JSON metadata), retention, async
saves, atomicity under SIGKILL, and bitwise-identical resumed training on CPU.

Building a model runs (and compiles) its random initialiser, several seconds on CPU; the tests build one real
tiny Qwen3 per module and otherwise fill `eqx.filter_eval_shape` skeletons with NumPy values, which gives the
exact pytree of a built model at no cost."""

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import eqx_models as em
from eqx_models.checkpoint import Checkpointer, Restored

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def abstract_model(**overrides):
    config = em.Qwen3Config(**{**TINY, **overrides})
    return eqx.filter_eval_shape(em.Qwen3ForCausalLM, config, key=jax.random.key(0))


def filled_model(seed, **overrides):
    """A tiny Qwen3ForCausalLM (exact structure and dtypes) with seeded NumPy normal weights."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) * 0.1).astype(leaf.dtype)

    abstract = abstract_model(**overrides)
    return jtu.tree_map(fill, abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def array_leaves(tree):
    return jtu.tree_leaves(eqx.filter(tree, eqx.is_array))


def zeros_like_tree(tree):
    return jtu.tree_map(lambda x: jnp.zeros_like(x) if eqx.is_array(x) else x, tree)


def make_optimizer():
    """AdamW behind gradient clipping, with a warmup-cosine schedule injected as a hyperparameter, so the
    state mixes arrays, counts, EmptyState and nested namedtuples.

    optax computes `float ** int32 count` (bias correction, schedules), which the suite's strict dtype
    promotion rejects: the optimizer runs under standard promotion, the model stays strict."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=10)
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
    inner = optax.chain(optax.clip_by_global_norm(1.0), adamw)

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return inner.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return optax.GradientTransformation(init, update)


OPTIMIZER = make_optimizer()


def loss_fn(model, tokens, weights):
    logits = model(tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@eqx.filter_jit
def _train_step(model, opt_state, tokens, weights):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, tokens, weights)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def train_step(*args):
    """`_train_step` on committed arrays: jit compiles separately for uncommitted (fresh) and committed
    (jit outputs, restored) arguments, several seconds each on CPU."""
    device = jax.local_devices()[0]
    return _train_step(*jtu.tree_map(lambda x: jax.device_put(x, device) if eqx.is_array(x) else x, args))


def init_opt_state(model):
    return OPTIMIZER.init(eqx.filter(model, eqx.is_array))


@pytest.fixture(scope="module")
def model():
    return em.Qwen3ForCausalLM(em.Qwen3Config(**TINY), key=jax.random.key(0))


@pytest.fixture(scope="module")
def trained(model):
    """The module's model and its AdamW state after two steps (non-zero moments, count 2)."""
    opt_state = init_opt_state(model)
    trained_model = model
    for data_key in jax.random.split(jax.random.key(1), 2):
        tokens = jax.random.randint(data_key, (2, 9), 0, TINY["vocab_size"])
        weights = jnp.ones((2, 8), jnp.float32)
        trained_model, opt_state, _ = train_step(trained_model, opt_state, tokens, weights)
    return trained_model, opt_state


def assert_bitwise_equal(a, b):
    leaves_a, treedef_a = jtu.tree_flatten(a)
    leaves_b, treedef_b = jtu.tree_flatten(b)
    assert treedef_a == treedef_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if eqx.is_array(x):
            assert eqx.is_array(y) and x.dtype == y.dtype and x.shape == y.shape
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


def test_save_restore_round_trip(tmp_path, trained):
    model, opt_state = trained
    key = jax.random.key(1234)
    metadata = {"data_position": 123, "run": {"name": "a", "tags": [1, 2]}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(7, model, opt_state, key=key, metadata=metadata)
        assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7
        restored = ckpt.restore(zeros_like_tree(model), zeros_like_tree(opt_state))
    assert isinstance(restored, Restored)
    assert_bitwise_equal(restored.model, model)
    assert_bitwise_equal(restored.opt_state, opt_state)
    assert restored.step == 7
    assert restored.metadata == metadata
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(key))
    np.testing.assert_array_equal(jax.random.normal(restored.key, (3,)), jax.random.normal(key, (3,)))

    # the restored optimizer state keeps training identically
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, TINY["vocab_size"])
    weights = jnp.ones((2, 8), jnp.float32)
    expected = train_step(model, opt_state, tokens, weights)
    assert_bitwise_equal(train_step(restored.model, restored.opt_state, tokens, weights), expected)


def test_restore_into_abstract_model_without_opt_state(tmp_path, model):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, model, optax.sgd(0.1, momentum=0.9).init(eqx.filter(model, eqx.is_array)))
        restored = ckpt.restore(abstract_model())
    assert restored.opt_state is None and restored.key is None and restored.metadata == {}
    assert_bitwise_equal(restored.model, model)


def test_has_opt_state_tells_model_only_steps_apart(tmp_path, model):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model)
        ckpt.save(2, model, optax.sgd(0.1, momentum=0.9).init(eqx.filter(model, eqx.is_array)))
        assert ckpt.has_opt_state() and ckpt.has_opt_state(step=2) and not ckpt.has_opt_state(step=1)
        with pytest.raises(ValueError, match="step 3 not found"):
            ckpt.has_opt_state(step=3)


def test_restore_lands_in_like_sharding(tmp_path, model):
    device = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    arrays, static = eqx.partition(model, eqx.is_array)
    like = eqx.combine(jtu.tree_map(lambda x: jax.device_put(jnp.zeros_like(x), sharding), arrays), static)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model)
        restored = ckpt.restore(like).model
    assert all(leaf.sharding == sharding for leaf in array_leaves(restored))
    assert_bitwise_equal(restored, model)


def test_bf16_params_stay_bf16(tmp_path):
    model = filled_model(0, param_dtype="bfloat16")
    assert {leaf.dtype for leaf in array_leaves(model)} == {jnp.dtype(jnp.bfloat16)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model)
        assert_bitwise_equal(ckpt.restore(abstract_model(param_dtype="bfloat16")).model, model)
        # the like tree's dtype wins: a bf16 checkpoint restores exactly into a float32 model
        as_f32 = ckpt.restore(abstract_model()).model
    for x, y in zip(array_leaves(as_f32), array_leaves(model), strict=True):
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.float32)))


def test_raw_uint32_key_round_trips(tmp_path, model):
    raw = jax.random.PRNGKey(5)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model, key=raw)
        key = ckpt.restore(model).key
    assert key.dtype == jnp.uint32
    np.testing.assert_array_equal(key, raw)


class Holder(eqx.Module):
    tree: dict
    name: str = eqx.field(static=True)


def test_any_pytree_with_keys_and_numpy_leaves(tmp_path):
    def holder(w, keys, host):
        return Holder({"w": w, "keys": keys, "host": host, "static": "kept from like", "nothing": None}, "h")

    rbg_keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
    saved = holder(jnp.arange(6.0).reshape(2, 3), rbg_keys, np.arange(4, dtype=np.int16))
    other_keys = jax.random.split(jax.random.key(1, impl="rbg"), 3)
    like = holder(jnp.zeros((2, 3)), other_keys, np.zeros(4, np.int16))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved, jnp.float32(0.5))
        restored = ckpt.restore(like, jnp.float32(0.0))
    assert isinstance(restored.model.tree["host"], np.ndarray)
    assert_bitwise_equal(restored.model, saved)
    assert_bitwise_equal(restored.opt_state, jnp.float32(0.5))
    threefry = holder(jnp.zeros((2, 3)), jax.random.split(jax.random.key(1), 3), np.zeros(4, np.int16))
    with pytest.raises(ValueError, match=r"PRNG key impl of \.tree\['keys'\]"):
        Checkpointer(tmp_path).restore(threefry)


def test_keeps_last_n(tmp_path, model):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, model, metadata={"step": step})
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.restore(model, step=4).metadata == {"step": 4}
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    assert Checkpointer(tmp_path).all_steps() == [4, 5]


def test_save_rejects_existing_and_older_steps(tmp_path, model):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, model)
        with pytest.raises(ValueError, match="step 5 already exists"):
            ckpt.save(5, model)
        with pytest.raises(ValueError, match="force=True"):
            ckpt.save(3, model)
        ckpt.save(3, model, force=True)
        assert ckpt.all_steps() == [3, 5]
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(6, model, metadata={"bad": object()})
        assert ckpt.all_steps() == [3, 5]


def test_async_save(tmp_path, trained):
    model, opt_state = trained
    key = jax.random.key(3)
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, model, opt_state, key=key, metadata={"data_position": 9})
    # orbax lists a step as soon as its save starts; the Checkpointer only once it is committed
    assert all((tmp_path / str(step)).is_dir() for step in ckpt.all_steps())
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    assert (tmp_path / "1" / "commit_success.txt").exists()
    ckpt.close()
    restored = Checkpointer(tmp_path).restore(model, opt_state)
    assert_bitwise_equal(restored.model, model)
    assert_bitwise_equal(restored.opt_state, opt_state)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(key))
    assert restored.metadata == {"data_position": 9}


def test_restore_right_after_an_async_save_reads_it(tmp_path, model):
    """`restore` and `has_opt_state` wait for a save still being written and read it: the step list was taken
    before waiting, so they read the previous step, or said the new one did not exist."""
    noise = np.random.default_rng(0).standard_normal(4_000_000, dtype=np.float32)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, model, {"noise": jnp.asarray(noise)})
        ckpt.wait()
        ckpt.save(2, model, {"noise": jnp.asarray(noise + 1)})
        restored = ckpt.restore(model, {"noise": jnp.zeros_like(noise)})
        assert restored.step == 2
        np.testing.assert_array_equal(np.asarray(restored.opt_state["noise"]), noise + 1)
        ckpt.save(3, model)
        assert not ckpt.has_opt_state(3)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_save_keeps_the_last_good_step_listed(tmp_path, model, async_save):
    """A save that fails (here: arrays a training step already donated) leaves the steps saved before it
    listed and restorable: a failed save used to leave the latest good step hidden as if still being written,
    so `restore` silently read an older one, or found none."""
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(1, filled_model(1))
        ckpt.save(2, model)
        ckpt.wait()
        donated = filled_model(3)
        jax.tree.leaves(donated)[0].delete()
        with pytest.raises(RuntimeError, match="deleted"):
            ckpt.save(3, donated)
            ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore(zeros_like_tree(model))
        assert restored.step == 2
        assert_bitwise_equal(restored.model, model)


_CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from eqx_models.checkpoint import Checkpointer
    from tests.test_checkpoint import filled_model, step_one_state

    directory, mode = sys.argv[1], sys.argv[2]
    ckpt = Checkpointer(directory)
    model, opt_state, key, metadata = step_one_state()
    ckpt.save(1, model, opt_state, key=key, metadata=metadata)

    def kill():
        print("killing", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "mid_write":
        # SIGKILL while the 64 MB array of step 2 is being streamed into its temporary directory
        tmp = os.path.join(directory, "2.orbax-checkpoint-tmp")
        data = os.path.join(tmp, "opt_state.orbax-checkpoint-tmp", "ocdbt.process_0", "d")
        def watch():
            while True:
                try:
                    sizes = [os.path.getsize(os.path.join(data, name)) for name in os.listdir(data)]
                except FileNotFoundError:
                    continue
                if max(sizes, default=0) >= 4 << 20:
                    kill()
        threading.Thread(target=watch, daemon=True).start()
    else:
        # SIGKILL after every array is written, just before the rename that commits step 2
        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize_or_die(self):
            if self.get_final().name == "2":
                kill()
            return await finalize(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die

    big = {"noise": np.random.default_rng(0).standard_normal(16_000_000, dtype=np.float32)}
    print("saving", flush=True)
    ckpt.save(2, filled_model(2), big, metadata={"data_position": 22})
    print("save finished", flush=True)
    """
)


def step_one_state():
    """What the crash test's child process saves as step 1 (deterministic, rebuilt by the parent)."""
    model = filled_model(1)
    opt_state = optax.adamw(1e-3).init(eqx.filter(model, eqx.is_array))
    return model, opt_state, jax.random.key(7), {"data_position": 11}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mid_write", "before_commit"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, mode):
    directory = tmp_path / "ckpt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_CHILD, str(directory), mode],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert "saving" in child.stdout and "killing" in child.stdout and "save finished" not in child.stdout

    entries = sorted(os.listdir(directory))
    assert "2" not in entries and "2.orbax-checkpoint-tmp" in entries, entries
    partial = directory / "2.orbax-checkpoint-tmp"
    if mode == "mid_write":
        data = partial / "opt_state.orbax-checkpoint-tmp" / "ocdbt.process_0" / "d"
        assert max(path.stat().st_size for path in data.iterdir()) >= 4 << 20
    else:
        assert (partial / "opt_state" / "commit_success.txt").exists()
    assert not (partial / "commit_success.txt").exists()

    ckpt = Checkpointer(directory)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    model, opt_state, key, metadata = step_one_state()
    restored = ckpt.restore(abstract_model(), jtu.tree_map(jnp.zeros_like, opt_state))
    assert_bitwise_equal(restored.model, model)
    assert_bitwise_equal(restored.opt_state, opt_state)
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(key))
    assert restored.step == 1 and restored.metadata == metadata

    # saving the interrupted step again replaces the stale temporary directory
    ckpt.save(2, model, opt_state)
    assert ckpt.all_steps() == [1, 2]
    assert "2.orbax-checkpoint-tmp" not in os.listdir(directory)
    ckpt.close()


def test_resumed_training_is_bitwise_identical(tmp_path, model):
    dataset = jax.random.randint(jax.random.key(11), (12, 9), 0, TINY["vocab_size"])
    batch_size = 2

    def run(model, opt_state, key, position, steps):
        losses = []
        for _ in range(steps):
            key, mask_key = jax.random.split(key)
            tokens = dataset[position : position + batch_size]
            weights = jax.random.bernoulli(mask_key, 0.8, (batch_size, 8)).astype(jnp.float32)
            model, opt_state, loss = train_step(model, opt_state, tokens, weights)
            losses.append(float(loss))
            position += batch_size
        return model, opt_state, key, position, losses

    opt_state = init_opt_state(model)
    key = jax.random.key(12)
    straight = run(model, opt_state, key, 0, 6)

    model_3, opt_state_3, key_3, position_3, first = run(model, opt_state, key, 0, 3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, model_3, opt_state_3, key=key_3, metadata={"data_position": position_3})
    del model_3, opt_state_3, key_3
    restored = Checkpointer(tmp_path).restore(zeros_like_tree(model), init_opt_state(model))
    assert restored.step == 3
    resumed = run(restored.model, restored.opt_state, restored.key, restored.metadata["data_position"], 3)

    assert first + resumed[4] == straight[4]
    assert len(set(straight[4])) == 6
    assert_bitwise_equal(resumed[0], straight[0])
    assert_bitwise_equal(resumed[1], straight[1])
    np.testing.assert_array_equal(jax.random.key_data(resumed[2]), jax.random.key_data(straight[2]))


def test_restore_missing_or_empty_directory(tmp_path, model):
    missing = tmp_path / "nope"
    ckpt = Checkpointer(missing)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match="nope"):
        ckpt.restore(model)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        Checkpointer(tmp_path / "empty").restore(model)


def test_restore_mismatched_model_names_leaves(tmp_path, model):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model, optax.adamw(1e-3).init(eqx.filter(model, eqx.is_array)))
        with pytest.raises(ValueError, match=r"shape of \.transformer\.embed\.embedding") as error:
            ckpt.restore(abstract_model(hidden_size=48))
        assert ".transformer.norm.scale" in str(error.value)
        with pytest.raises(ValueError, match=r"missing from checkpoint: \.transformer\.lm_head\.kernel"):
            ckpt.restore(abstract_model(tie_word_embeddings=False))
        wider = eqx.filter(abstract_model(hidden_size=48), lambda x: isinstance(x, jax.ShapeDtypeStruct))
        with pytest.raises(ValueError, match=r"opt_state: shape of \[0\]\.mu\.transformer\.embed\.embedding"):
            ckpt.restore(model, eqx.filter_eval_shape(optax.adamw(1e-3).init, wider))
    with Checkpointer(tmp_path / "model_only") as ckpt:
        ckpt.save(1, model)
        with pytest.raises(ValueError, match="no optimizer state"):
            ckpt.restore(model, optax.adamw(1e-3).init(eqx.filter(model, eqx.is_array)))


def test_restore_missing_step_lists_available(tmp_path, model):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, model)
        ckpt.save(4, model)
        with pytest.raises(ValueError, match=r"step 3 not found.*\[2, 4\]"):
            ckpt.restore(model, step=3)


def test_max_to_keep_keeps_the_highest_steps(tmp_path, model):
    """Retention is by step number: a force-saved step between kept ones evicts the lowest, and one below
    every kept step is refused (it would be deleted at once) instead of evicting a higher step."""
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(5, model)
        ckpt.save(10, model)
        with pytest.raises(ValueError, match=r"step 3 would be deleted at once.*\[5, 10\]"):
            ckpt.save(3, model, force=True)
        assert ckpt.all_steps() == [5, 10]
        ckpt.save(7, model, force=True)
        assert ckpt.all_steps() == [7, 10]
    assert sorted(os.listdir(tmp_path)) == ["10", "7"]


def test_max_to_keep_with_async_saves(tmp_path, model):
    """Asynchronous saves prune once complete: at the next save, `wait` or `close`."""
    with Checkpointer(tmp_path, max_to_keep=2, async_save=True) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, model)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_a_checkpointer_that_only_reads_deletes_nothing(tmp_path, model):
    """Opening a directory to read (restore, has_opt_state, latest_step, close) with the default max_to_keep=3
    deleted steps 1 and 2 of 5, the step asked for among them; only this object's own save prunes."""
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, model, metadata={"step": step})
    with Checkpointer(tmp_path) as reader:
        assert reader.restore(model, step=1).metadata == {"step": 1}
        assert not reader.has_opt_state(2) and reader.latest_step() == 5
    assert sorted(os.listdir(tmp_path), key=int) == ["1", "2", "3", "4", "5"]
    with Checkpointer(tmp_path) as writer:
        writer.save(6, model)
    assert sorted(os.listdir(tmp_path), key=int) == ["4", "5", "6"]


def test_steps_must_be_ints(tmp_path, model):
    """A float step was truncated (2.7 saved as step 2, step=2.9 restored step 2); NumPy ints are steps. Called
    as without the type-check hook, which refuses all but Python ints before our checks run."""
    save, restore = inspect.unwrap(Checkpointer.save), inspect.unwrap(Checkpointer.restore)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="step must be an int, got 2.7"):
            save(ckpt, 2.7, model)
        save(ckpt, np.int64(2), model)
        with pytest.raises(TypeError, match="step must be an int, got 2.9"):
            restore(ckpt, model, step=2.9)
        assert restore(ckpt, model, step=np.int32(2)).step == 2 and ckpt.all_steps() == [2]


def test_restored_key_lands_beside_the_model(tmp_path, model):
    """The key comes back replicated on the mesh of a sharded `like` model (it was committed to device 0, and a
    sharded step that reads it refused the mix of devices), or on the device of a one-device one."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_mesh = jtu.tree_map(lambda x: jax.device_put(x, replicated) if eqx.is_array(x) else x, model)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, on_mesh, key=jax.random.key(5))
        restored = ckpt.restore(on_mesh)
        assert restored.key.sharding == replicated

        @eqx.filter_jit
        def noisy(model, key):
            return model.transformer.norm.scale + jax.random.normal(key, ())

        noisy(restored.model, restored.key)
        device = jax.devices()[3]
        elsewhere = jtu.tree_map(lambda x: jax.device_put(x, device) if eqx.is_array(x) else x, model)
        assert ckpt.restore(elsewhere).key.devices() == {device}


_EXIT_CHILD = textwrap.dedent(
    """
    import sys
    from eqx_models.checkpoint import Checkpointer
    from tests.test_checkpoint import step_one_state

    model, opt_state, key, metadata = step_one_state()
    Checkpointer(sys.argv[1], async_save=True).save(1, model, opt_state, key=key, metadata=metadata)
    print("returning", flush=True)
    """
)


@pytest.mark.slow
def test_a_script_that_ends_during_an_async_save_finishes_it(tmp_path):
    """A script that returned right after an asynchronous save lost the step (only its temporary folder was left,
    with tracebacks from orbax's closed executors); the interpreter's exit now waits for the write."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run(
        [sys.executable, "-c", _EXIT_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert child.returncode == 0 and "returning" in child.stdout, child.stderr
    assert "Traceback" not in child.stderr, child.stderr
    assert sorted(os.listdir(tmp_path)) == ["1"]
    model, opt_state, key, metadata = step_one_state()
    restored = Checkpointer(tmp_path).restore(abstract_model(), jtu.tree_map(jnp.zeros_like, opt_state))
    assert_bitwise_equal(restored.model, model)
    assert_bitwise_equal(restored.opt_state, opt_state)
    assert restored.metadata == metadata


def test_corrupted_step_is_one_clear_error(tmp_path, model):
    """A damaged data file in the latest step is a one-line ValueError naming the step folder and the way
    out; the earlier step still restores."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model)
        ckpt.save(2, model)
    data = max((tmp_path / "2" / "model" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="delete it to fall back to step 1") as error:
        ckpt.restore(abstract_model())
    message = str(error.value)
    assert f"step 2 in {tmp_path / '2'} cannot be read" in message and "\n" not in message
    assert_bitwise_equal(ckpt.restore(abstract_model(), step=1).model, model)
    ckpt.close()


def test_a_corrupted_older_step_names_the_other_steps(tmp_path, model):
    """Deleting a damaged step below the latest would not make `restore` fall back to anything: the error lists
    the steps that can be restored instead."""
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, model)
    metadata = tmp_path / "2" / "metadata" / "metadata"
    metadata.write_text(metadata.read_text()[:20])
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"cannot be read \(.*\); restore another step: \[1, 3\]$"):
            ckpt.restore(abstract_model(), step=2)


def test_corrupted_metadata_is_the_same_clear_error(tmp_path, model):
    """A step whose metadata file is truncated is reported as unreadable with the way out, like damaged arrays;
    a step folder with no metadata of ours at all is reported as not written by the Checkpointer."""
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, model)
    metadata = tmp_path / "3" / "metadata" / "metadata"
    metadata.write_text(metadata.read_text()[:20])
    (tmp_path / "2" / "metadata" / "metadata").unlink()
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="delete it to fall back to step 2") as error:
        ckpt.restore(abstract_model())
    message = str(error.value)
    assert f"step 3 in {tmp_path / '3'} cannot be read (" in message and "\n" not in message
    with pytest.raises(ValueError, match="step 2 in .* was not written by eqx_models.Checkpointer"):
        ckpt.restore(abstract_model(), step=2)
    assert_bitwise_equal(ckpt.restore(abstract_model(), step=1).model, model)
    ckpt.close()


def test_a_failed_restore_drops_only_orbax_teardown_noise(tmp_path, model, monkeypatch):
    """tensorstore reads that finish after a failed restore call back into orbax's closed event loop; those
    reports ("Event loop is closed", no object) are dropped, any other unraisable exception still reaches the
    previous hook, and a successful restore leaves the hook as it was."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, model)
        ckpt.save(2, model)
        ckpt.restore(abstract_model(), step=1)
        assert sys.unraisablehook == seen.append
    data = max((tmp_path / "2" / "model" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="cannot be read"):
        ckpt.restore(abstract_model())

    def report(error, obj):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                                 err_msg=None, object=obj))

    seen.clear()
    report(RuntimeError("Event loop is closed"), None)
    report(RuntimeError("Event loop is closed"), "a finalizer")
    report(RuntimeError("something else"), None)
    assert [(str(u.exc_value), u.object) for u in seen] == [
        ("Event loop is closed", "a finalizer"), ("something else", None)]


def test_restore_loops_do_not_log_the_other_failed_reads(caplog):
    """When several reads of a damaged step fail, the first is raised and asyncio would log each other one as
    "exception was never retrieved" when collected (82 lines on CI): loops created during a restore drop those
    logs, and only those; loops created afterwards are left alone."""
    import asyncio
    import gc

    from eqx_models.checkpoint import _quiet_orbax_teardown

    def leave_unretrieved(loop):
        future = loop.create_future()
        future.set_exception(ValueError("a failed read"))
        loop.call_exception_handler({"message": "something else"})
        loop.close()
        del future
        gc.collect()

    with caplog.at_level("ERROR", logger="asyncio"):
        with pytest.raises(ValueError), _quiet_orbax_teardown():
            loop = asyncio.new_event_loop()
            raise ValueError("the first failed read")
        leave_unretrieved(loop)
        assert [r.getMessage() for r in caplog.records] == ["something else"]
        caplog.clear()
        leave_unretrieved(asyncio.new_event_loop())
        assert any("Future exception was never retrieved" in r.getMessage() for r in caplog.records)
