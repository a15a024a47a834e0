"""Training checkpoints with orbax: model, optimizer state, step, PRNG key and JSON metadata.

```python
with Checkpointer("ckpt", max_to_keep=3) as ckpt:
    ckpt.save(step, model, opt_state, key=key, metadata={"data_position": pos})
    model, opt_state, step, key, metadata = ckpt.restore(model, opt_state)  # latest step
```

Only the array leaves are written; restore rebuilds the rest from `like_model` / `like_opt_state` (which may
be abstract, e.g. from `eqx.filter_eval_shape`) and places each array with the dtype and sharding of the
corresponding `like` leaf. Each step is one orbax checkpoint directory `<directory>/<step>`, written as
`<step>.orbax-checkpoint-tmp` and renamed once complete, so a crash mid-save leaves the previous steps intact.
"""

import asyncio
import atexit
import concurrent.futures.thread  # noqa: F401 (see _finish_saves)
import contextlib
import gc
import json
import operator
import os
import sys
import threading
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "Restored"]

_FORMAT_VERSION = 1


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns; `opt_state` is None when no `like_opt_state` was given."""

    model: Any
    opt_state: Any
    step: int
    key: jax.Array | None
    metadata: dict


def _is_leaf_array(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_prng_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _prng_impl_name(leaf) -> str:
    if isinstance(leaf, jax.Array):
        return str(jax.random.key_impl(leaf))
    return leaf.dtype._impl.name  # an abstract key: jax has no public accessor for a key dtype's impl


def _path_part(entry) -> str:
    if isinstance(entry, jtu.GetAttrKey):
        return entry.name
    if isinstance(entry, jtu.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, (jtu.DictKey, jtu.FlattenedIndexKey)):
        return str(entry.key)
    return str(entry)


def _array_leaves(tree) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Array leaves of `tree` in flattening order, by `jtu.keystr` path, each with its storage names."""
    dynamic, _ = eqx.partition(tree, _is_leaf_array)
    leaves = {}
    for path, leaf in jtu.tree_flatten_with_path(dynamic)[0]:
        leaves[jtu.keystr(path)] = (tuple(_path_part(entry) for entry in path) or ("value",), leaf)
    return leaves


def _describe(leaf) -> dict:
    info = {"shape": list(leaf.shape), "dtype": str(leaf.dtype)}
    if _is_prng_key(leaf):
        info["prng_impl"] = _prng_impl_name(leaf)
        info["data_shape"] = list(jax.eval_shape(jax.random.key_data, leaf).shape)
    return info


def _nest(leaves: dict[str, tuple[tuple[str, ...], Any]]) -> dict:
    """Nested dict of storage names -> value; orbax names each array by its dot-joined path."""
    nested, seen = {}, {}
    for keystr, (parts, value) in leaves.items():
        name = ".".join(parts)
        if name in seen:
            raise ValueError(f"leaves {seen[name]} and {keystr} would both be stored as {name!r}")
        seen[name] = keystr
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"leaf {keystr} collides with another leaf in storage")
        node[parts[-1]] = value
    return nested


def _unnest(nested: dict, parts: tuple[str, ...]):
    for part in parts:
        nested = nested[part]
    return nested


def _step(step: Any) -> int:
    """A step number: an int >= 0 (NumPy and jax integer scalars too); a float is refused, not truncated."""
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


_SAVING: "set[Checkpointer]" = set()  # with a save in flight; held until it ends, even if the caller drops them


def _finish_saves() -> None:
    for checkpointer in list(_SAVING):
        checkpointer.wait()


# A script that ends during an asynchronous save would lose the step: orbax's write runs on thread pools that
# refuse new work once the interpreter starts shutting down. This hook runs at that start, before the pools'
# own (these hooks run last-registered first; the pools register theirs when concurrent.futures.thread is
# first imported, which the import here makes sure happened already).
getattr(threading, "_register_atexit", atexit.register)(_finish_saves)


def _default_sharding() -> jax.sharding.Sharding:
    """Where arrays without a sharding of their own land: the default device, like `jnp.asarray`."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _key_sharding(leaves: dict) -> jax.sharding.Sharding:
    """Where a restored PRNG key lands: replicated on the mesh of the first sharded `like` leaf (a sharded
    step takes it beside the model), else on that leaf's device, else the default device."""
    for _, leaf in leaves.values():
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return sharding
    return _default_sharding()


