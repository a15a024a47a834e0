"""Causal attention at 8 x 4096, 16 query / 8 kv heads, head_dim 128, bf16: forward and forward+backward
TFLOP/s of the kernel the library dispatches to (`select_kernel`: cuDNN fused attention on GPU, the reference
einsum path elsewhere), beside `jax.nn.dot_product_attention` called directly (the anchor; cuDNN on GPU), and the
whole Qwen3-0.6B-shaped `Attention` layer (projections, qk-norm, RoPE) forward+backward.

    python benchmarks/attention.py [--small] [--batch 8] [--seq 4096] [--record]
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import common
from eqx_models.layers.attention import (
    Attention,
    AttentionMask,
    cudnn_attention,
    dot_product_attention,
    select_kernel,
)


def library_attention(query, key, value, segment_ids):
    """The kernel `Attention` runs for a causal mask without cache, chosen the way it chooses; unsegmented, as a
    batch without `segment_ids` is (so cuDNN gets no dense bias)."""
    mask = AttentionMask.build(segment_ids, segmented=False)
    kernel = select_kernel("auto", dtype=query.dtype, head_dim=query.shape[-1], mask=mask)
    scale = query.shape[-1] ** -0.5
    if kernel == "cudnn":
        return cudnn_attention(query, key, value, mask, scale=scale)
    return dot_product_attention(query, key, value, mask, scale=scale)[0]


def forward_and_backward(fn):
    """`(q, k, v, dy) -> (dq, dk, dv)`: one forward and its backward."""

    def run(q, k, v, dy):
        _, vjp = jax.vjp(fn, q, k, v)
        return vjp(dy)

    return jax.jit(run)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=2, iters=10)
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --small)")
    p.add_argument("--seq", type=int, default=None, help="default 4096 (128 with --small)")
    p.add_argument("--heads", type=int, default=None, help="query heads, default 16 (4 with --small)")
    p.add_argument("--kv-heads", type=int, default=None, help="default 8 (2 with --small)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (32 with --small)")
    p.add_argument("--embed", type=int, default=None, help="layer width, default 1024 (64 with --small)")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    common.check_counts(args)
    small = args.small
    batch, seq = args.batch or (2 if small else 8), args.seq or (128 if small else 4096)
    heads, kv_heads = args.heads or (4 if small else 16), args.kv_heads or (2 if small else 8)
    head_dim, embed = args.head_dim or (32 if small else 128), args.embed or (64 if small else 1024)
    dtype = jnp.dtype(args.dtype)
    env = common.jax_environment()
    key = jax.random.key(args.seed)
    segment_ids = jnp.ones((batch, seq), jnp.int32)
    mask = AttentionMask.build(segment_ids, segmented=False)
    kernel = select_kernel("auto", dtype=dtype, head_dim=head_dim, mask=mask)
    anchor = "cudnn" if env["platform"] == "gpu" else "xla"
    config = {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "dtype": args.dtype, "causal": True}
    flops = {"fwd": common.causal_attention_flops(batch, seq, heads, head_dim, backward=False),
             "fwd_bwd": common.causal_attention_flops(batch, seq, heads, head_dim, backward=True)}

    def qkv_inputs(i, with_dy):
        kq, kk, kv, kd = jax.random.split(jax.random.fold_in(key, i), 4)
        q = jax.random.normal(kq, (batch, seq, heads, head_dim), dtype)
        k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), dtype)
        v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), dtype)
        return (q, k, v, jax.random.normal(kd, q.shape, dtype)) if with_dy else (q, k, v)

    def ours(q, k, v):
        return library_attention(q, k, v, segment_ids)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=anchor)

    variants = (("library", ours, kernel), ("anchor", reference, f"jax.nn.dot_product_attention[{anchor}]"))
    for name, fn, what in variants:
        for pass_, timed in (("fwd", jax.jit(fn)), ("fwd_bwd", forward_and_backward(fn))):
            inputs = lambda i, with_dy=pass_ == "fwd_bwd": qkv_inputs(i, with_dy)  # noqa: E731
            seconds, _ = common.time_runs(timed, inputs, warmup=args.warmup, iters=args.iters)
            common.emit("attention", f"{name}_{pass_}", flops[pass_] / seconds / 1e12, "TFLOP/s",
                        {**config, "kernel": what}, env, args, ms=seconds * 1e3)

    layer = Attention(embed, heads, kv_heads, head_dim, use_qk_norm=True, rope_theta=1_000_000.0, dtype=dtype,
                      key=key)

    def layer_inputs(i):
        kx, kd = jax.random.split(jax.random.fold_in(key, 10_000 + i))
        shape = (batch, seq, embed)
        return layer, jax.random.normal(kx, shape, dtype), jax.random.normal(kd, shape, dtype)

    @eqx.filter_jit
    def layer_fwd_bwd(layer, x, dy):
        _, vjp = eqx.filter_vjp(lambda layer, x: layer(x)[0], layer, x)
        return vjp(dy)

    seconds, _ = common.time_runs(layer_fwd_bwd, layer_inputs, warmup=args.warmup, iters=args.iters)
    projections = 2 * batch * seq * embed * head_dim * (2 * heads + 2 * kv_heads)
    layer_flops = 3 * projections + flops["fwd_bwd"]
    common.emit("attention", "layer_fwd_bwd", layer_flops / seconds / 1e12, "TFLOP/s",
                {**config, "embed": embed, "kernel": kernel, "qk_norm": True}, env, args, ms=seconds * 1e3)


if __name__ == "__main__":
    main()
