"""MLP and activations vs HF `Qwen3MLP`, `Qwen3OmniMoeVisionMLP` and torch functional activations."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionMLP

from eqx_models.layers import MLP, get_activation
from tests.reference import assert_close, bf16_ulps


def _randomise_torch(module, rng):
    with torch.no_grad():
        for p in module.parameters():
            scale = 1.0 / np.sqrt(p.shape[-1]) if p.ndim == 2 else 0.5
            p.copy_(torch.from_numpy((scale * rng.standard_normal(p.shape)).astype(np.float32)))
    return module


def _np(t):
    return jnp.asarray(t.detach().numpy())


def _run(module, x):
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)])
def test_swiglu_matches_qwen3_mlp(getkey, rng, shape):
    """MLP(("silu", "linear")) vs HF `Qwen3MLP`: wi[:, 0] = gate_proj.T, wi[:, 1] = up_proj.T, wo = down.T."""
    config = Qwen3Config(hidden_size=64, intermediate_size=96, hidden_act="silu")
    hf = _randomise_torch(Qwen3MLP(config), rng)
    wi = jnp.stack([_np(hf.gate_proj.weight).T, _np(hf.up_proj.weight).T], axis=1)
    ours = eqx.filter_eval_shape(MLP, 64, 96, activations=("silu", "linear"), key=getkey())
    assert ours.wi.kernel.shape == wi.shape and ours.wo.kernel.shape == (96, 64)
    ours = eqx.tree_at(lambda m: (m.wi.kernel, m.wo.kernel), ours, (wi, _np(hf.down_proj.weight).T))
    x = rng.standard_normal(shape).astype(np.float32)
    assert_close(ours(jnp.asarray(x)), _run(hf, x), 1e-6, f"MLP swiglu vs Qwen3MLP {shape}")


def test_gelu_tanh_with_bias_matches_qwen3_omni_vision_mlp(getkey, rng):
    """MLP(("gelu_pytorch_tanh",), use_bias=True) vs HF `Qwen3OmniMoeVisionMLP` (fc1 / fc2 with bias)."""
    config = Qwen3OmniMoeVisionEncoderConfig(hidden_size=32, intermediate_size=80, num_heads=2, depth=1)
    assert config.hidden_act == "gelu_pytorch_tanh"
    hf = _randomise_torch(Qwen3OmniMoeVisionMLP(config), rng)
    ours = eqx.filter_eval_shape(MLP, 32, 80, activations=(config.hidden_act,), use_bias=True, key=getkey())
    ours = eqx.tree_at(
        lambda m: (m.wi.kernel, m.wi.bias, m.wo.kernel, m.wo.bias),
        ours,
        (
            _np(hf.linear_fc1.weight).T[:, None, :],
            _np(hf.linear_fc1.bias)[None, :],
            _np(hf.linear_fc2.weight).T,
            _np(hf.linear_fc2.bias),
        ),
    )
    x = rng.standard_normal((2, 7, 32)).astype(np.float32)
    assert_close(ours(jnp.asarray(x)), _run(hf, x), 1e-6, "MLP gelu_pytorch_tanh vs Qwen3OmniMoeVisionMLP")


def test_out_features_and_init(getkey):
    """out_features changes wo only; biases start at zero; wi is (in, n_activations, hidden)."""
    mlp = MLP(16, 24, activations=("gelu",), out_features=8, use_bias=True, key=getkey())
    assert mlp.wi.kernel.shape == (16, 1, 24) and mlp.wo.kernel.shape == (24, 8)
    assert mlp.wi.bias.shape == (1, 24) and mlp.wo.bias.shape == (8,)
    assert mlp(jnp.ones((3, 16))).shape == (3, 8)


TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "linear": lambda t: t,
}


@pytest.mark.parametrize("name", sorted(TORCH_ACTIVATIONS))
def test_activation_matches_torch(rng, name):
    """get_activation(name) vs torch functionals (exact gelu = F.gelu, tanh flavours: approximate="tanh")."""
    x = np.concatenate([4.0 * rng.standard_normal(512), np.linspace(-8, 8, 129)]).astype(np.float32)
    with torch.no_grad():
        ref = TORCH_ACTIVATIONS[name](torch.from_numpy(x)).numpy()
    assert_close(get_activation(name)(jnp.asarray(x)), ref, 1e-6, f"activation {name} vs torch")


@pytest.mark.parametrize(
    "name", ["silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "sigmoid", "linear"]
)
def test_activation_matches_hf_act2fn(rng, name):
    """get_activation(name) vs HF `ACT2FN[name]` (the name a HF config's hidden_act holds)."""
    x = (4.0 * rng.standard_normal(512)).astype(np.float32)
    with torch.no_grad():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
    assert_close(get_activation(name)(jnp.asarray(x)), ref, 1e-6, f"activation {name} vs ACT2FN")


@pytest.mark.parametrize("name", ["silu", "sigmoid", "gelu", "gelu_pytorch_tanh"])
def test_bf16_activation_is_rounded_once_like_torch(rng, name):
    """On bf16 inputs the activation is computed in float32 and rounded once, as torch's bf16 kernels (and so
    HF) do; computed in bf16, XLA rounded after every step: silu 37% of values off, exact gelu up to 9 ulp.
    torch's erf differs from XLA's in float32 on ~0.2% of values, hence the 1 ulp allowed. Outputs under 1e-3 in
    size (gelu's far negative tail, where a few ulps are a sign flip of nothing) are compared absolutely."""
    x = jnp.asarray(4.0 * rng.standard_normal(8192), jnp.bfloat16)
    with torch.no_grad():
        ref = ACT2FN[name](torch.from_numpy(np.asarray(x, np.float32)).bfloat16()).float().numpy()
    ours = get_activation(name)(x)
    assert ours.dtype == jnp.bfloat16
    ours = np.asarray(ours, np.float32)
    sized = np.abs(ref) > 1e-3
    ulps = bf16_ulps(ours[sized], ref[sized])
    print(f"bf16 {name} vs torch: {np.count_nonzero(ulps)}/{ulps.size} differ, max {ulps.max()} ulp")
    assert ulps.max() <= 1 and np.count_nonzero(ulps) <= ulps.size // 200
    np.testing.assert_allclose(ours[~sized], ref[~sized], rtol=0, atol=1e-5)


def test_bf16_swiglu_equals_hf_bf16(getkey, rng):
    """The SwiGLU MLP in bf16 (bf16 weights) vs HF `Qwen3MLP` in bf16: equal but for accumulation order (62% of
    outputs differed while silu was rounded after every step)."""
    config = Qwen3Config(hidden_size=64, intermediate_size=96, hidden_act="silu")
    hf = _randomise_torch(Qwen3MLP(config), rng).to(torch.bfloat16)
    as_np = lambda t: np.asarray(t.detach().float().numpy())  # noqa: E731
    wi = np.stack([as_np(hf.gate_proj.weight).T, as_np(hf.up_proj.weight).T], axis=1)
    ours = eqx.filter_eval_shape(MLP, 64, 96, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, key=getkey())
    ours = eqx.tree_at(lambda m: (m.wi.kernel, m.wo.kernel), ours,
                       (jnp.asarray(wi, jnp.bfloat16), jnp.asarray(as_np(hf.down_proj.weight).T, jnp.bfloat16)))
    x = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.bfloat16)
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.asarray(x, np.float32)).bfloat16()).float().numpy()
    ulps = bf16_ulps(np.asarray(ours(x), np.float32), ref)
    print(f"bf16 SwiGLU vs HF: {np.count_nonzero(ulps)}/{ulps.size} differ, max {ulps.max()} ulp")
    assert np.count_nonzero(ulps) <= ulps.size // 100


def test_gelu_flavours_differ():
    """Exact and tanh gelu are distinct functions (so a swapped name would be caught above)."""
    x = jnp.linspace(-3.0, 3.0, 61)
    assert float(jnp.max(jnp.abs(get_activation("gelu")(x) - get_activation("gelu_tanh")(x)))) > 1e-4


def test_unknown_activation_raises_listing_choices(getkey):
    """An unknown name raises ValueError listing the valid names, from get_activation and from MLP."""
    with pytest.raises(ValueError, match=r"'gelu_fast'.*gelu_pytorch_tanh.*silu"):
        get_activation("gelu_fast")
    with pytest.raises(ValueError, match=r"choose one of \[.*'relu'.*\]"):
        MLP(8, 16, activations=("silu", "tanh"), key=getkey())
    with pytest.raises(ValueError, match="at least one activation"):
        MLP(8, 16, activations=(), key=getkey())
