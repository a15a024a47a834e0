"""The HF anchors, run on this machine: HF transformers Qwen3 (torch, random weights) on the workloads of
`train_step.py` and `decode.py`. Train step: AdamW, float32 master weights with bf16 autocast, sdpa attention,
batch 8 x 2048, eager and `torch.compile`; decode: batch-1 greedy `generate` after a 1024-token prompt, bf16.

    python benchmarks/hf_anchor.py [--small] [--workloads train decode] [--modes eager compile] [--record]
"""

import statistics
import time

import common

SMALL_TRAIN = dict(batch=2, seq=64)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_torch(fn, make_inputs, *, warmup: int, iters: int, device) -> float:
    """Median wall seconds of `fn(*make_inputs(i))` over `iters` runs after `warmup`, synchronised."""
    times = []
    for i in range(warmup + iters):
        inputs = make_inputs(i)
        _sync(device)
        start = time.perf_counter()
        fn(*inputs)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_model(cfg, device, dtype, attn_implementation="sdpa"):
    import transformers

    hf_cfg = transformers.Qwen3Config(**cfg.to_hf_dict(), attn_implementation=attn_implementation)
    return transformers.Qwen3ForCausalLM(hf_cfg).to(device=device, dtype=dtype)


def train_step_seconds(args, cfg, device, mode: str, batch: int, seq: int) -> tuple[float, float | None]:
    """Median seconds of one HF train step (forward, backward, clipping, AdamW) and the peak GPU memory (GB)."""
    import torch

    torch.manual_seed(args.seed)
    model = hf_model(cfg, device, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    forward = torch.compile(model) if mode == "compile" else model

    def step(ids):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    generator = torch.Generator().manual_seed(args.seed)

    def make_inputs(i):
        return (torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator).to(device),)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_torch(step, make_inputs, warmup=args.warmup, iters=args.iters, device=device)
    return seconds, torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def train(args, cfg, device, env) -> None:
    import torch

    batch = args.batch or (SMALL_TRAIN["batch"] if args.small else 8)
    seq = args.seq or (SMALL_TRAIN["seq"] if args.small else 2048)
    flops = common.train_flops_per_token(cfg, seq)
    peak = common.peak_flops(env["device"])
    for mode in args.modes:
        seconds, memory = train_step_seconds(args, cfg, device, mode, batch, seq)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tokens_per_s = batch * seq / seconds
        config = {"model": "tiny" if args.small else "Qwen3-0.6B", "batch": batch, "seq": seq, "mode": mode,
                  "precision": "fp32 master + bf16 autocast", "attention": "sdpa", "optimizer": "AdamW"}
        common.emit("hf_anchor", f"train_{mode}_tokens_per_s", tokens_per_s, "tok/s", config, env, args,
                    step_ms=seconds * 1e3, flops_per_token=flops)
        common.emit("hf_anchor", f"train_{mode}_mfu", None if peak is None else 100 * tokens_per_s * flops / peak,
                    "%", config, env, args)
        common.emit("hf_anchor", f"train_{mode}_peak_memory", memory, "GB", config, env, args)


def decode(args, cfg, device, env) -> None:
    import torch

    prompt = args.prompt or (32 if args.small else 1024)
    short, long = args.new_tokens or ((4, 12) if args.small else (8, 40))
    if not 0 < short < long:
        raise SystemExit(f"--new-tokens needs 0 < SHORT < LONG, got {short} {long}")
    torch.manual_seed(args.seed)
    model = hf_model(cfg, device, torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(args.seed)

    def make_inputs(i):
        return (torch.randint(0, cfg.vocab_size, (1, prompt), generator=generator).to(device),)

    seconds = {}
    for new in (short, long):
        def run(ids, new=new):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

        seconds[new] = time_torch(run, make_inputs, warmup=args.warmup, iters=args.iters, device=device)
    config = {"model": "tiny" if args.small else "Qwen3-0.6B", "batch": 1, "prompt": prompt,
              "new_tokens": [short, long], "dtype": "bfloat16", "mode": "eager generate, dynamic cache"}
    extra_time = seconds[long] - seconds[short]
    common.emit("hf_anchor", "decode_tokens_per_s", (long - short) / extra_time if extra_time > 0 else None,
                "tok/s", config, env, args)
    common.emit("hf_anchor", "decode_end_to_end_tokens_per_s", long / seconds[long], "tok/s", config, env, args)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0], warmup=2, iters=5)
    p.add_argument("--workloads", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="train step without / with torch.compile")
    p.add_argument("--batch", type=int, default=None,
                   help=f"train batch, default 8 ({SMALL_TRAIN['batch']} with --small)")
    p.add_argument("--seq", type=int, default=None,
                   help=f"train length, default 2048 ({SMALL_TRAIN['seq']} with --small)")
    p.add_argument("--prompt", type=int, default=None, help="decode prompt, default 1024 (32 with --small)")
    p.add_argument("--new-tokens", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                   help="decode lengths; their time difference gives the decode rate "
                        "(default 8 40, 4 12 with --small)")
    args = p.parse_args(argv)
    common.check_counts(args)
    import torch

    import eqx_models as em

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = em.Qwen3Config(**(common.TINY_QWEN3 if args.small else {}))
    env = common.torch_environment()
    if "train" in args.workloads:
        train(args, cfg, device, env)
    if "decode" in args.workloads:
        decode(args, cfg, device, env)


if __name__ == "__main__":
    main()
