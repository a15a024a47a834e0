"""Test configuration shared by the whole suite.

The jaxtyping import hook (with beartype) is installed by pytest itself from `--jaxtyping-packages` in
pyproject.toml, before this file runs; `eqx_models` must therefore only be imported by the test modules.
"""

import gc
import os

# 8 simulated CPU devices for the sharding tests (tests/test_partitioning.py); read when jax first starts its
# backend, so it must be set before any test touches a device. Other tests keep using the first device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops jax's compilation caches after each test module. Every compiled CPU program keeps memory mappings
    alive; over the whole suite they passed the kernel's limit (`vm.max_map_count`, 65,530), and XLA then
    crashed compiling (a segfault in `backend_compile_and_load`)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def seed() -> int:
    """This test's seed: fresh each run, so inputs vary between runs, and printed, so a failure's report
    ("Captured stdout setup") names it; `EQX_TEST_SEED=<seed>` replays `rng` and `getkey` of that run."""
    value = int(os.environ.get("EQX_TEST_SEED") or np.random.SeedSequence().entropy % 2**31)
    print(f"test seed {value} (EQX_TEST_SEED={value} replays it)")
    return value


@pytest.fixture
def getkey(seed):
    """A fresh PRNG key per call, from this test's seed."""
    keys = iter(jax.random.split(jax.random.key(seed), 10_000))
    return lambda: next(keys)


@pytest.fixture
def rng(seed):
    """A NumPy generator from this test's seed."""
    return np.random.default_rng(seed)
