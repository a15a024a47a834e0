"""`RoutedMoE` forward+backward at Qwen3-30B-A3B shapes (hidden 2048, expert width 768, 128 experts, top-8),
8192 tokens, bf16 compute: the compute paths ("auto", "sorted", "grouped", "grouped_pallas": interpreted off GPU,
"dense"), balanced and skewed routing, with and without an expert capacity (dropless: `capacity_factor` none).
TFLOP/s counts the expert matmuls of the (token, expert) pairs kept (6 * hidden * width flops each forward, 3x
that forward+backward); the drop fraction and load imbalance are printed beside it.

    python benchmarks/moe.py [--small] [--impls auto sorted grouped grouped_pallas dense]
                             [--routings balanced skewed] [--capacity-factors 1.25 none] [--record]

"balanced" is a random router on random tokens. "skewed" steers routing through the inputs: every token gets a
shared component `a * u` and the router's columns get `u * bias_e / a`, which adds a Zipf-like
`bias_e = -log(1 + e)` to expert e's logit, so a few experts take many times their share.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import common
from eqx_models.layers.moe import RoutedMoE, expert_capacity

# The dense path's one-hot dispatch tensor is [tokens, experts, capacity]; beyond this many elements skip it.
DENSE_DISPATCH_LIMIT = 2**31
SHARED_SCALE = 8.0


def skew(moe: RoutedMoE, direction: jax.Array, routing: str) -> RoutedMoE:
    """`moe` with router columns shifted so that tokens carrying `SHARED_SCALE * direction` get `bias_e` added
    to expert e's logit."""
    if routing == "balanced":
        return moe
    bias = -jnp.log1p(jnp.arange(moe.num_experts, dtype=jnp.float32))
    kernel = moe.gate.kernel + jnp.outer(direction, bias).astype(moe.gate.kernel.dtype) / SHARED_SCALE
    return eqx.tree_at(lambda m: m.gate.kernel, moe, kernel)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=2, iters=10)
    impls = ["auto", "sorted", "grouped", "grouped_pallas", "dense"]
    p.add_argument("--impls", nargs="+", default=impls, choices=impls)
    p.add_argument("--routings", nargs="+", default=["balanced", "skewed"], choices=["balanced", "skewed"])
    p.add_argument("--capacity-factors", nargs="+", default=["1.25", "none"],
                   help="expert capacity factors; 'none' is dropless (capacity = tokens)")
    p.add_argument("--tokens", type=int, default=None, help="default 8192 (256 with --small)")
    p.add_argument("--hidden", type=int, default=None, help="default 2048 (64 with --small)")
    p.add_argument("--expert-width", type=int, default=None, help="default 768 (32 with --small)")
    p.add_argument("--experts", type=int, default=None, help="default 128 (16 with --small)")
    p.add_argument("--top-k", type=int, default=None, help="default 8 (4 with --small)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    args = p.parse_args(argv)
    common.check_counts(args)
    small = args.small
    tokens, hidden = args.tokens or (256 if small else 8192), args.hidden or (64 if small else 2048)
    width, experts = args.expert_width or (32 if small else 768), args.experts or (16 if small else 128)
    top_k = args.top_k or (4 if small else 8)
    try:
        factors = [None if f.lower() == "none" else float(f) for f in args.capacity_factors]
    except ValueError:
        raise SystemExit(f"--capacity-factors takes numbers or 'none', got {args.capacity_factors}") from None
    dtype = jnp.dtype(args.dtype)
    env = common.jax_environment()
    key = jax.random.key(args.seed)
    direction = jax.random.normal(jax.random.fold_in(key, 2**20), (hidden,), jnp.float32)
    direction = direction / jnp.linalg.norm(direction)

    def make_inputs(i, moe, routing):
        kx, kd = jax.random.split(jax.random.fold_in(key, i))
        x = jax.random.normal(kx, (tokens, hidden), jnp.float32)
        if routing == "skewed":
            x = x + SHARED_SCALE * direction
        return moe, x.astype(dtype), jax.random.normal(kd, (tokens, hidden), dtype)

    @eqx.filter_jit
    def fwd_bwd(moe, x, dy):
        (_, stats), vjp = eqx.filter_vjp(lambda moe, x: moe(x), moe, x)
        zeros = jax.tree.map(jnp.zeros_like, stats)
        return vjp((dy, zeros)), stats.expert_counts

    for impl in args.impls:
        for factor in factors:
            capacity = expert_capacity(tokens, top_k, experts, factor)
            for routing in args.routings:
                config = {"tokens": tokens, "hidden": hidden, "expert_width": width, "experts": experts,
                          "top_k": top_k, "impl": impl, "routing": routing, "capacity_factor": factor,
                          "capacity": capacity, "dtype": args.dtype, "param_dtype": args.param_dtype}
                if impl == "dense" and tokens * experts * capacity > DENSE_DISPATCH_LIMIT:
                    common.emit("moe", f"{impl}_fwd_bwd", None, "TFLOP/s", config, env, args,
                                skipped=f"dense dispatch tensor [{tokens}, {experts}, {capacity}] is too large")
                    continue
                moe = RoutedMoE(hidden, width, experts, top_k, norm_topk_prob=True, impl=impl,
                                capacity_factor=factor, dtype=dtype, param_dtype=args.param_dtype,
                                key=jax.random.fold_in(key, 1))
                moe = skew(moe, direction, routing)
                inputs = lambda i, moe=moe, routing=routing: make_inputs(i, moe, routing)  # noqa: E731
                seconds, error = common.time_or_error(fwd_bwd, inputs, warmup=args.warmup, iters=args.iters)
                if error:
                    common.emit("moe", f"{impl}_fwd_bwd", None, "TFLOP/s", config, env, args, error=error)
                    continue
                counts = np.asarray(fwd_bwd(*inputs(0))[1])
                kept = float(np.minimum(counts, capacity).sum())
                flops = 3 * 6 * hidden * width * kept
                common.emit("moe", f"{impl}_fwd_bwd", flops / seconds / 1e12, "TFLOP/s", config, env, args,
                            ms=seconds * 1e3, dropped_fraction=1 - kept / (tokens * top_k),
                            max_over_mean_load=float(counts.max() / counts.mean()))


if __name__ == "__main__":
    main()
