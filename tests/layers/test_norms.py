"""Norm layers vs HF transformers (Qwen3 / Qwen3-Next), torch LayerNorm and float64 NumPy."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next

from eqx_models.layers import GatedRMSNorm, L2Norm, LayerNorm, RMSNorm, l2norm
from tests.reference import assert_close, bf16_ulps, max_rel_err

SHAPES = [(3, 64), (2, 5, 4, 16)]  # hidden 64; (batch, seq, heads, head_dim) for per-head q/k-norm
SHAPE_IDS = ["hidden64", "per_head"]


def _x(rng, shape, scale=1.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


def _hf(module, *args):
    with torch.no_grad():
        return module(*(torch.from_numpy(a) for a in args)).numpy()


def _set_weight(module, w):
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("eps,scale", [(1e-6, 1.0), (1e-5, 1e-3)], ids=["eps1e-6", "eps1e-5_small_x"])
def test_rmsnorm_matches_qwen3_rmsnorm(rng, shape, eps, scale):
    """RMSNorm(scale_offset=0) vs HF `Qwen3RMSNorm` (weight 1 + N(0, 0.1)); small x makes eps matter."""
    d = shape[-1]
    x, w = _x(rng, shape, scale), _x(rng, (d,), 0.1, 1.0)
    hf = Qwen3RMSNorm(d, eps=eps)
    _set_weight(hf, w)
    ours = eqx.tree_at(lambda m: m.scale, RMSNorm(d, eps=eps), jnp.asarray(w))
    assert_close(ours(jnp.asarray(x)), _hf(hf, x), 1e-6, f"RMSNorm vs Qwen3RMSNorm {shape} eps={eps}")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_zero_centred_rmsnorm_matches_qwen3_next_rmsnorm(rng, shape):
    """RMSNorm(scale_offset=1) vs HF `Qwen3NextRMSNorm`: stored w (0 + N(0, 0.1)) multiplies 1 + w."""
    d = shape[-1]
    x, w = _x(rng, shape), _x(rng, (d,), 0.1)
    hf = hf_next.Qwen3NextRMSNorm(d, eps=1e-6)
    _set_weight(hf, w)
    ours = eqx.tree_at(lambda m: m.scale, RMSNorm(d, scale_offset=1.0), jnp.asarray(w))
    ref = _hf(hf, x)
    assert_close(ours(jnp.asarray(x)), ref, 1e-6, f"RMSNorm(offset=1) vs Qwen3NextRMSNorm {shape}")
    plain = eqx.tree_at(lambda m: m.scale, RMSNorm(d), jnp.asarray(w))
    assert max_rel_err(plain(jnp.asarray(x)), ref) > 0.1, "the test cannot tell w from 1 + w"


def test_rmsnorm_init_and_no_scale(rng):
    """Init is an identity scale for both offsets; use_scale=False is x * rsqrt(mean(x^2) + eps) (float64)."""
    assert np.all(np.asarray(RMSNorm(8).scale) == 1.0)
    assert np.all(np.asarray(RMSNorm(8, scale_offset=1.0).scale) == 0.0)
    x = _x(rng, (4, 32))
    ref = x * (1.0 / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6))
    norm = RMSNorm(32, use_scale=False)
    assert norm.scale is None
    for m in (norm, RMSNorm(32), RMSNorm(32, scale_offset=1.0)):
        assert_close(m(jnp.asarray(x)), ref, 1e-6, "RMSNorm at init vs float64 NumPy")


@pytest.mark.parametrize("d", [64, 16])
def test_gated_rmsnorm_matches_qwen3_next_gated(rng, d):
    """GatedRMSNorm(x, gate) vs HF `Qwen3NextRMSNormGated` (plain weight 1 + N(0, 0.1), silu gate last)."""
    shape = (2, 5, 4, d)
    x, gate, w = _x(rng, shape), _x(rng, shape, 2.0), _x(rng, (d,), 0.1, 1.0)
    hf = hf_next.Qwen3NextRMSNormGated(d, eps=1e-6)
    _set_weight(hf, w)
    ours = eqx.tree_at(lambda m: m.scale, GatedRMSNorm(d), jnp.asarray(w))
    ref = _hf(hf, x, gate)
    what = f"GatedRMSNorm vs Qwen3NextRMSNormGated d={d}"
    assert_close(ours(jnp.asarray(x), jnp.asarray(gate)), ref, 1e-6, what)


def test_gated_rmsnorm_bf16_matches_qwen3_next_gated_bf16(rng):
    """bfloat16 GatedRMSNorm vs HF `Qwen3NextRMSNormGated` run in bfloat16.

    Both cast the normalised x to bf16, multiply by w in bf16, gate in float32 and cast last, so at most
    2 ulp (a reduction-order flip before the bf16 multiply) on under 1% of elements; scaling in float32
    without the intermediate bf16 roundings differs on a large fraction.
    """
    d, shape = 16, (8, 16, 4, 16)
    x = torch.from_numpy(_x(rng, shape, 3.0)).to(torch.bfloat16)
    gate = torch.from_numpy(_x(rng, shape, 2.0)).to(torch.bfloat16)
    w = torch.from_numpy(_x(rng, (d,), 0.1, 1.0)).to(torch.bfloat16)
    hf = hf_next.Qwen3NextRMSNormGated(d, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(w)
        ref = hf(x, gate)
    assert ref.dtype == torch.bfloat16
    ours_mod = GatedRMSNorm(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours_mod = eqx.tree_at(lambda m: m.scale, ours_mod, jnp.asarray(w.float().numpy(), jnp.bfloat16))
    ours = ours_mod(*(jnp.asarray(t.float().numpy(), jnp.bfloat16) for t in (x, gate)))
    assert ours.dtype == jnp.bfloat16
    ulps = bf16_ulps(np.asarray(ours, np.float32), ref.float().numpy())
    print(f"bf16 GatedRMSNorm: max {ulps.max()} ulp, {np.count_nonzero(ulps)}/{ulps.size} elements differ")
    assert ulps.max() <= 2
    assert np.count_nonzero(ulps) <= ulps.size // 100


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_matches_torch(rng, shape, eps, use_bias):
    """LayerNorm vs `torch.nn.LayerNorm` (weight 1 + N(0, 0.1), bias N(0, 0.1)), inputs with non-zero mean."""
    d = shape[-1]
    x = _x(rng, shape, 2.0, 3.0)
    w, b = _x(rng, (d,), 0.1, 1.0), _x(rng, (d,), 0.1)
    ref_mod = torch.nn.LayerNorm(d, eps=eps, bias=use_bias)
    _set_weight(ref_mod, w)
    ours = eqx.tree_at(lambda m: m.scale, LayerNorm(d, eps=eps, use_bias=use_bias), jnp.asarray(w))
    if use_bias:
        with torch.no_grad():
            ref_mod.bias.copy_(torch.from_numpy(b))
        ours = eqx.tree_at(lambda m: m.bias, ours, jnp.asarray(b))
    else:
        assert ours.bias is None
    what = f"LayerNorm vs torch {shape} eps={eps} bias={use_bias}"
    assert_close(ours(jnp.asarray(x)), _hf(ref_mod, x), 1e-6, what)


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_bf16_matches_torch_bf16(rng, use_bias):
    """bfloat16 LayerNorm vs `torch.nn.LayerNorm` run in bfloat16 (weight 1 + N(0, 0.1), bias N(0, 0.1)).

    Both take statistics and the affine in float32 and cast once, so at most 1 ulp (a reduction-order flip)
    on under 1% of elements; statistics taken in bf16 (mean 3, spread 2 inputs) differ on most elements.
    Outputs that cancel (`|y| < 2^-10` of the magnitudes summed into them, ~0.5% of elements) are decided by
    float32 roundoff, where torch's order differs (measured up to 5 ulp of a 1e-6 output, torch the farther
    from float64); there both must agree within `2^-16` of those magnitudes.
    """
    d = 64
    x = torch.from_numpy(_x(rng, (64, d), 2.0, 3.0)).to(torch.bfloat16)
    w = torch.from_numpy(_x(rng, (d,), 0.1, 1.0)).to(torch.bfloat16)
    b = torch.from_numpy(_x(rng, (d,), 0.1)).to(torch.bfloat16)
    ref_mod = torch.nn.LayerNorm(d, eps=1e-5, bias=use_bias).to(torch.bfloat16)
    ours_mod = LayerNorm(d, use_bias=use_bias, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours_mod = eqx.tree_at(lambda m: m.scale, ours_mod, jnp.asarray(w.float().numpy(), jnp.bfloat16))
    with torch.no_grad():
        ref_mod.weight.copy_(w)
        if use_bias:
            ref_mod.bias.copy_(b)
            ours_mod = eqx.tree_at(lambda m: m.bias, ours_mod, jnp.asarray(b.float().numpy(), jnp.bfloat16))
        ref = ref_mod(x)
    assert ref.dtype == torch.bfloat16
    ours = ours_mod(jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    ours, ref = np.asarray(ours, np.float32), ref.float().numpy()
    x64, w64 = x.double().numpy(), w.double().numpy()
    b64 = b.double().numpy() if use_bias else 0.0
    mean = x64.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    magnitude = (np.abs(x64) + np.abs(mean)) * rstd * np.abs(w64) + np.abs(b64)
    well = np.abs((x64 - mean) * rstd * w64 + b64) >= 2.0**-10 * magnitude
    ulps = bf16_ulps(ours, ref)[well]
    print(f"bf16 LayerNorm bias={use_bias}: max {ulps.max()} ulp, {np.count_nonzero(ulps)}/{ulps.size} differ; "
          f"{np.count_nonzero(~well)} cancelling outputs")
    assert ulps.max() <= 1
    assert np.count_nonzero(ulps) <= ulps.size // 100
    assert np.all(np.abs(ours - ref)[~well] <= 2.0**-16 * magnitude[~well])


def test_layernorm_without_affine_matches_torch(rng):
    """LayerNorm(use_scale=False, use_bias=False) vs `torch.nn.LayerNorm(elementwise_affine=False)`."""
    x = _x(rng, (4, 48), 0.5, -1.0)
    ours = LayerNorm(48, use_scale=False, use_bias=False)
    ref = _hf(torch.nn.LayerNorm(48, eps=1e-5, elementwise_affine=False), x)
    assert_close(ours(jnp.asarray(x)), ref, 1e-6, "LayerNorm no affine vs torch")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("eps,scale", [(1e-6, 1.0), (1e-5, 1e-3)], ids=["eps1e-6", "eps1e-5_small_x"])
def test_l2norm_module_matches_numpy(rng, shape, eps, scale):
    """L2Norm vs float64 NumPy `x * rsqrt(mean(x^2) + eps)`; output keeps the input dtype."""
    x = _x(rng, shape, scale)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + eps)
    assert_close(L2Norm(eps=eps)(jnp.asarray(x)), ref, 1e-6, f"L2Norm vs float64 {shape} eps={eps}")
    assert L2Norm()(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 2, 16)], ids=["hidden64", "per_head"])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_l2norm_function_matches_qwen3_next_l2norm(rng, shape, scale):
    """`l2norm` (sum-based, eps inside rsqrt) vs HF qwen3_next `l2norm`; small x makes eps matter."""
    x = _x(rng, shape, scale)
    with torch.no_grad():
        ref = hf_next.l2norm(torch.from_numpy(x), dim=-1, eps=1e-6).numpy()
    assert_close(l2norm(jnp.asarray(x)), ref, 1e-6, f"l2norm vs HF l2norm {shape} scale={scale}")


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["Qwen3RMSNorm", "Qwen3NextRMSNorm"])
@pytest.mark.parametrize("shape", [(64, 64), (8, 16, 4, 16)], ids=SHAPE_IDS)
def test_rmsnorm_bf16_matches_hf_bf16(rng, offset, shape):
    """bfloat16 RMSNorm vs HF `Qwen3RMSNorm` / `Qwen3NextRMSNorm` run in bfloat16.

    The cast orders agree (Qwen3RMSNorm: normalise in fp32, cast, multiply by w in bf16; Qwen3NextRMSNorm:
    multiply by 1 + w in fp32, cast last), so outputs are bit-identical except where the fp32 reduction
    order flips one bf16 rounding (~1e-5 of elements). With offset 0 that flip precedes the bf16 multiply and
    becomes 2 ulp of the product when |w| < 1 drops it a binade; with offset 1 it is at most 1 ulp. The wrong
    cast order differs on ~25% of elements, hence the 1% bound.
    """
    d = shape[-1]
    x = torch.from_numpy(_x(rng, shape, 3.0)).to(torch.bfloat16)
    w = torch.from_numpy(_x(rng, (d,), 0.1, 1.0 - offset)).to(torch.bfloat16)
    hf = (Qwen3RMSNorm(d) if offset == 0.0 else hf_next.Qwen3NextRMSNorm(d)).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(w)
        ref = hf(x)
    assert ref.dtype == torch.bfloat16
    ours_mod = RMSNorm(d, scale_offset=offset, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours_mod = eqx.tree_at(lambda m: m.scale, ours_mod, jnp.asarray(w.float().numpy(), jnp.bfloat16))
    ours = ours_mod(jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16 and ours_mod.scale.dtype == jnp.bfloat16
    ulps = bf16_ulps(np.asarray(ours, np.float32), ref.float().numpy())
    print(
        f"bf16 RMSNorm offset={offset} {shape}: max {ulps.max()} ulp, "
        f"{np.count_nonzero(ulps)}/{ulps.size} elements differ"
    )
    assert ulps.max() <= (2 if offset == 0.0 else 1)
    assert np.count_nonzero(ulps) <= ulps.size // 100


@pytest.mark.parametrize(
    "make",
    [
        lambda: RMSNorm(16),
        lambda: RMSNorm(16, scale_offset=1.0),
        lambda: LayerNorm(16),
        lambda: GatedRMSNorm(16),
    ],
    ids=["RMSNorm", "RMSNorm_offset", "LayerNorm", "GatedRMSNorm"],
)
def test_wrong_feature_size_raises_value_error(make):
    """A last dim that differs from num_features raises ValueError naming both sizes."""
    norm = make()
    x = jnp.ones((2, 3, 12))
    with pytest.raises(ValueError, match=r"16.*\(2, 3, 12\)"):
        norm(x, x) if isinstance(norm, GatedRMSNorm) else norm(x)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: RMSNorm(16)(x),
        lambda x: LayerNorm(16)(x),
        lambda x: GatedRMSNorm(16)(x, x),
        lambda x: L2Norm()(x),
        lambda x: l2norm(x),
    ],
    ids=["RMSNorm", "LayerNorm", "GatedRMSNorm", "L2Norm", "l2norm"],
)
def test_scalar_input_raises_type_check_error(call):
    """A scalar has no feature axis: jaxtyping rejects it before the body runs."""
    with pytest.raises(jaxtyping.TypeCheckError):
        call(jnp.ones(()))


def test_gated_rmsnorm_gate_shape_mismatch_raises():
    """x and gate must share one shape (both annotated `*batch features`)."""
    with pytest.raises(jaxtyping.TypeCheckError):
        GatedRMSNorm(16)(jnp.ones((2, 16)), jnp.ones((3, 16)))


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm, GatedRMSNorm])
def test_bad_constructor_arguments(cls):
    """num_features <= 0 or eps < 0 raise ValueError."""
    with pytest.raises(ValueError):
        cls(0)
    with pytest.raises(ValueError):
        cls(8, eps=-1.0)


@pytest.mark.parametrize("gated", [False, True], ids=["RMSNorm", "GatedRMSNorm"])
def test_bf16_scale_gradient_is_summed_in_float32(rng, gated):
    """With bf16 compute, the float32 scale's gradient over 16,384 rows vs float64 NumPy, tol 1e-5 (float32
    summation). Rows of +-1 normalise to exactly +-1 in bf16 and a gate of 32 has silu exactly 32, so every
    per-row term is exact and only the sum can err; summed in bf16, as before `cast_broadcast`, it was ~1e-2 off."""
    norm = GatedRMSNorm(8, dtype=jnp.bfloat16) if gated else RMSNorm(8, dtype=jnp.bfloat16)
    signs = rng.choice([-1.0, 1.0], (4, 4096, 8))
    x = jnp.asarray(signs, jnp.float32)
    cotangent = jnp.asarray(rng.uniform(0.5, 1.5, (4, 4096, 8)), jnp.bfloat16).astype(jnp.float32)
    gate = jnp.full(x.shape, 32.0, jnp.float32)
    call = (lambda m: m(x, gate)) if gated else (lambda m: m(x))
    grad = jax.grad(lambda m: jnp.sum(call(m).astype(jnp.float32) * cotangent))(norm)
    ref = (signs * np.asarray(cotangent, np.float64) * (32.0 if gated else 1.0)).sum((0, 1))
    assert grad.scale.dtype == jnp.float32
    assert_close(grad.scale, ref, 1e-5, f"bf16 {type(norm).__name__} scale gradient")
