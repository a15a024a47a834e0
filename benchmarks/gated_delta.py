"""Gated delta rule forward and forward+backward at B=4, T=4096 with Qwen3-Next's linear-attention heads
(16 query/key heads, 32 value heads, dim 128), bf16 inputs (float32 maths inside), for each form of
`eqx_models.layers.gated_delta.gated_delta_rule`: "chunk" (the training path), "chunk_pallas" (its scan over
chunks as Pallas Triton kernels; interpreted off GPU, so its CPU figures mean nothing), "naive_chunk" (HF's
algorithm), "recurrent" (token by token). Anchor on an H100: fla's Triton `chunk_gated_delta_rule` 1.45 / 4.89 ms.

    python benchmarks/gated_delta.py [--small] [--impls chunk chunk_pallas naive_chunk recurrent] [--record]
"""

import jax
import jax.numpy as jnp

import common
from eqx_models.layers.gated_delta import gated_delta_rule

FLA_H100_MS = {"fwd": 1.45, "fwd_bwd": 4.89}


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=2, iters=10)
    p.add_argument("--impls", nargs="+", default=["chunk", "chunk_pallas", "naive_chunk", "recurrent"],
                   choices=["chunk", "chunk_pallas", "naive_chunk", "recurrent"])
    p.add_argument("--batch", type=int, default=None, help="default 4 (1 with --small)")
    p.add_argument("--seq", type=int, default=None, help="default 4096 (128 with --small)")
    p.add_argument("--key-heads", type=int, default=None, help="default 16 (2 with --small)")
    p.add_argument("--value-heads", type=int, default=None, help="default 32 (4 with --small)")
    p.add_argument("--head-dim", type=int, default=None, help="key and value dim, default 128 (16 with --small)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="dtype of q, k, v")
    args = p.parse_args(argv)
    common.check_counts(args)
    small = args.small
    batch, seq = args.batch or (1 if small else 4), args.seq or (128 if small else 4096)
    key_heads, heads = args.key_heads or (2 if small else 16), args.value_heads or (4 if small else 32)
    dim = args.head_dim or (16 if small else 128)
    dtype = jnp.dtype(args.dtype)
    env = common.jax_environment()
    # fla's figures were measured at the default shapes on an H100: beside any other run they would mislead
    anchored = ((batch, seq, key_heads, heads, dim, args.chunk_size, dtype) == (4, 4096, 16, 32, 128, 64, jnp.bfloat16)
                and "H100" in env["device"])
    key = jax.random.key(args.seed)

    def make_inputs(i, with_do):
        kq, kk, kv, kg, kb, kd = jax.random.split(jax.random.fold_in(key, i), 6)
        q = jax.random.normal(kq, (batch, seq, key_heads, dim), dtype)
        k = jax.random.normal(kk, (batch, seq, key_heads, dim), dtype)
        v = jax.random.normal(kv, (batch, seq, heads, dim), dtype)
        # Qwen3-Next's ranges: g = -exp(A) * softplus(a + dt_bias) <= 0, beta = sigmoid(b), both float32
        g = -jax.nn.softplus(jax.random.normal(kg, (batch, seq, heads), jnp.float32))
        beta = jax.nn.sigmoid(jax.random.normal(kb, (batch, seq, heads), jnp.float32))
        inputs = (q, k, v, g, beta)
        return inputs + (jax.random.normal(kd, v.shape, dtype),) if with_do else inputs

    for impl in args.impls:
        def rule(q, k, v, g, beta, impl=impl):
            return gated_delta_rule(q, k, v, g, beta, impl=impl, chunk_size=args.chunk_size)[0]

        def fwd_bwd(q, k, v, g, beta, do, rule=rule):
            _, vjp = jax.vjp(rule, q, k, v, g, beta)
            return vjp(do)

        config = {"batch": batch, "seq": seq, "key_heads": key_heads, "value_heads": heads, "head_dim": dim,
                  "dtype": args.dtype, "impl": impl, "chunk_size": args.chunk_size}
        for pass_, fn in (("fwd", jax.jit(rule)), ("fwd_bwd", jax.jit(fwd_bwd))):
            inputs = lambda i, with_do=pass_ == "fwd_bwd": make_inputs(i, with_do)  # noqa: E731
            seconds, error = common.time_or_error(fn, inputs, warmup=args.warmup, iters=args.iters)
            ms = None if seconds is None else seconds * 1e3
            anchor = FLA_H100_MS[pass_] if anchored else None
            extra = {"error": error} if error else {}
            common.emit("gated_delta", f"{impl}_{pass_}", ms, "ms", config, env, args, fla_h100_ms=anchor,
                        vs_fla=None if anchor is None or ms is None else ms / anchor, **extra)


if __name__ == "__main__":
    main()
