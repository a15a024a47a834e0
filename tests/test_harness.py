"""The harness itself: shape checking is active, and the package and command install."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import jaxtyping
import pytest


def test_wrong_shape_raises_readable_error(getkey):
    from eqx_models.layers import RMSNorm

    norm = RMSNorm(8)
    with pytest.raises(jaxtyping.TypeCheckError) as excinfo:
        norm(jnp.ones(()))  # a scalar has no feature axis: "*batch features" cannot match
    message = str(excinfo.value)
    assert "features" in message and "RMSNorm" in message


def test_wrong_dtype_raises_readable_error(getkey):
    from eqx_models.layers import Linear

    layer = Linear(4, 3, key=getkey())
    with pytest.raises(jaxtyping.TypeCheckError, match="Float"):
        layer(jnp.ones((2, 4), jnp.int32))


def test_jaxtyping_hook_instruments_the_package():
    import eqx_models.layers.norms as norms

    assert hasattr(norms.RMSNorm.__call__, "__wrapped__"), "jaxtyping import hook is not active"


def test_console_script_version():
    import eqx_models

    out = subprocess.run(
        [sys.executable, "-m", "eqx_models.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"eqx-models {eqx_models.__version__}"


def test_seed_is_printed_and_replayed(pytester, monkeypatch):
    """A failing test's report names its seed, and `EQX_TEST_SEED` gives the same draws again."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile("""
        import jax

        def test_draws(rng, getkey):
            print("draw", rng.integers(2**31), int(jax.random.randint(getkey(), (), 0, 2**30)))
            assert False
    """)
    out = pytester.runpytest_subprocess("-p", "no:cacheprovider").stdout.str()
    seed = out.split("EQX_TEST_SEED=")[1].split(" ")[0]
    draw = next(line for line in out.splitlines() if line.startswith("draw "))
    monkeypatch.setenv("EQX_TEST_SEED", seed)
    again = pytester.runpytest_subprocess("-p", "no:cacheprovider").stdout.str()
    assert f"test seed {seed} " in again and draw in again.splitlines()
