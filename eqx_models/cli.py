"""The `eqx-models` command: `train` a tiny Qwen3 on bundled text, `generate` from a checkpoint, `convert`.

Text is byte-level (token = UTF-8 byte, vocab 256), so nothing needs a tokenizer download.
"""

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import eqx_models
from eqx_models import partitioning
from eqx_models.config import RUNTIME_FIELDS
from eqx_models.hf import CONFIG_FILE, MODELS, is_checkpoint_file, read_json

CAUSAL_LMS = ("qwen3", "qwen3_moe", "qwen3_next")
TINY = dict(
    vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10_000.0,
)
RUN_CONFIG = "eqx_models_config.json"
LOSS_LOG = "losses.jsonl"


class CLIError(Exception):
    """A problem to report as one line, without a traceback."""


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Byte ids to text; an id past the bytes (a converted HF model's vocabulary) shows as U+FFFD."""
    return b"".join(bytes([i]) if i < 256 else "\ufffd".encode() for i in map(int, ids)).decode("utf-8", "replace")


def bundled_corpus() -> str:
    return resources.files("eqx_models").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")


def _load_config(model: str):
    if model == "tiny":
        return eqx_models.Qwen3Config(**TINY)
    path = Path(model)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise CLIError(f"--model must be 'tiny' or a config JSON file; {model} {why}")
    data = read_json(path)
    try:
        return _config_class(data.get("model_type", "qwen3")).from_hf_dict(data)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"{path} is not a usable config: {e}") from None


def _config_class(model_type: str):
    """The config class of a causal LM `model_type` (the `eqx-models` command trains text-only models)."""
    if model_type not in CAUSAL_LMS:
        raise CLIError(f"model_type {model_type!r} is not a causal LM this command trains; use one of {CAUSAL_LMS}")
    return MODELS[model_type][0]


def _model_class(cfg):
    return MODELS[cfg.model_type][1]


def _save_run_config(out: Path, cfg) -> None:
    data = {"model_type": cfg.model_type, **dataclasses.asdict(cfg)}
    (out / RUN_CONFIG).write_text(json.dumps(data, indent=2) + "\n")


def _read_run_config(checkpoint: Path):
    """The config a run directory was saved with (any model `convert` writes, not only causal LMs)."""
    if not checkpoint.is_dir():
        raise CLIError(f"checkpoint directory {checkpoint} does not exist")
    file = checkpoint / RUN_CONFIG
    if not file.exists():
        raise CLIError(f"{checkpoint} is not an eqx-models checkpoint directory (no {RUN_CONFIG})")
    data = read_json(file)
    model_type = data.pop("model_type", None)
    if model_type not in MODELS:
        raise CLIError(f"{file}: model_type {model_type!r} is not supported; supported: {sorted(MODELS)}")
    try:
        return _config_from_fields(MODELS[model_type][0], data)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{file} is not a usable config: {e}") from None


def _config_from_fields(cls, data: dict):
    """`cls` from what `dataclasses.asdict` gave for it, nested configs (the Omni thinker's) included."""
    kinds = {field.name: field.type for field in dataclasses.fields(cls)}
    return cls(**{name: _config_from_fields(kinds[name], value) if dataclasses.is_dataclass(kinds.get(name))
                  else value for name, value in data.items()})


def _differing_fields(given, saved) -> list[str]:
    """The model fields (not the runtime ones a config.json leaves at their defaults) that differ."""
    if type(given) is not type(saved):
        return ["model_type"]
    return [f.name for f in dataclasses.fields(given)
            if f.compare and f.name not in RUNTIME_FIELDS and getattr(given, f.name) != getattr(saved, f.name)]


def _train_config(args: argparse.Namespace, out: Path):
    """`--model`, except that a resumed run keeps its saved config (an explicit `--model` must match it)."""
    saved = _read_run_config(out) if args.resume and (out / RUN_CONFIG).exists() else None
    if saved is None:
        return _load_config(args.model or "tiny")
    _config_class(saved.model_type)
    if args.model is not None:
        differing = _differing_fields(_load_config(args.model), saved)
        if differing:
            raise CLIError(f"--model {args.model} differs from the config of the run being resumed "
                           f"({out / RUN_CONFIG}) in {', '.join(differing)}; leave out --model to resume with it")
    return saved


