"""Test configuration shared by the whole suite.

The jaxtyping import hook (with beartype) is installed by pytest itself from `--jaxtyping-packages` in
pyproject.toml, before this file runs; `eqx_models` must therefore only be imported by the test modules.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def getkey():
    """A fresh PRNG key per call, different per test."""
    keys = iter(jax.random.split(jax.random.key(np.random.SeedSequence().entropy % 2**31), 10_000))
    return lambda: next(keys)


@pytest.fixture
def rng():
    return np.random.default_rng()
