"""Compile time of the full train step at 28 vs 2 layers (Qwen3-0.6B shape): layers are scanned, so the ratio
should stay near 1. Models are abstract (`eqx.filter_eval_shape`), so nothing is allocated.

    python benchmarks/compile_time.py [--small] [--layers 28 2] [--record]
"""

import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import common
import eqx_models as em
from eqx_models.training import make_optimizer, make_train_step


def compile_seconds(cfg: em.Qwen3Config, batch: int, seq: int) -> tuple[float, float]:
    """(trace + lower, compile) wall seconds of a fresh train step; a new function each call, so no cache hits."""
    model = eqx.filter_eval_shape(em.Qwen3ForCausalLM, cfg, key=jax.random.key(0))
    is_abstract = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    params, static = eqx.partition(model, is_abstract)
    optimizer = make_optimizer(1e-4, total_steps=1000, warmup_steps=10)
    floats = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact) else None, params)
    opt_state = jax.eval_shape(optimizer.init, floats)
    train_step = make_train_step(optimizer)

    def step(params, opt_state, input_ids, key):
        model, opt_state, metrics = train_step(eqx.combine(params, static), opt_state, {"input_ids": input_ids}, key)
        return eqx.filter(model, eqx.is_array), opt_state, metrics["loss"]

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    lowered = jax.jit(step).lower(params, opt_state, ids, key)
    mid = time.perf_counter()
    lowered.compile()
    return mid - start, time.perf_counter() - mid


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=0, iters=3)
    p.add_argument("--layers", type=int, nargs=2, default=(28, 2), metavar=("DEEP", "SHALLOW"))
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --small)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --small)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="full")
    args = p.parse_args(argv)
    common.check_counts(args)
    batch = args.batch or (2 if args.small else 8)
    seq = args.seq or (64 if args.small else 2048)
    shape = common.TINY_QWEN3 if args.small else {}
    env = common.jax_environment()
    medians = {}
    for layers in args.layers:
        cfg = em.Qwen3Config(**{**shape, "num_hidden_layers": layers}, dtype=args.dtype, remat_policy=args.remat)
        runs = [compile_seconds(cfg, batch, seq) for _ in range(args.warmup + args.iters)][args.warmup:]
        lower = statistics.median(r[0] for r in runs)
        medians[layers] = statistics.median(r[1] for r in runs)
        config = {"model": "tiny" if args.small else "Qwen3-0.6B", "layers": layers, "hidden": cfg.hidden_size,
                  "batch": batch, "seq": seq, "dtype": args.dtype, "remat": args.remat}
        common.emit("compile_time", "compile", medians[layers], "s", config, env, args, trace_and_lower_s=lower)
    deep, shallow = args.layers
    config = {"model": "tiny" if args.small else "Qwen3-0.6B", "layers": list(args.layers), "batch": batch,
              "seq": seq, "dtype": args.dtype, "remat": args.remat}
    common.emit("compile_time", f"ratio_{deep}_vs_{shallow}", medians[deep] / medians[shallow], "x", config, env, args)


if __name__ == "__main__":
    main()