def _loss_history(path: Path, upto: int) -> dict[int, float]:
    """Step -> loss logged in `path` up to step `upto` (the one resumed from), and `path` cut back to those: steps
    logged after the last save are trained again."""
    history = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                step, loss = int(entry["step"]), float(entry["loss"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash mid-write
            if step <= upto:
                history[step] = loss
    path.write_text("".join(json.dumps({"step": step, "loss": loss}) + "\n" for step, loss in sorted(history.items())))
    return history


def _plot_losses(history: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [history[step] for step in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("eqx-models train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C inside waits until the block is done, then raises: a checkpoint is never left half-written or
    half-pruned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def _resume(checkpointer, model, opt_state, quiet: bool):
    """The latest step of `checkpointer`; a step without optimizer state (one `convert` wrote from HF) gives its
    model with the fresh `opt_state`, so a converted checkpoint can be fine-tuned. The fresh state's learning-rate
    schedule starts at the restored step, where the loop goes on; Adam's moments and bias correction start anew."""
    if checkpointer.has_opt_state():
        return checkpointer.restore(model, opt_state)
    import jax
    import jax.numpy as jnp
    import optax

    restored = checkpointer.restore(model)
    if not quiet:
        print(f"eqx-models: step {restored.step} in {checkpointer.directory} has no optimizer state (a converted "
              "checkpoint); starting a fresh one", file=sys.stderr)
    opt_state = optax.tree_utils.tree_set(
        opt_state, lambda path, _: any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path),
        count=jnp.asarray(restored.step, jnp.int32))
    # committed to a device like the restored model, or the second step compiles again
    return restored._replace(opt_state=jax.device_put(opt_state, jax.local_devices()[0]))


def cmd_train(args: argparse.Namespace) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from eqx_models.checkpoint import Checkpointer
    from eqx_models.training import make_optimizer, make_train_step

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    cfg = _train_config(args, out)
    if args.data:
        path = Path(args.data)
        if path.is_dir():
            raise CLIError(f"--data {path} is a directory; give a UTF-8 text file")
        if not path.is_file():
            raise CLIError(f"--data {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
    else:
        text = bundled_corpus()
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    if data.size < args.seq_len + 1:
        raise CLIError(f"the corpus has {data.size} bytes, fewer than --seq-len {args.seq_len} + 1")
    if cfg.vocab_size < 256:
        raise CLIError(f"byte-level training needs vocab_size >= 256, the config has {cfg.vocab_size}")

    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(args.seed)
    model_key, key = jax.random.split(key)
    model = _model_class(cfg)(cfg, key=model_key)
    optimizer = make_optimizer(args.lr, total_steps=args.steps, warmup_steps=min(50, args.steps // 10))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step_fn = make_train_step(optimizer)
    rng = np.random.default_rng(args.seed)
    starts_all = rng.integers(0, data.size - args.seq_len, size=(args.steps, args.batch_size))
    tokens_per_step = args.batch_size * args.seq_len
    with Checkpointer(out / "checkpoints", max_to_keep=2) as checkpointer:
        start = 0
        if checkpointer.latest_step() is not None:
            if not args.resume:
                raise CLIError(f"{out} already holds checkpoints; pass --resume to continue that run or a new --out")
            restored = _resume(checkpointer, model, opt_state, args.quiet)
            model, opt_state, start = restored.model, restored.opt_state, restored.step
            key = key if restored.key is None else restored.key
        _save_run_config(out, cfg)
        history = _loss_history(out / LOSS_LOG, start)
        with open(out / LOSS_LOG, "a") as log, tqdm(range(start, args.steps), initial=start, total=args.steps,
                                                     desc="train", unit="step", disable=args.quiet) as bar:
            tick = time.perf_counter()
            for step in bar:
                windows = starts_all[step][:, None] + np.arange(args.seq_len)[None, :]
                batch = {"input_ids": jnp.asarray(data[windows])}
                model, opt_state, metrics = step_fn(model, opt_state, batch, jax.random.fold_in(key, step))
                loss = history[step + 1] = float(metrics["loss"])
                log.write(json.dumps({"step": step + 1, "loss": loss}) + "\n")
                log.flush()
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / max(now - tick, 1e-9):,.0f}")
                tick = now
                if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                    with _interrupts_held():
                        checkpointer.save(step + 1, model, opt_state, key=key,
                                          metadata={"losses_tail": [history[s] for s in sorted(history)[-10:]]})
    trained = args.steps - start
    if trained > 0:
        _plot_losses(history, out / "loss.png")
        span = f"{trained} step{'s' * (trained != 1)}" + (f" after resuming at step {start}" if start else "")
        print(f"loss {history[start + 1]:.3f} -> {history[args.steps]:.3f} over {span}; checkpoint in "
              f"{out / 'checkpoints'}, loss curve of steps {min(history)}-{max(history)} in {out / 'loss.png'}")
    sample = _generate_text(model, args.prompt, 120, 0.8, args.seed)
    print(f"sample: {args.prompt}{sample}")


def _generate_text(model, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    import jax
    import jax.numpy as jnp

    from eqx_models.generation import generate

    ids = encode(prompt)
    out = generate(model, jnp.asarray([ids], jnp.int32), max_new_tokens, temperature, jax.random.key(seed))
    return decode(out[0, len(ids):])


def _restore_model(checkpoint: Path, cfg):
    import equinox as eqx
    import jax

    from eqx_models.checkpoint import Checkpointer

    like = eqx.filter_eval_shape(_model_class(cfg), cfg, key=jax.random.key(0))
    with Checkpointer(checkpoint / "checkpoints") as checkpointer:
        if checkpointer.latest_step() is None:
            raise CLIError(f"no saved step in {checkpoint / 'checkpoints'}")
        return checkpointer.restore(like).model


def cmd_generate(args: argparse.Namespace) -> None:
    checkpoint = Path(args.checkpoint)
    cfg = _read_run_config(checkpoint)
    if cfg.model_type not in CAUSAL_LMS:
        raise CLIError(f"{checkpoint} holds a {cfg.model_type} model; generate samples text from "
                       f"{', '.join(CAUSAL_LMS)} models only (convert it to HF to use it)")
    model = _restore_model(checkpoint, cfg)
    print(args.prompt + _generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.seed))


def _checkpoint_entries(directory: Path) -> list[str]:
    """The entries of `directory` that belong to an HF checkpoint or an eqx-models run (other files are kept)."""
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir()
                  if is_checkpoint_file(entry.name) or entry.name in (RUN_CONFIG, "checkpoints"))


def cmd_partition(args: argparse.Namespace) -> None:
    mesh = partitioning.abstract_mesh(args.mesh)
    table = f"# model: {args.model}\n" + partitioning.sharding_table(partitioning.abstract_model(args.model), mesh)
    if args.output:
        Path(args.output).write_text(table + "\n")
    else:
        sys.stdout.write(table + "\n")


def cmd_convert(args: argparse.Namespace) -> None:
    from eqx_models.checkpoint import Checkpointer

    source, dest = Path(args.source), Path(args.dest)
    if source.resolve().is_relative_to(dest.resolve()) or dest.resolve().is_relative_to(source.resolve()):
        raise CLIError(f"DEST {dest} must not be SOURCE {source}, contain it or lie inside it")
    if (source / CONFIG_FILE).exists():
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise CLIError(f"{dest} already exists and is not empty; convert into a new run directory")
        model = eqx_models.from_pretrained(source)
        dest.mkdir(parents=True, exist_ok=True)
        _save_run_config(dest, model.config)
        with Checkpointer(dest / "checkpoints") as checkpointer:
            checkpointer.save(0, model, force=True)
        print(f"converted HF checkpoint {source} -> eqx-models checkpoint {dest}")
    elif (source / RUN_CONFIG).exists():
        held = _checkpoint_entries(dest)
        if held:
            raise CLIError(f"{dest} already holds a checkpoint ({', '.join(held)}); convert into a new directory "
                           "or one without a checkpoint")
        eqx_models.save_pretrained(_restore_model(source, _read_run_config(source)), dest)
        print(f"converted eqx-models checkpoint {source} -> HF checkpoint {dest}")
    else:
        raise CLIError(f"{source} is neither an HF checkpoint (config.json) nor an eqx-models one ({RUN_CONFIG})")


BENCHMARKS = ("train_step", "attention", "gated_delta", "moe", "decode", "compile_time", "hf_anchor", "cpu_vs_torch")


def benchmarks_dir(given: str | None = None) -> Path:
    """The benchmark scripts: `--dir`, else `benchmarks/` of the source checkout this package runs from."""
    path = Path(given) if given else Path(__file__).resolve().parent.parent / "benchmarks"
    if not all((path / f"{name}.py").is_file() for name in ("common", *BENCHMARKS)):
        raise CLIError(f"no benchmark scripts in {path}: `bench` needs the source checkout (pip install -e .) "
                       "or --dir pointing at its benchmarks/ folder")
    return path


def cmd_bench(args: argparse.Namespace) -> None:
    import shlex
    import subprocess

    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        raise CLIError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if (args.iters is not None and args.iters < 1) or (args.warmup is not None and args.warmup < 0):
        raise CLIError("--iters must be >= 1 and --warmup >= 0")
    directory = benchmarks_dir(args.dir)
    flags = ["--small"] * args.small + ["--record"] * args.record
    for name in ("warmup", "iters", "results"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    flags += shlex.split(args.script_args)
    failed = []
    for name in args.names or BENCHMARKS:
        print(f"== {name}", flush=True)
        code = subprocess.call([sys.executable, str(directory / f"{name}.py"), *flags])
        if code:
            failed.append(f"{name} (exit {code})")
    if failed:
        raise CLIError(f"benchmark failed: {', '.join(failed)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqx-models", description="MaxText's model stack in Equinox.")
    parser.add_argument("--version", action="version", version=f"eqx-models {eqx_models.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a tiny Qwen3 on bundled text (byte-level), then sample from it")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--out", default="runs/tiny", help="run directory (checkpoints, loss.png, losses.jsonl)")
    train.add_argument("--model", default=None, help="'tiny' (the default) or a Qwen3 / Qwen3-MoE / Qwen3-Next "
                       "config.json; with --resume, the run's saved config unless given")
    train.add_argument("--data", default=None, help="a UTF-8 text file (default: the bundled corpus)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=100)
    train.add_argument("--prompt", default="The lamp was lit ")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint "
                       "(one `convert` wrote from HF: its model, with a fresh optimizer state)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample text from a `train` run directory")
    gen.add_argument("--checkpoint", required=True, help="a run directory written by `eqx-models train`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    convert = sub.add_parser("convert", help="HF checkpoint dir <-> eqx-models run dir (direction from the source)")
    convert.add_argument("source")
    convert.add_argument("dest", help="a new or empty directory (from a run to HF: any directory without a "
                         "checkpoint; its other files are kept)")
    convert.set_defaults(func=cmd_convert)

    partition = sub.add_parser(
        "partition", help="print each parameter's partition spec on a mesh (no devices needed)",
        description="Print the partition spec of every parameter of a model on a mesh (nothing is allocated: the "
                    "model comes from eqx.filter_eval_shape and the mesh is abstract, so no devices are needed).")
    partition.add_argument("--model", default="qwen3-0.6b", help=f"one of {sorted(partitioning.PRESETS)}, or an "
                           "HF checkpoint directory (its config.json)")
    partition.add_argument("--mesh", default="data=2,fsdp=2,tensor=2",
                           help=f"axis sizes, e.g. data=2,fsdp=4 (axes: {', '.join(partitioning.MESH_AXES)})")
    partition.add_argument("--output", help="write the table to this file, not stdout (e.g. a golden file)")
    partition.set_defaults(func=cmd_partition)

    bench = sub.add_parser("bench", help="run benchmark scripts (one JSON line per measurement)",
                           description="Runs benchmarks/NAME.py for each NAME (default: all) from the source "
                                       "checkout; each prints one JSON line per measurement. Default sizes are the "
                                       "GPU workloads; on a CPU pass --small.")
    bench.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(BENCHMARKS)}")
    bench.add_argument("--small", action="store_true", help="tiny shapes that run on a CPU in seconds")
    bench.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    bench.add_argument("--results", default=None, help="the results file --record appends to")
    bench.add_argument("--warmup", type=int, default=None, help="untimed runs first (script default)")
    bench.add_argument("--iters", type=int, default=None, help="timed runs, median reported (script default)")
    bench.add_argument("--dir", default=None, help="the benchmarks/ folder (default: the source checkout's)")
    bench.add_argument("--script-args", default="", metavar="'ARGS'",
                       help="more flags for every script, one quoted string: --script-args='--impls sorted'")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "save_every", "max_new_tokens"):
        if getattr(args, name, 1) < 1:
            print(f"eqx-models: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not 0 <= getattr(args, "seed", 0) < 2**63:
        print("eqx-models: error: --seed must be in [0, 2**63)", file=sys.stderr)
        return 2
    if getattr(args, "prompt", None) == "":
        print("eqx-models: error: --prompt must not be empty", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (CLIError, FileNotFoundError, ValueError) as e:
        print(f"eqx-models: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (f"; run the same command with --resume to continue from the last checkpoint in "
                f"{Path(args.out) / 'checkpoints'}" if args.command == "train" else "")
        print(f"eqx-models: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
