"""Shared helpers for the benchmark scripts: arguments, timing, environment, FLOP accounting, output.

Every measurement is printed as one JSON line (name, config, figure, unit, device, versions, date) and, with
`--record`, appended as a row of `benchmarks/RESULTS.md`. The scripts import this module as `common` (they run
as `python benchmarks/NAME.py`, which puts this folder on `sys.path`).
"""

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
RESULTS_HEADER = """\
# Benchmark results

Rows are appended by `eqx-models bench NAME --record` (or `python benchmarks/NAME.py --record`).

Columns: `date` (UTC) | `benchmark` (script) | `measurement` | `figure` | `unit` | `device` | `versions`
(jax/jaxlib or torch/transformers; cuDNN on GPU) | `config` (shapes and options) | `kind`: `GPU` for real
measurements, `CPU` for real CPU measurements (the CPU rows of the targets table), `CPU smoke (--small)` for rows
that only show a script runs: their figures mean nothing for performance.

| date | benchmark | measurement | figure | unit | device | versions | config | kind |
|---|---|---|---|---|---|---|---|---|
"""

# Dense bf16 peak (datasheet) for MFU, and HBM bandwidth for the decode bound, by device kind substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# H100: device-to-device copy measured at 3.0 TB/s (reference/performance.md); others: datasheet.
HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.8e12, "A100": 2.0e12}
# `--small` model: a few layers of a narrow Qwen3 (the full-size runs use `Qwen3Config()`'s 0.6B defaults).
TINY_QWEN3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def parser(description: str, *, warmup: int = 2, iters: int = 5) -> argparse.ArgumentParser:
    """The flags every benchmark takes; scripts add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--small", action="store_true", help="tiny shapes that run on a CPU in seconds")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed runs first (compilation included)")
    p.add_argument("--iters", type=int, default=iters, help="timed runs; the median is reported")
    p.add_argument("--record", action="store_true", help=f"append the results to {RESULTS.name}")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file --record appends to")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_counts(args: argparse.Namespace) -> None:
    if args.warmup < 0 or args.iters < 1:
        raise SystemExit(f"need --warmup >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")


def _lookup(table: dict[str, float], device: str) -> float | None:
    return next((value for name, value in table.items() if name.lower() in device.lower()), None)


def peak_flops(device: str) -> float | None:
    return _lookup(PEAK_BF16_FLOPS, device)


def hbm_bandwidth(device: str) -> float | None:
    return _lookup(HBM_BYTES_PER_S, device)


def _cudnn_version() -> str | None:
    # Private API that moved between jaxlib releases; the version is informative only.
    for module in ("jax._src.lib", "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
        try:
            lib = __import__(module, fromlist=["cuda_versions"])
            version = lib.cuda_versions.cudnn_get_version()
        except Exception:  # noqa: BLE001
            continue
        if version:
            return str(version)
    return None


def _cpu_device() -> str:
    """Core count and the 1-minute load average at the start: CPU figures from a shared machine depend on it."""
    return f"cpu ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})"


def jax_environment(device: Any = None) -> dict[str, Any]:
    """Device and versions of the rows measured on `device` (default: jax's first)."""
    import jax
    import jaxlib

    device = device or jax.devices()[0]
    env = {"device": device.device_kind if device.platform == "gpu" else _cpu_device(),
           "platform": device.platform, "versions": f"jax {jax.__version__} / jaxlib {jaxlib.__version__}"}
    if device.platform == "gpu":
        cudnn = _cudnn_version()
        if cudnn:
            env["versions"] += f" / cuDNN {cudnn}"
    return env


def torch_environment() -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    env = {"device": torch.cuda.get_device_name(0) if gpu else _cpu_device(),
           "platform": "gpu" if gpu else "cpu",
           "versions": f"torch {torch.__version__} / transformers {transformers.__version__}"}
    if gpu and torch.backends.cudnn.is_available():
        env["versions"] += f" / cuDNN {torch.backends.cudnn.version()}"
    return env


def peak_memory_bytes() -> int | None:
    """Peak device memory of this process (GPU only; `None` where the backend keeps no statistics)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def time_runs(
    fn: Callable[..., Any], make_inputs: Callable[[int], tuple], *, warmup: int, iters: int
) -> tuple[float, list[float]]:
    """Median and all wall times (s) of `fn(*make_inputs(i))` over `iters` runs after `warmup` runs.

    Inputs are made fresh per run and made ready before the clock starts; each run ends with
    `jax.block_until_ready` on its result, so asynchronous dispatch is included in full.
    """
    import jax

    times = []
    for i in range(warmup + iters):
        inputs = jax.block_until_ready(make_inputs(i))
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_or_error(
    fn: Callable[..., Any], make_inputs: Callable[[int], tuple], *, warmup: int, iters: int
) -> tuple[float | None, str | None]:
    """`(median seconds, None)` as `time_runs` gives it, or `(None, first line of the error)` when XLA fails (out
    of device memory, typically), so one variant too big for the device does not stop the others."""
    import jax

    try:
        return time_runs(fn, make_inputs, warmup=warmup, iters=iters)[0], None
    except jax.errors.JaxRuntimeError as e:
        return None, str(e).splitlines()[0][:300]


def time_alternating(
    fns: dict[str, Callable[..., Any]], make_inputs: Callable[[int], dict[str, tuple]], *, warmup: int, iters: int
) -> dict[str, float]:
    """Median wall time (s) of each of `fns`, run in turn each round on that round's fresh inputs
    (`make_inputs(i)[name]`), so load from other processes on a shared machine falls on all of them alike."""
    import jax

    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + iters):
        inputs = make_inputs(i)
        for name, fn in fns.items():
            args = jax.block_until_ready(inputs[name])
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def causal_attention_flops(batch: int, seq: int, heads: int, head_dim: int, *, backward: bool) -> float:
    """FlashAttention's accounting: forward `4 * b * s^2 * h * d / 2` (causal half), backward 2.5x forward."""
    forward = 4 * batch * seq * seq * heads * head_dim / 2
    return forward * (3.5 if backward else 1.0)


def dense_matmul_params(cfg: Any) -> int:
    """Parameters that take part in a matmul per token: attention and MLP projections and the LM head (always
    counted, tied or not); not the embedding lookup or norms."""
    heads, kv, hd, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    attention = hidden * hd * (2 * heads + 2 * kv)
    mlp = 3 * hidden * cfg.intermediate_size
    return cfg.num_hidden_layers * (attention + mlp) + hidden * cfg.vocab_size


def train_flops_per_token(cfg: Any, seq: int) -> float:
    """reference/performance.md: `6 * matmul params + 6 * layers * seq * q_heads * head_dim` (causal half)."""
    return 6 * dense_matmul_params(cfg) + 6 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim


def emit(benchmark: str, name: str, figure: float | None, unit: str, config: dict[str, Any], env: dict[str, Any],
         args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Print one JSON line; with `--record` also append it to RESULTS.md."""
    row = {"benchmark": benchmark, "name": name, "figure": figure, "unit": unit, "config": config, **extra,
           "device": env["device"], "platform": env["platform"], "versions": env["versions"],
           "small": bool(args.small), "warmup": args.warmup, "iters": args.iters,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    print(json.dumps(row), flush=True)
    if args.record:
        record(row, args.results)
    return row


def _format(figure: float | None) -> str:
    if figure is None:
        return "n/a"
    return f"{figure:.4g}" if abs(figure) < 1000 else f"{figure:,.0f}"


def record(row: dict[str, Any], path: Path = RESULTS) -> None:
    """Append `row` (an `emit` result) to the results table, creating the file with its header if needed."""
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    kind = "GPU" if row["platform"] == "gpu" else "CPU"
    if row["small"]:
        kind += " smoke (--small)"
    config = json.dumps(row["config"], separators=(",", ":")).replace("|", "/")
    cells = [row["date"][:10], row["benchmark"], row["name"], _format(row["figure"]), row["unit"], row["device"],
             row["versions"], f"`{config}`", kind]
    with path.open("a") as f:
        f.write("| " + " | ".join(cells) + " |\n")
