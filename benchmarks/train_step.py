"""Full AdamW train step of a Qwen3-0.6B-shaped model (random init), batch 8 x 2048, bf16 compute with float32
master weights: tokens/s, MFU (reference/performance.md's formula) and peak device memory (GPU).

    python benchmarks/train_step.py [--small] [--batch 8] [--seq 2048] [--remat full] [--record]
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import common
import eqx_models as em
from eqx_models.training import make_optimizer, make_train_step


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --small)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --small)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--remat", default="full", help="remat policy (eqx_models.config.REMAT_POLICIES)")
    p.add_argument("--loss-chunk", type=int, default=512, help="LM-head / cross-entropy chunk length")
    args = p.parse_args(argv)
    common.check_counts(args)
    batch = args.batch or (2 if args.small else 8)
    seq = args.seq or (64 if args.small else 2048)
    shape = common.TINY_QWEN3 if args.small else {}
    cfg = em.Qwen3Config(**shape, dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat)

    key = jax.random.key(args.seed)
    model = em.Qwen3ForCausalLM(cfg, key=key)
    optimizer = make_optimizer(1e-4, total_steps=10_000, warmup_steps=100)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    train_step = make_train_step(optimizer, chunk_size=args.loss_chunk)
    state = [model, opt_state]

    def run(input_ids, step_key):
        state[0], state[1], metrics = train_step(state[0], state[1], {"input_ids": input_ids}, step_key)
        return metrics["loss"]

    def make_inputs(i):
        k = jax.random.fold_in(key, i + 1)
        return jax.random.randint(k, (batch, seq), 0, cfg.vocab_size, jnp.int32), k

    seconds, error = common.time_or_error(run, make_inputs, warmup=args.warmup, iters=args.iters)
    env = common.jax_environment()
    config = {"model": "tiny" if args.small else "Qwen3-0.6B", "layers": cfg.num_hidden_layers,
              "hidden": cfg.hidden_size, "batch": batch, "seq": seq, "dtype": args.dtype,
              "param_dtype": args.param_dtype, "remat": args.remat, "optimizer": "AdamW"}
    if error is not None:  # out of device memory, as remat "none" at 8 x 2048 is expected to be on an H100
        common.emit("train_step", "step_time", None, "ms", config, env, args, error=error)
        return
    tokens_per_s = batch * seq / seconds
    flops = common.train_flops_per_token(cfg, seq)
    peak = common.peak_flops(env["device"])
    emit = lambda name, figure, unit, **kw: common.emit("train_step", name, figure, unit, config, env, args, **kw)  # noqa: E731
    emit("step_time", seconds * 1e3, "ms")
    emit("tokens_per_s", tokens_per_s, "tok/s", flops_per_token=flops)
    emit("mfu", None if peak is None else 100 * tokens_per_s * flops / peak, "%", peak_flops=peak)
    memory = common.peak_memory_bytes()
    emit("peak_memory", None if memory is None else memory / 1e9, "GB")


if __name__ == "__main__":
    main()
