"""Comparison helpers for the parity tests (the reference side is HF transformers or float64 NumPy)."""

import numpy as np


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
