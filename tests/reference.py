"""Comparison helpers for the parity tests (the reference side is HF transformers or float64 NumPy)."""

import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh


def max_rel_err(ours, ref) -> float:
    """`max |ours - ref| / max |ref|`: the error relative to the reference's scale."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape mismatch: ours {ours.shape} vs reference {ref.shape}"
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(ours - ref)) / (scale if scale > 0 else 1.0))


def assert_close(ours, ref, tol: float, what: str) -> float:
    """Asserts `max_rel_err(ours, ref) <= tol`, naming `what` and the measured error; returns the error."""
    err = max_rel_err(ours, ref)
    print(f"{what}: max rel err {err:.3e} (tol {tol:.0e})")
    assert err <= tol, f"{what}: max relative error {err:.3e} exceeds {tol:.0e}"
    return err


def bf16_ulps(ours, ref) -> np.ndarray:
    """Distance in bf16 ulps between two arrays of bf16-representable values."""

    def ordered(a):
        i = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    return np.abs(ordered(ours) - ordered(ref)) >> 16


def lowered_for_an_h100(trace) -> str:
    """The StableHLO text of `trace()`, a `jax.jit(...).trace(...)`, lowered for CUDA as for an H100, on any
    machine. Pallas's Triton lowering reads the compute capability from the abstract mesh's device (jax >= 0.11
    raises without a GPU or one; jax 0.10 assumed 9.0). Eager jax calls fail under that mesh, so only the trace
    and the lowering run inside it."""
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("gpu",), axis_types=(AxisType.Auto,), abstract_device=h100)):
        return trace().lower(lowering_platforms=("cuda",)).as_text()


def primitive_names(jaxpr) -> list[str]:
    """Names of the primitives in `jaxpr` and its sub-jaxprs, not looking inside `pallas_call` kernels."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names += primitive_names(sub)
    return names


def numpy_grouped_matmul(x, w, dy, tile_expert, tile_rows):
    """Float64: per tile `x_t @ w[e]`, `dy_t @ w[e].T`, and `dw[e] = sum over e's tiles of x_t.T @ dy_t`."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    out, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros(x.shape), np.zeros(w.shape)
    for t, e in enumerate(np.asarray(tile_expert)):
        rows = slice(t * tile_rows, (t + 1) * tile_rows)
        out[rows] = x[rows] @ w[e]
        dx[rows] = dy[rows] @ w[e].T
        dw[e] += x[rows].T @ dy[rows]
    return out, dx, dw


def numpy_next_token_targets(ids: np.ndarray, seg: np.ndarray, shift: int):
    """NumPy `next_token_targets`: the target at t is ids[t + shift], valid iff t + shift < seq and tokens
    t..t+shift share one non-padding segment."""
    batch, seq = ids.shape
    valid = np.zeros((batch, seq), bool)
    targets = np.zeros((batch, seq), ids.dtype)
    for b in range(batch):
        for t in range(seq - shift):
            targets[b, t] = ids[b, t + shift]
            valid[b, t] = seg[b, t] > 0 and (seg[b, t: t + shift + 1] == seg[b, t]).all()
    return targets, valid


def numpy_cross_entropy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray):
    """Float64 (sum of masked cross-entropies, sum of masked lse^2, lse)."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    tgt = np.take_along_axis(logits, targets[..., None].astype(np.int64), -1)[..., 0]
    return ((lse - tgt) * mask).sum(), (lse * lse * mask).sum(), lse
