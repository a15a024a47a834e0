"""Meshes, sharding rules and sharded execution: the only module that knows about sharding.

Layers and models hold no sharding code (DESIGN rule 4). Here an ordered table names the dimensions of each
parameter by its path in the model pytree (`("embed", "heads", "head_dim")` for a query kernel), a second
table maps each dimension name to mesh axes, and `shard` places every leaf accordingly. Where activations need
help, `constrain` wraps module calls from outside: every decoder layer's residual stream is constrained to the
batch sharding, and routed MoE layers run expert-parallel under `shard_map`, with an all-to-all token exchange
around the expert function that `RoutedMoE.forward` leaves replaceable.

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = shard(model, mesh)                                          # parameters placed by DEFAULT_RULES
    opt_state = shard(optimizer.init(eqx.filter(model, eqx.is_inexact_array)), mesh)  # moments follow params
    step = make_train_step(optimizer, loss_fn=sharded_loss(mesh))
    model, opt_state, metrics = step(model, opt_state, shard_batch(batch, mesh), key)

`eqx-models partition --model qwen3-0.6b --mesh fsdp=4,tensor=2` prints the per-parameter table.
"""

import dataclasses
import functools
import math
import numbers
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Bool, Float

from eqx_models.layers.moe import RoutedMoE, RouterStats, expert_mlp
from eqx_models.models.transformer import Transformer
from eqx_models.training import lm_loss

T = TypeVar("T")
AnyMesh = Mesh | AbstractMesh

# Outermost first: data parallelism tolerates the slowest links, tensor parallelism needs the fastest.
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")


def make_mesh(axes: Mapping[str, numbers.Integral], *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) with the axes `MESH_AXES` in that order;
    axes not named get size 1. The sizes must multiply to the device count; one size may be -1 to take what is
    left."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; choose from {MESH_AXES}")
    bad = {n: s for n, s in axes.items()
           if not isinstance(s, numbers.Integral) or isinstance(s, bool) or s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive ints or -1, got {bad}")
    devices = list(jax.devices() if devices is None else devices)
    if len(set(devices)) != len(devices):
        raise ValueError(f"make_mesh: devices must be distinct, got {devices}")
    sizes = {name: int(size) for name, size in axes.items()}
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh axes {dict(axes)}: {len(devices)} devices are not divisible by {known}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        product = math.prod(sizes.values())
        raise ValueError(f"mesh axis sizes {sizes} multiply to {product}, with {len(devices)} devices")
    shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=-1"` -> `{"data": 2, "fsdp": -1}` (the command-line form of `make_mesh`'s axes)."""
    axes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, size = item.partition("=")
        if not sep or not re.fullmatch(r"-?\d+", size.strip()):
            raise ValueError(f"mesh entries look like name=size, got {item!r} in {text!r}")
        if name.strip() in axes:
            raise ValueError(f"mesh axis {name.strip()!r} is given twice in {text!r}")
        axes[name.strip()] = int(size)
    return axes


# ----------------------------------------------------------------------------------------------------------
# Rules

DimNames = tuple[str | None, ...]

# Path pattern -> names of the parameter's trailing dimensions. The first match wins: specific patterns first.
PARAM_RULES: tuple[tuple[str, DimNames], ...] = (
    # token embedding and LM head: vocabulary over tensor
    ("embed/embedding", ("vocab", "embed")),
    ("lm_head/kernel", ("embed", "vocab")),
    # Omni vision blocks fuse q, k, v on their own axis: [embed, 3, heads, head_dim]
    ("attn/qkv/kernel", ("embed", None, "heads", "head_dim")),
    ("attn/qkv/bias", (None, "heads", "head_dim")),
    ("attn/proj/kernel", ("heads", "head_dim", "embed")),
    # Attention (Qwen3, Qwen3-Next gated attention, Omni audio); heads over tensor
    ("query/kernel", ("embed", "heads", "head_dim")),
    ("(key|value)/kernel", ("embed", "kv_heads", "head_dim")),
    ("query/bias", ("heads", "head_dim")),
    ("(key|value)/bias", ("kv_heads", "head_dim")),
    ("qkv/kernel", ("embed", None, "head_dim")),  # fused_qkv: q, k and v heads share one axis
    ("out/kernel", ("heads", "head_dim", "embed")),
    # Routed experts (Qwen3-MoE `moe_block`, Qwen3-Next `experts`): experts over expert, width over tensor
    ("(moe_block|experts)/gate/kernel", ("embed", None)),
    ("(moe_block|experts)/wi", ("experts", "embed", None, "mlp")),
    ("(moe_block|experts)/wo", ("experts", "mlp", "embed")),
    # MLPs (dense layers, shared experts, encoders): width over tensor
    ("wi/kernel", ("embed", None, "mlp")),
    ("wi/bias", (None, "mlp")),
    ("wo/kernel", ("mlp", "embed")),
    ("shared_expert_gate/kernel", ("embed", None)),
    # Gated DeltaNet: in_proj groups outputs per key head; out_proj reads value heads, contiguous per key head
    ("mixer/(in_proj_qkvz|in_proj_ba)/kernel", ("embed", "heads", None)),
    ("mixer/out_proj/kernel", ("heads", None, "embed")),
    # multi-token prediction: [normed embedding | normed hidden] -> embed
    (r"mtp/projections/\d+/kernel", (None, "embed")),
    # Omni encoders: patch / position / conv stems, patch mergers and the audio projector
    ("patch_embed/proj/kernel", (None, "embed")),
    ("pos_embed/pos_embed", (None, "embed")),
    ("conv_out/kernel", (None, "embed")),
    ("(mlp_0|proj1)/kernel", ("embed", "mlp")),
    ("(mlp_0|proj1)/bias", ("mlp",)),
    ("(mlp_2|proj2)/kernel", ("mlp", "embed")),
    # everything else is small and replicated: norm scales, output biases, the Gated DeltaNet conv (its
    # [q | k | v] channel blocks do not line up with the head split), A_log, dt_bias, audio conv stems
    (".*", ()),
)

# Dimension name -> mesh axes in order of preference.
AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # inputs and activations; the expert axis carries tokens outside MoE
    "length": ("context",),
    "embed": ("fsdp", "context", "expert"),  # FSDP / ZeRO-3 over every axis that splits tokens, except data
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
}


