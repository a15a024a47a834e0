"""Batch-1 greedy decode of a Qwen3-0.6B-shaped model (random weights, bf16) after a 1024-token prompt with
`em.generate`: decode tokens/s (from two generation lengths, so the prefill cancels), end-to-end tokens/s, and
the HBM bandwidth limit (parameter bytes + KV-cache bytes read per token, vs the device's bandwidth) beside it.
The model is unrolled once beforehand, as a sampling loop or server holds it, so no call copies its weights.

    python benchmarks/decode.py [--small] [--prompt 1024] [--new-tokens 32 288] [--record]
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import common
import eqx_models as em


def bytes_per_token(model: eqx.Module, cache_length: int) -> tuple[int, int]:
    """`(parameter bytes, KV-cache bytes)` one decode step reads: every parameter once and the whole cache
    buffer, which `generate` allocates `prompt + new tokens` long and attends over in full."""
    params = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    cfg = model.config
    itemsize = jnp.dtype(cfg.dtype).itemsize
    cache = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize * cache_length
    return params, cache


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=1, iters=5)
    p.add_argument("--prompt", type=int, default=None, help="default 1024 (32 with --small)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                   help="two generation lengths; their time difference gives the decode rate (default 32 288, "
                        "4 20 with --small)")
    p.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
    args = p.parse_args(argv)
    common.check_counts(args)
    prompt = args.prompt or (32 if args.small else 1024)
    short, long = args.new_tokens or ((4, 20) if args.small else (32, 288))
    if not 0 < short < long:
        raise SystemExit(f"--new-tokens needs 0 < SHORT < LONG, got {short} {long}")
    shape = common.TINY_QWEN3 if args.small else {}
    cfg = em.Qwen3Config(**shape, dtype=args.dtype, param_dtype=args.dtype)
    key = jax.random.key(args.seed)
    model = em.Qwen3ForCausalLM(cfg, key=key)
    model = eqx.tree_at(lambda m: m.transformer, model, model.transformer.unroll())
    env = common.jax_environment()

    def make_inputs(i):
        return (jax.random.randint(jax.random.fold_in(key, i), (1, prompt), 0, cfg.vocab_size, jnp.int32),)

    seconds = {}
    for new in (short, long):
        seconds[new], _ = common.time_runs(lambda ids, new=new: em.generate(model, ids, new), make_inputs,
                                           warmup=args.warmup, iters=args.iters)
    # None when noise swamps the difference (tiny --small models on a busy CPU)
    extra_time = seconds[long] - seconds[short]
    decode_rate = (long - short) / extra_time if extra_time > 0 else None
    params, cache = bytes_per_token(model, prompt + long)
    bandwidth = common.hbm_bandwidth(env["device"])
    limit = None if bandwidth is None else bandwidth / (params + cache)
    config = {"model": "tiny" if args.small else "Qwen3-0.6B", "batch": 1, "prompt": prompt,
              "new_tokens": [short, long], "dtype": args.dtype}
    emit = lambda name, figure, unit, **kw: common.emit("decode", name, figure, unit, config, env, args, **kw)  # noqa: E731
    emit("decode_tokens_per_s", decode_rate, "tok/s", bandwidth_limit_tok_s=limit,
         percent_of_limit=None if limit is None or decode_rate is None else 100 * decode_rate / limit,
         param_bytes=params, cache_bytes_per_token=cache, hbm_bytes_per_s=bandwidth)
    emit("end_to_end_tokens_per_s", long / seconds[long], "tok/s", seconds=seconds[long])
    emit("bandwidth_limit", limit, "tok/s", param_bytes=params, cache_bytes_per_token=cache,
         hbm_bytes_per_s=bandwidth)


if __name__ == "__main__":
    main()