def _restore_target(leaf, saved: dict):
    """The abstract array orbax restores into: dtype and sharding of `leaf` (key data for PRNG keys)."""
    if isinstance(leaf, np.ndarray):
        return np.empty(leaf.shape, leaf.dtype)
    sharding = getattr(leaf, "sharding", None) or _default_sharding()
    if _is_prng_key(leaf):
        if isinstance(leaf, jax.Array):
            sharding = jax.random.key_data(leaf).sharding
        return jax.ShapeDtypeStruct(tuple(saved["data_shape"]), np.dtype(np.uint32), sharding=sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _mismatches(like: dict, saved: dict) -> list[str]:
    problems = [f"missing from checkpoint: {path}" for path in like if path not in saved]
    problems += [f"not in like tree: {path}" for path in saved if path not in like]
    for path, (_, leaf) in like.items():
        if path not in saved:
            continue
        want, have = _describe(leaf), saved[path]
        if want["shape"] != have["shape"]:
            shapes = f"checkpoint {tuple(have['shape'])}, like {tuple(want['shape'])}"
            problems.append(f"shape of {path}: {shapes}")
        if want.get("prng_impl") != have.get("prng_impl"):
            impls = f"checkpoint {have.get('prng_impl')}, like {want.get('prng_impl')}"
            problems.append(f"PRNG key impl of {path}: {impls}")
    return problems


def _rebuild(like, restored: dict):
    dynamic, static = eqx.partition(like, _is_leaf_array)
    leaves = []
    for parts, leaf in _array_leaves(like).values():
        value = _unnest(restored, parts)
        if _is_prng_key(leaf):
            value = jax.random.wrap_key_data(value, impl=_prng_impl_name(leaf))
        leaves.append(value)
    return eqx.combine(jtu.tree_unflatten(jtu.tree_structure(dynamic), leaves), static)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception behind `error` (orbax wraps tensorstore's in pages of spec)."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _is_orbax_teardown_noise(unraisable) -> bool:
    """What a failed orbax restore leaves behind once its event loop is closed: the suspended reader coroutines
    (orbax turns their closing into a new exception) and tensorstore's finished reads calling back into the closed
    loop ("Event loop is closed", reported with no object)."""
    if getattr(unraisable.object, "__qualname__", None) == "_read_array_index_and_device_put":
        return True
    return unraisable.object is None and str(unraisable.exc_value) == "Event loop is closed"


def _drop_unretrieved(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Exception handler of the event loops a restore runs on: once one read has failed and been raised, asyncio
    would log every other failed read again as "exception was never retrieved" when its future is collected."""
    if "exception was never retrieved" not in context.get("message", ""):
        loop.default_exception_handler(context)


@contextlib.contextmanager
def _quiet_orbax_teardown():
    """Keep a failed restore's leftovers from printing pages of tracebacks, some from tensorstore threads after
    the error is raised: the reports of `_is_orbax_teardown_noise` (a filter removed after a successful restore
    and kept after a failed one; other unraisable exceptions still reach the previous hook), and asyncio's
    "never retrieved" logs of the other failed reads, on the loops orbax creates meanwhile."""
    new_event_loop = asyncio.new_event_loop

    def quiet_new_event_loop() -> asyncio.AbstractEventLoop:
        loop = new_event_loop()
        loop.set_exception_handler(_drop_unretrieved)
        return loop

    previous = sys.unraisablehook
    installed = not getattr(previous, "quiets_orbax_teardown", False)

    def hook(unraisable) -> None:
        if not _is_orbax_teardown_noise(unraisable):
            previous(unraisable)

    hook.quiets_orbax_teardown = True
    if installed:
        sys.unraisablehook = hook
    asyncio.new_event_loop = quiet_new_event_loop
    try:
        yield
    except BaseException:
        gc.collect()
        raise
    else:
        if installed and sys.unraisablehook is hook:
            sys.unraisablehook = previous
    finally:
        asyncio.new_event_loop = new_event_loop


def _storable(leaves: dict) -> dict:
    return {
        path: (parts, jax.random.key_data(leaf) if _is_prng_key(leaf) else leaf)
        for path, (parts, leaf) in leaves.items()
    }


class Checkpointer:
    """Orbax-backed training checkpoints: model + optimizer state + step + arbitrary JSON metadata
    (data position...) + PRNG key.

    **Arguments:**

    - `directory`: one subdirectory per step is written here (created on the first save).
    - `max_to_keep`: keep only this many steps, the highest-numbered (None keeps all). Lower ones are deleted
      once this object's save is complete (an asynchronous one: at the next `wait`, `save`, `restore` or
      `close`); a `Checkpointer` that only reads deletes nothing. Saving a step that would not be among them is
      an error.
    - `async_save`: `save` returns once the arrays are copied to host and writes in the background;
      `wait()` blocks until the write is durable. A new save, `restore` and `close` wait for the previous one,
      and so does the interpreter's exit.

    The list of steps is read when the directory is first opened and then kept up to date by this object's own
    saves; open a new `Checkpointer` to see steps another process wrote since.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = False
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        # retention is ours: orbax's max_to_keep drops the oldest saves, not the lowest steps
        self._options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save)
        self._manager: ocp.CheckpointManager | None = None
        self._in_flight: int | None = None
        self._saved = False  # pruning follows this object's own saves only: opening to read deletes nothing
        if os.path.isdir(self.directory):
            self._open()

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            os.makedirs(self.directory, exist_ok=True)
            self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return self._manager

    def save(
        self,
        step: int,
        model: eqx.Module,
        opt_state=None,
        *,
        key: jax.Array | None = None,
        metadata: dict | None = None,
        force: bool = False,
    ) -> None:
        """Save the array leaves of `model` and `opt_state`, plus `key` and JSON-serialisable `metadata`.

        A step that already exists is an error; a step below the latest one needs `force=True`.
        """
        step = _step(step)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metadata must be JSON-serialisable: {error}") from None
        if key is not None and not isinstance(key, jax.Array):
            raise TypeError(f"key must be a jax.Array (typed or raw PRNG key), got {type(key).__name__}")

        model_leaves = _array_leaves(model)
        if not model_leaves:
            raise ValueError("model has no array leaves to save")
        opt_leaves = _array_leaves(opt_state) if opt_state is not None else {}
        for what, leaves in (("model", model_leaves), ("opt_state", opt_leaves)):
            abstract = [path for path, (_, leaf) in leaves.items() if not eqx.is_array(leaf)]
            if abstract:
                raise ValueError(f"{what} has abstract leaves (no values to save): {abstract[:5]}")

        # orbax rejects empty items and bare arrays, and a failed save leaves its worker threads hanging:
        # everything is validated above, empty parts are left out, the key goes in a dict.
        items = {"model": ocp.args.StandardSave(_nest(_storable(model_leaves)))}
        if opt_leaves:
            items["opt_state"] = ocp.args.StandardSave(_nest(_storable(opt_leaves)))
        if key is not None:
            key_data = jax.random.key_data(key) if _is_prng_key(key) else key
            items["key"] = ocp.args.StandardSave({"data": key_data})
        record = {
            "format_version": _FORMAT_VERSION,
            "step": step,
            "metadata": metadata,
            "model": {path: _describe(leaf) for path, (_, leaf) in model_leaves.items()},
            "opt_state": None if opt_state is None else {p: _describe(x) for p, (_, x) in opt_leaves.items()},
            "key": None if key is None else _describe(key),
        }
        items["metadata"] = ocp.args.JsonSave(record)

        manager = self._open()
        steps = manager.all_steps()
        if step in steps:
            raise ValueError(f"step {step} already exists in {self.directory}")
        if steps and step < max(steps) and not force:
            raise ValueError(f"step {step} is below the latest step {max(steps)}; force=True saves it")
        if self.max_to_keep is not None and step not in sorted([*steps, step])[-self.max_to_keep:]:
            kept = sorted(steps)[-self.max_to_keep:]
            raise ValueError(f"step {step} would be deleted at once: max_to_keep={self.max_to_keep} keeps the "
                             f"highest steps {kept}")
        self.wait()
        if not manager.save(step, args=ocp.args.Composite(**items), force=True):
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")
        self._saved = True
        if self._options.enable_async_checkpointing:
            self._in_flight = step
            _SAVING.add(self)
        else:
            self._prune()

    def _prune(self) -> None:
        """Delete all but the `max_to_keep` highest saved steps once this object has saved (none is being
        written when this runs)."""
        if self._saved and self.max_to_keep is not None and self._manager is not None:
            for step in sorted(self._manager.all_steps())[:-self.max_to_keep]:
                self._manager.delete(step)
            self._saved = False

    def wait(self) -> None:
        """Block until an asynchronous save is finished and durable."""
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            finally:  # finished or failed: no step is being written
                self._in_flight = None
                _SAVING.discard(self)
            self._prune()

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Saved steps, ascending; a step still being written asynchronously is not listed."""
        if self._manager is None:
            if not os.path.isdir(self.directory):
                return []
            self._open()
        steps = sorted(self._manager.all_steps())
        if self._in_flight is not None:
            if self._manager.is_saving_in_progress():
                return [step for step in steps if step != self._in_flight]
            self._in_flight = None
        return steps

    def _record(self, step: Any) -> tuple[int, list[int], dict]:
        """`(step, all steps, our metadata record of step)`; `step` None is the latest, else checked by `_step`."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        step = steps[-1] if step is None else _step(step)
        if step not in steps:
            raise ValueError(f"step {step} not found in {self.directory}; available steps: {steps}")
        manager = self._open()
        try:
            record = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
        except (FileNotFoundError, KeyError):
            record = None
        except Exception as error:  # our metadata is there but truncated, garbled or unreadable
            raise self._unreadable(step, steps, _root_cause(error)) from None
        if not isinstance(record, dict) or record.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"step {step} in {self.directory} was not written by eqx_models.Checkpointer")
        return step, steps, record

    def has_opt_state(self, step: int | None = None) -> bool:
        """Whether `step` (default: latest) holds an optimizer state; a step saved with the model alone (as
        `eqx-models convert` writes one) does not."""
        return self._record(step)[2]["opt_state"] is not None

    def restore(self, like_model: eqx.Module, like_opt_state=None, *, step: int | None = None) -> Restored:
        """Restore `step` (default: latest) into the structure of `like_model` (and `like_opt_state`).

        Each array lands with the dtype and sharding of the matching `like` leaf (on the default device for
        abstract leaves without a sharding); non-array leaves come from `like`. Restored arrays are committed
        to their devices: a fresh optimizer state for a restored model needs placing too
        (`jax.device_put(optimizer.init(params), device)` on one device, `partitioning.shard(..., params=model)`
        on a mesh), or a training step's second call compiles again (its first saw uncommitted counters).
        """
        step, steps, record = self._record(step)
        manager = self._open()
        model_leaves = _array_leaves(like_model)
        problems = [f"model: {p}" for p in _mismatches(model_leaves, record["model"])]
        opt_leaves = {}
        if like_opt_state is not None:
            if record["opt_state"] is None:
                problems.append("opt_state: like_opt_state given but the checkpoint has no optimizer state")
            else:
                opt_leaves = _array_leaves(like_opt_state)
                problems += [f"opt_state: {p}" for p in _mismatches(opt_leaves, record["opt_state"])]
        if problems:
            listing = "\n  ".join(problems)
            raise ValueError(f"step {step} in {self.directory} does not match the like tree:\n  {listing}")

        def targets(leaves, saved):
            return _nest({p: (parts, _restore_target(x, saved[p])) for p, (parts, x) in leaves.items()})

        items = {"model": ocp.args.StandardRestore(targets(model_leaves, record["model"]))}
        if opt_leaves:
            items["opt_state"] = ocp.args.StandardRestore(targets(opt_leaves, record["opt_state"]))
        saved_key = record["key"]
        if saved_key is not None:
            shape = saved_key.get("data_shape", saved_key["shape"])
            dtype = np.dtype(np.uint32) if "prng_impl" in saved_key else np.dtype(saved_key["dtype"])
            target = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=_key_sharding(model_leaves))
            items["key"] = ocp.args.StandardRestore({"data": target})
        try:
            with _quiet_orbax_teardown():
                restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # a damaged step surfaces as whatever tensorstore or orbax raises
            reason, restored = _root_cause(error), None
        if restored is None:
            raise self._unreadable(step, steps, reason)

        model = _rebuild(like_model, restored.model)
        opt_state = None
        if like_opt_state is not None:
            opt_state = _rebuild(like_opt_state, restored.opt_state if opt_leaves else {})
        key = None
        if saved_key is not None:
            key = restored.key["data"]
            if "prng_impl" in saved_key:
                key = jax.random.wrap_key_data(key, impl=saved_key["prng_impl"])
        return Restored(model, opt_state, step, key, record["metadata"])

    def _unreadable(self, step: int, steps: list[int], reason: str) -> ValueError:
        """The one-line error for a damaged `step`, naming its folder and the steps left to fall back to."""
        others = [s for s in steps if s != step]
        if not others:
            way_out = "no other step to fall back to"
        elif step == steps[-1]:
            way_out = f"delete it to fall back to step {others[-1]}"
        else:
            way_out = f"restore another step: {others}"
        folder = os.path.join(self.directory, str(step))
        return ValueError(f"step {step} in {folder} cannot be read ({reason}); {way_out}")

    def close(self) -> None:
        """Wait for a pending save and release orbax's resources."""
        if self._manager is not None:
            self.wait()
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
