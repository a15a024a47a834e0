"""CPU rows of the targets: a Qwen3-0.6B-shaped model (random weights, float32), ours vs HF transformers
(torch eager) on the same weights in the same process: forward of batch 1 x 512, and greedy decode of 64 tokens
after a 128-token prompt. Prints each time and the ratio ours / torch (floors: forward <= 1.5x, decode <= 1.0x).

    python benchmarks/cpu_vs_torch.py [--small] [--seq 512] [--prompt 128] [--new-tokens 64] [--record]

The two sides are timed in turn on the same fresh token ids each round, so load from other processes on a
shared machine falls on both alike. Decode is timed twice on our side: `generate` on the scanned model as built
(each call first unrolls the stacked layers, as views of them on CPU, `decode_ours`) and on a model unrolled once
beforehand (`decode_ours_unrolled`, what a sampling loop or server holds).
"""

import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import common
import eqx_models as em

FLOORS = {"forward": 1.5, "decode": 1.0}


def build_pair(cfg: em.Qwen3Config, seed: int, attn_implementation: str):
    """HF model (random init, eval mode) and ours loaded from its saved checkpoint: the same weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3Config(**cfg.to_hf_dict(), attn_implementation=attn_implementation)
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = em.from_pretrained(tmp, dtype=jnp.float32)
    return hf, ours


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=1, iters=5)
    p.add_argument("--seq", type=int, default=None, help="forward length (default 512, 32 with --small)")
    p.add_argument("--prompt", type=int, default=None, help="decode prompt (default 128, 16 with --small)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (default 64, 8 with --small)")
    p.add_argument("--workloads", nargs="+", default=["forward", "decode"], choices=["forward", "decode"])
    p.add_argument("--attn-implementation", default="sdpa", help="HF attention: sdpa (its default) or eager")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    common.check_counts(args)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):  # the CPU rows on any machine: torch runs on the CPU here too
        run(args, cpu)


def run(args, cpu) -> None:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    seq = args.seq or (32 if args.small else 512)
    prompt = args.prompt or (16 if args.small else 128)
    new_tokens = args.new_tokens or (8 if args.small else 64)
    cfg = em.Qwen3Config(**(common.TINY_QWEN3 if args.small else {}), dtype="float32", param_dtype="float32")
    hf, ours = build_pair(cfg, args.seed, args.attn_implementation)
    env = common.jax_environment(cpu)
    env["versions"] += " vs " + common.torch_environment()["versions"]
    shared = {"model": "tiny" if args.small else "Qwen3-0.6B-shaped", "batch": 1, "dtype": "float32",
              "hf_attention": args.attn_implementation, "torch_threads": torch.get_num_threads()}
    rng = np.random.default_rng(args.seed)

    def emit_pair(workload, times, scale, unit, config, **extra):
        for side in times:
            common.emit("cpu_vs_torch", f"{workload}_{side}", times[side] * scale, unit, config, env, args, **extra)
        for side in (s for s in times if s != "torch"):
            suffix = side.removeprefix("ours")
            common.emit("cpu_vs_torch", f"{workload}_ratio{suffix}", times[side] / times["torch"],
                        f"x ({side} / torch)", config, env, args, floor=FLOORS[workload])

    if "forward" in args.workloads:
        forward = jax.jit(lambda model, ids: model(ids))

        def torch_forward(ids):
            with torch.inference_mode():
                return hf(ids).logits

        def inputs(i):
            ids = rng.integers(0, cfg.vocab_size, (1, seq))
            return {"ours": (ours, jnp.asarray(ids, jnp.int32)), "torch": (torch.from_numpy(ids),)}

        times = common.time_alternating({"ours": forward, "torch": torch_forward}, inputs, warmup=args.warmup,
                                        iters=args.iters)
        emit_pair("forward", times, 1e3, "ms", {**shared, "seq": seq})

    if "decode" in args.workloads:
        outputs = {}
        unrolled = eqx.tree_at(lambda m: m.transformer, ours, ours.transformer.unroll())

        def ours_decode(ids):
            outputs["ours"] = em.generate(ours, ids, new_tokens)
            return outputs["ours"]

        def ours_unrolled_decode(ids):
            outputs["ours_unrolled"] = em.generate(unrolled, ids, new_tokens)
            return outputs["ours_unrolled"]

        def torch_decode(ids):
            with torch.inference_mode():
                outputs["torch"] = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                               min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                               pad_token_id=0)
            return outputs["torch"]

        def inputs(i):
            ids = rng.integers(0, cfg.vocab_size, (1, prompt))
            ours_ids = (jnp.asarray(ids, jnp.int32),)
            return {"ours": ours_ids, "ours_unrolled": ours_ids, "torch": (torch.from_numpy(ids),)}

        times = common.time_alternating(
            {"ours": ours_decode, "ours_unrolled": ours_unrolled_decode, "torch": torch_decode}, inputs,
            warmup=args.warmup, iters=args.iters,
        )
        # Same weights and prompt: greedy tokens agree unless near-tied random logits flip an argmax between two
        # float32 implementations.
        agree = float(np.mean(np.asarray(outputs["ours"])[:, prompt:] == outputs["torch"].numpy()[:, prompt:]))
        if not np.array_equal(outputs["ours"], outputs["ours_unrolled"]):
            raise SystemExit("generate gave different tokens on the scanned and the unrolled model")
        config = {**shared, "prompt": prompt, "new_tokens": new_tokens, "hf": "generate, greedy, dynamic cache"}
        emit_pair("decode", times, 1.0, "s", config, token_agreement=agree)
        for side in times:
            common.emit("cpu_vs_torch", f"end_to_end_tokens_per_s_{side}", new_tokens / times[side], "tok/s",
                        config, env, args)


if __name__ == "__main__":
    main()
