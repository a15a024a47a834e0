"""The harness itself: shape checking is active, and the package and command install."""

import subprocess
import sys

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
