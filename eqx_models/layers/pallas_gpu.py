"""What the Pallas Triton kernels (`gated_delta`, `grouped_matmul`) share: where they run and which tiles fit."""

import jax


def interpret() -> bool:
    """Off GPU the kernels run in Pallas's interpreter (slow; for tests)."""
    return jax.default_backend() != "gpu"


def tiles_fit(*tiles: int) -> bool:
    """Whether Triton takes these tile sizes (powers of two >= 16); the interpreter takes any."""
    return interpret() or all(t >= 16 and not t & (t - 1) for t in tiles)