@dataclasses.dataclass(frozen=True)
class Rules:
    """Sharding rules: `params` names the trailing dimensions of parameters by path, `axes` maps names to mesh
    axes.

    `params` is an ordered table of `(pattern, names)`. A leaf's path is its pytree key path joined by `/`
    (`transformer/blocks/0/attention/self_attention/out/kernel`); the first pattern (a regular expression)
    that matches a whole trailing run of its components names the leaf's trailing dimensions, `None` leaving
    one unsharded. Leading dimensions beyond the named ones (the repeats axis of stacked layers) stay
    unsharded; a leaf no pattern matches is replicated. Matching by trailing path is what lets optimizer
    states, whose leaves end with their parameter's path, be placed by the same rules.

    `axes` maps each dimension name to mesh axes in order of preference. A dimension is sharded over those of
    them that are in the mesh with size > 1 and not taken by an earlier dimension of the same array, in order,
    skipping any axis that would leave the dimension's size indivisible; so a size that does not divide falls
    back to fewer axes, down to replication.
    """

    params: tuple[tuple[str, DimNames], ...] = PARAM_RULES
    axes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(AXIS_RULES))

    def __post_init__(self):
        if isinstance(self.params, (str, Mapping)):
            raise ValueError(f"Rules.params must be a sequence of (pattern, names) pairs, got {self.params!r}")
        params = []
        for entry in self.params:
            if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
                raise ValueError(f"Rules.params entries are (pattern, names) pairs, got {entry!r}")
            pattern, names = entry
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise ValueError(f"Rules.params names of {pattern!r} must be a tuple of dimension names, got "
                                 f"{names!r} (a single name needs a comma: ({names!r},))")
            params.append((str(pattern), tuple(names)))
        params = tuple(params)
        for name, mesh_axes in self.axes.items():
            if isinstance(mesh_axes, str) or not all(isinstance(a, str) for a in mesh_axes):
                raise ValueError(f"Rules.axes[{name!r}] must be a tuple of mesh axes, got {mesh_axes!r}")
        axes = types.MappingProxyType({str(k): tuple(v) for k, v in self.axes.items()})
        for pattern, names in params:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"Rules.params pattern {pattern!r} is not a regex: {e}") from None
            missing = [n for n in names if n is not None and n not in axes]
            if missing:
                raise ValueError(f"Rules.params pattern {pattern!r} names {missing}, unmapped in Rules.axes")
        for name in ("batch", "length"):
            if name not in axes:
                raise ValueError(f"Rules.axes must map {name!r} (used for inputs and activations)")
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "axes", axes)

    def __hash__(self) -> int:
        return hash((self.params, tuple(self.axes.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rules) and (self.params, dict(self.axes)) == (other.params, dict(other.axes))

    def names_for(self, path: str) -> tuple[str, DimNames] | None:
        """The first `(pattern, names)` whose pattern matches a whole trailing run of `path`'s components."""
        for pattern, names in self.params:
            if _compiled(pattern).search(path):
                return pattern, names
        return None


DEFAULT_RULES = Rules()


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(rf"(?:^|/)(?:{pattern})$")


@functools.cache
def _check_mesh(mesh_shape: tuple[tuple[str, int], ...], rules: Rules) -> None:
    """A mesh axis no rule uses would leave everything replicated along it, and a rule naming an axis that is
    neither in the mesh nor one of `MESH_AXES` is a typo: both are errors rather than silent replication."""
    named = {axis for axes in rules.axes.values() for axis in axes}
    mesh_axes = dict(mesh_shape)
    unused = sorted(axis for axis, size in mesh_axes.items() if size > 1 and axis not in named)
    if unused:
        raise ValueError(f"mesh axes {unused} are used by no sharding rule (the rules use {sorted(named)}): build "
                         "the mesh with partitioning.make_mesh, or map dimension names to them in Rules(axes=...)")
    unknown = sorted(axis for axis in named if axis not in mesh_axes and axis not in MESH_AXES)
    if unknown:
        raise ValueError(f"Rules.axes name mesh axes {unknown}, which are neither in the mesh "
                         f"{tuple(mesh_axes)} nor among {MESH_AXES}")


def _dim_axes(
    name: str, size: int, mesh_shape: Mapping[str, int], rules: Rules, used: set[str]
) -> tuple[str, ...]:
    """The mesh axes dimension `name` of `size` is split over; none for a name the rules do not map."""
    taken, product = [], 1
    for axis in rules.axes.get(name, ()):
        n = mesh_shape.get(axis, 1)
        if n > 1 and axis not in used and axis not in taken and size % (product * n) == 0:
            taken.append(axis)
            product *= n
    return tuple(taken)


def spec_for(names: DimNames, shape: Sequence[int], mesh: AnyMesh, rules: Rules | None = None) -> P:
    """The `PartitionSpec` of an array of `shape` whose trailing dimensions are called `names`."""
    rules = DEFAULT_RULES if rules is None else rules
    _check_mesh(tuple(dict(mesh.shape).items()), rules)
    if len(names) > len(shape):
        raise ValueError(f"sharding names {names} need {len(names)} or more dimensions, got {tuple(shape)}")
    entries: list[Any] = [None] * (len(shape) - len(names))
    used: set[str] = set()
    for name, size in zip(names, shape[len(shape) - len(names) :]):
        axes = () if name is None else _dim_axes(name, size, dict(mesh.shape), rules, used)
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path as the `/`-joined string the rules match."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _leaf_spec(path: Sequence[Any], leaf: Any, mesh: AnyMesh, rules: Rules) -> P:
    match = rules.names_for(path_str(path))
    if match is None:
        return P()
    pattern, names = match
    _check_mesh(tuple(dict(mesh.shape).items()), rules)
    try:
        return spec_for(names, leaf.shape, mesh, rules)
    except ValueError as e:
        raise ValueError(
            f"rule {pattern!r} does not fit {path_str(path)}: {e}. An optimizer statistic shaped unlike its "
            "parameter (Adafactor's factored moments) is placed by `shard(state, mesh, params=model)`"
        ) from None


def _spec_fn(mesh: AnyMesh, rules: Rules | None, params: Any) -> Callable[[Sequence[Any], Any], P]:
    """`(path, leaf) -> PartitionSpec` by `rules`, and by the parameters in `params` for leaves (optimizer
    statistics) that end with a parameter's path but not its shape (see `shard`)."""
    rules = DEFAULT_RULES if rules is None else rules
    like = {} if params is None else {
        path_str(path): (path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params) if _is_array(leaf)
    }

    def spec(path: Sequence[Any], leaf: Any) -> P:
        parts = path_str(path).split("/")
        param = next((like[s] for s in ("/".join(parts[i:]) for i in range(len(parts))) if s in like), None)
        if param is None or tuple(param[1].shape) == tuple(leaf.shape):
            return _leaf_spec(path, leaf, mesh, rules)
        shape = tuple(param[1].shape)
        dropped = [d for d in range(len(shape)) if shape[:d] + shape[d + 1 :] == tuple(leaf.shape)]
        if not dropped:
            return P()
        if len(dropped) > 1:  # equal dimensions: optax's Adafactor drops the largest for its row statistic
            by_size = np.argsort(shape, kind="stable")  # (the last of equal ones), the next for its column one
            names = parts[: len(parts) - len(path_str(param[0]).split("/"))]
            dropped = [int(by_size[-2]) if "v_col" in names else int(by_size[-1])]
        full = _leaf_spec(*param, mesh, rules)
        return P(*(entry for i, entry in enumerate(full) if i != dropped[0]))

    return spec


def partition_specs(tree: T, mesh: AnyMesh, rules: Rules | None = None, *, params: Any = None) -> T:
    """`tree` with each array leaf (or `ShapeDtypeStruct`) replaced by its `PartitionSpec`; other leaves kept.
    `mesh` may be an `AbstractMesh`: only the axis sizes matter. `params` as for `shard`."""
    spec = _spec_fn(mesh, rules, params)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: spec(path, leaf) if _is_array(leaf) else leaf, tree)


def shard(tree: T, mesh: Mesh, rules: Rules | None = None, *, params: Any = None) -> T:
    """`tree` (a model, an optimizer state, any pytree of arrays) with every array placed on `mesh` by `rules`
    (default `DEFAULT_RULES`). `ShapeDtypeStruct` leaves get the sharding attached instead, so an abstract
    model from `eqx.filter_eval_shape` becomes the target of a sharded checkpoint restore, allocating nothing.

    Arrays must hold the same value on every process (jax checks), e.g. a model built on each process from the
    same key; each process then transfers only its own shards. As with `jax.device_put`, a placed array may share
    device buffers with the one given (a replicated leaf keeps its buffer on the device it was on), so a training
    step that donates the result (`make_train_step`) also invalidates those leaves of `tree`.

    Optimizer states are placed by the same rules, matched by the parameter path their leaves end with: right
    for states shaped like their parameters (Adam's moments, momentum). Statistics shaped otherwise need
    `params`, the model or its parameters: a leaf that ends with a parameter's path and has its shape less one
    dimension (Adafactor's factored row and column moments) is split like the parameter's other dimensions, as
    a training step's output would be; any other shape (optax's `(1,)` placeholders) is replicated. Without
    `params` such a leaf gets its parameter's rule, and one with fewer dimensions than the rule names raises."""
    spec = _spec_fn(mesh, rules, params)

    def place(path, leaf):
        if not _is_array(leaf):
            return leaf
        sharding = NamedSharding(mesh, spec(path, leaf))
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(place, tree)


def batch_spec(shape: Sequence[int], mesh: AnyMesh, rules: Rules | None = None) -> P:
    """Inputs and activations: the first dimension over the `batch` axes, the second over `length`, the rest
    unsharded."""
    names = ("batch", "length")[: len(shape)] + (None,) * max(0, len(shape) - 2)
    return spec_for(names, shape, mesh, rules)


def shard_batch(batch: T, mesh: Mesh, rules: Rules | None = None) -> T:
    """Every array of `batch` (`input_ids`, `segment_ids`, `positions`, ...) split by `batch_spec`.

    In a multi-process run each process passes the rows its own devices hold and gets the global array
    (`jax.make_array_from_process_local_data`); with one process, the whole batch."""
    processes = jax.process_count()

    def place(leaf):
        if not _is_array(leaf):
            return leaf
        if processes == 1:
            return jax.device_put(leaf, NamedSharding(mesh, batch_spec(leaf.shape, mesh, rules)))
        # the spec is chosen for rows from every process; jax infers the true global shape from the sharding
        rows = (leaf.shape[0] * processes, *leaf.shape[1:]) if leaf.ndim else ()
        sharding = NamedSharding(mesh, batch_spec(rows, mesh, rules))
        placed = jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
        if placed.shape != rows:  # rows not split over the processes: each one's would pass for the whole batch
            raise ValueError(
                f"shard_batch: {processes} processes x {leaf.shape[0]} rows = {rows[0]} rows do not split over the "
                f"batch axes of mesh {dict(mesh.shape)} (spec {sharding.spec}); pass a per-process batch that "
                f"makes the global batch divisible by them"
            )
        return placed

    return jax.tree.map(place, batch)


def _constrain_array(x: Array, mesh: Mesh, spec: P) -> Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ----------------------------------------------------------------------------------------------------------
# Wrapped module calls


def _entry_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _compute_spec(path: Sequence[Any], leaf: Any, mesh: AnyMesh, rules: Rules) -> P:
    """The sharding a parameter is used in: its stored spec without the axes that also split tokens (FSDP
    shards are gathered for use), except on an `experts` dimension (experts stay where they live)."""
    match = rules.names_for(path_str(path))
    spec = _leaf_spec(path, leaf, mesh, rules)
    names = () if match is None else match[1]
    names = (None,) * (len(spec) - len(names)) + tuple(names)
    token_axes = set(rules.axes["batch"]) | set(rules.axes["length"])
    entries = []
    for name, entry in zip(names, spec):
        axes = tuple(a for a in _entry_axes(entry) if name == "experts" or a not in token_axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def _gathered(tree: T, mesh: Mesh, rules: Rules) -> T:
    """`tree`'s parameters constrained to their compute sharding (FSDP all-gather at the point of use)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _constrain_array(leaf, mesh, _compute_spec(path, leaf, mesh, rules))
        if isinstance(leaf, jax.Array) else leaf,
        tree,
    )


def _with_expert_parallel(tree: T, mesh: Mesh, rules: Rules) -> T:
    """Every `RoutedMoE` of `tree` wrapped in an `ExpertParallelMoE` (not those already wrapped)."""
    return jax.tree.map(
        lambda node: ExpertParallelMoE(node, mesh, rules) if isinstance(node, RoutedMoE) else node,
        tree,
        is_leaf=lambda node: isinstance(node, (RoutedMoE, ExpertParallelMoE, ConstrainedLayer)),
    )


class ConstrainedLayer(eqx.Module):
    """A decoder layer run the sharded way. Inside the layer scan (so per layer, never for the whole stack)
    its parameters are gathered to their compute sharding and its routed MoE runs through `expert_parallel`;
    its input and output residual stream `[batch, seq, embed]` are constrained to `batch_spec`, so the scan
    carry stays split by batch instead of following the weights."""

    layer: eqx.Module
    mesh: Mesh = eqx.field(static=True)
    rules: Rules = eqx.field(static=True)

    def __call__(
        self, x: Float[Array, "batch seq embed"], **kwargs: Any
    ) -> tuple[Float[Array, "batch seq embed"], Any, Any]:
        spec = batch_spec(x.shape, self.mesh, self.rules)
        layer = _with_expert_parallel(_gathered(self.layer, self.mesh, self.rules), self.mesh, self.rules)
        x, cache, stats = layer(_constrain_array(x, self.mesh, spec), **kwargs)
        return _constrain_array(x, self.mesh, spec), cache, stats


class ExpertParallelMoE(eqx.Module):
    """A `RoutedMoE` called through `expert_parallel`: same arguments and results."""

    moe: RoutedMoE
    mesh: Mesh = eqx.field(static=True)
    rules: Rules = eqx.field(static=True)

    def __call__(
        self, x: Float[Array, "*batch embed"], token_mask: Bool[Array, "*batch"] | None = None
    ) -> tuple[Float[Array, "*batch embed"], RouterStats]:
        return expert_parallel(self.moe, x, token_mask, self.mesh, self.rules)


def expert_parallel(
    moe: RoutedMoE,
    x: Float[Array, "*batch embed"],
    token_mask: Bool[Array, "*batch"] | None,
    mesh: Mesh,
    rules: Rules | None = None,
) -> tuple[Float[Array, "*batch embed"], RouterStats]:
    """`moe(x, token_mask)` as one manual SPMD region (`shard_map`).

    Each device routes its own tokens (split like any activation, by `batch_spec`) into per-expert buffers
    `[experts, capacity, embed]`; the expert function sends each expert's rows to the devices that own that
    expert (`all_to_all` over the mesh axes of the `experts` dimension), runs the local experts on the rows
    from every device, with the expert width split over the `mlp` axes and summed (`psum`), and sends the
    results back. Expert weights enter split over experts and width only: FSDP shards are gathered at entry.

    Dropless routing (`capacity_factor=None`) gives the unsharded result. With a capacity factor, capacity
    counts the tokens each device routes (GShard's groups; MaxText counts per sequence), so which tokens are
    dropped can differ from a one-device run.
    Experts are split only when the tokens are split over the same axes (each device brings its own tokens to
    the exchange); otherwise every device runs every expert on its own tokens.
    """
    rules = DEFAULT_RULES if rules is None else rules
    mesh_shape = dict(mesh.shape)
    token_mask = jnp.ones(x.shape[:-1], bool) if token_mask is None else token_mask
    x_spec = P(*batch_spec(x.shape[:-1], mesh, rules), None)
    token_axes = tuple(a for entry in x_spec for a in _entry_axes(entry))
    expert_axes = _dim_axes("experts", moe.num_experts, mesh_shape, rules, set())
    ep = expert_axes if expert_axes and set(expert_axes) <= set(token_axes) else None
    tp = _dim_axes("mlp", moe.wo.shape[-2], mesh_shape, rules, set(token_axes)) or None
    params, static = eqx.partition(moe, eqx.is_array)
    param_specs = jax.tree.map(lambda _: P(), params)
    param_specs = eqx.tree_at(lambda m: (m.wi, m.wo), param_specs, (P(ep, None, None, tp), P(ep, tp, None)))

    def local(x, token_mask, params):
        layer = eqx.combine(params, static)

        def expert_fn(buffers):
            if ep:
                buffers = jax.lax.all_to_all(buffers, ep, 0, 1, tiled=True)
            out = expert_mlp(buffers, layer.wi, layer.wo, layer.activations, layer.dtype)
            if tp:
                out = jax.lax.psum(out, tp)
            if ep:
                out = jax.lax.all_to_all(out, ep, 1, 0, tiled=True)
            return out

        y, stats = layer.forward(x, token_mask, expert_fn=expert_fn)
        if token_axes:
            stats = jax.lax.psum(stats, token_axes)
        return y, stats

    mask_spec = P(*x_spec[: token_mask.ndim])
    return jax.shard_map(
        local, mesh=mesh, in_specs=(x_spec, mask_spec, param_specs), out_specs=(x_spec, P())
    )(x, token_mask, params)


def constrain(model: T, mesh: Mesh, rules: Rules | None = None) -> T:
    """`model` with its module calls wrapped for `mesh`, for use inside a jitted function.

    Every parameter is constrained to its stored sharding (so its gradient comes out sharded alike); each
    `Transformer`'s decoder layers become `ConstrainedLayer`s (per-layer FSDP gathering, residual stream split
    by batch, expert-parallel MoE) and its embedding, final norm, head and MTP block are gathered for use;
    any other `RoutedMoE` runs through `expert_parallel`. The result computes the same function but is a
    different pytree: keep the plain model as the thing you store, train and checkpoint, and call `constrain`
    inside the loss (`sharded_loss`) or forward pass."""
    rules = DEFAULT_RULES if rules is None else rules
    model = jax.tree_util.tree_map_with_path(
        lambda path, leaf: _constrain_array(leaf, mesh, _leaf_spec(path, leaf, mesh, rules))
        if isinstance(leaf, jax.Array) else leaf,
        model,
    )
    if mesh.size == 1:
        return model

    def wrap(node):
        if not isinstance(node, Transformer):
            return node
        if node.unrolled:  # `blocks[repeat][position]`, one layer each
            blocks = tuple(tuple(ConstrainedLayer(layer, mesh, rules) for layer in block) for block in node.blocks)
        else:
            blocks = tuple(ConstrainedLayer(block, mesh, rules) for block in node.blocks)
        outer = {"embed": node.embed, "norm": node.norm, "lm_head": node.lm_head, "mtp": node.mtp}
        outer = _with_expert_parallel(_gathered(outer, mesh, rules), mesh, rules)  # keys keep the rule paths
        return eqx.tree_at(lambda t: (t.blocks, t.embed, t.norm, t.lm_head, t.mtp), node,
                           (blocks, outer["embed"], outer["norm"], outer["lm_head"], outer["mtp"]),
                           is_leaf=lambda x: x is None)

    model = jax.tree.map(wrap, model, is_leaf=lambda node: isinstance(node, Transformer))
    return _with_expert_parallel(model, mesh, rules)


LossFn = Callable[..., tuple[Array, dict[str, Array]]]


def sharded_loss(mesh: Mesh, rules: Rules | None = None, *, loss_fn: LossFn = lm_loss) -> LossFn:
    """`loss_fn` (default `training.lm_loss`) run on `constrain(model, mesh, rules)` with the batch
    constrained to `batch_spec`: pass it to `training.make_train_step(optimizer, loss_fn=...)`. Gradients keep
    the plain model's structure and come out sharded like the parameters."""

    def loss(model, batch, **kwargs):
        batch = jax.tree.map(lambda x: _constrain_array(x, mesh, batch_spec(x.shape, mesh, rules)), batch)
        return loss_fn(constrain(model, mesh, rules), batch, **kwargs)

    return loss


# ----------------------------------------------------------------------------------------------------------
# The per-parameter table


def _format_spec(spec: P) -> str:
    entries = ["None" if e is None else repr(e) for e in spec]
    return "P(" + ", ".join(entries) + ")"


def sharding_table(tree: Any, mesh: AnyMesh, rules: Rules | None = None) -> str:
    """One line per array leaf of `tree` (concrete or from `eqx.filter_eval_shape`): path, shape, partition
    spec, per-device shard shape; then the totals."""
    rules = DEFAULT_RULES if rules is None else rules
    mesh_shape = dict(mesh.shape)
    rows, total, per_device, total_bytes, device_bytes = [], 0, 0, 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not _is_array(leaf):
            continue
        spec = _leaf_spec(path, leaf, mesh, rules)
        local = list(leaf.shape)
        for i, entry in enumerate(spec):
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                local[i] //= mesh_shape[axis]
        size, local_size = math.prod(leaf.shape), math.prod(local)
        itemsize = np.dtype(leaf.dtype).itemsize
        total, per_device = total + size, per_device + local_size
        total_bytes, device_bytes = total_bytes + size * itemsize, device_bytes + local_size * itemsize
        rows.append((path_str(path), str(tuple(leaf.shape)), _format_spec(spec), str(tuple(local))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    mesh_text = ", ".join(f"{n}={s}" for n, s in mesh_shape.items() if s > 1) or "1 device"
    lines = [f"# mesh: {mesh_text}"]
    lines += [f"{p:<{widths[0]}}  {s:<{widths[1]}}  {sp:<{widths[2]}}  {lo}" for p, s, sp, lo in rows]
    lines.append(
        f"# {total:,} parameters ({total_bytes / 2**30:.2f} GiB); per device {per_device:,} "
        f"({device_bytes / 2**30:.2f} GiB)"
    )
    return "\n".join(lines)


# Presets of the table command: the published shapes, which are our configs' defaults.
PRESETS = {
    "qwen3-0.6b": "qwen3",
    "qwen3-30b-a3b": "qwen3_moe",
    "qwen3-next-80b-a3b": "qwen3_next",
    "qwen3-omni-30b-a3b-thinker": "qwen3_omni_moe_thinker",
}


def abstract_model(name: str) -> eqx.Module:
    """A preset (`PRESETS`) or an HF checkpoint directory's model, built with `eqx.filter_eval_shape`."""
    from pathlib import Path

    from eqx_models import hf

    if name in PRESETS:
        config_cls, model_cls, _ = hf.MODELS[PRESETS[name]]
        cfg = config_cls()
    elif (Path(name) / "config.json").exists():
        cfg = hf.read_config(name)
        model_cls = hf.MODELS[cfg.model_type][1]
    else:
        raise ValueError(f"--model must be one of {sorted(PRESETS)} or an HF checkpoint directory: {name!r}")
    return eqx.filter_eval_shape(model_cls, cfg, key=jax.random.key(0))


def abstract_mesh(text: str) -> AbstractMesh:
    """The device-free mesh `text` names (`parse_mesh` syntax, e.g. "fsdp=4,tensor=2"), for `sharding_table`."""
    axes = parse_mesh(text)
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; choose from {MESH_AXES}")
    if any(size < 1 for size in axes.values()):
        raise ValueError(f"--mesh sizes must be positive (no devices to fill -1 from), got {axes}")
    return AbstractMesh(tuple(axes.get(n, 1) for n in MESH_AXES), MESH_AXES)
