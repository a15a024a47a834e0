"""Every benchmark script at tiny sizes on the CPU, so none can rot: one JSON line per measurement with the
common schema, one RESULTS row per line (in a temporary file, never the real one), and the `eqx-models bench`
command's forwarding and errors."""

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--small", "--warmup", "1", "--iters", "1", "--record"]
# Script flags beyond TINY; the slowest variants are trimmed (every code path still runs at least once).
CASES = {
    "train_step": ["--remat", "none"],
    "attention": [],
    "gated_delta": ["--seq", "64", "--impls", "chunk", "chunk_pallas"],
    "moe": ["--tokens", "64", "--capacity-factors", "2.0"],
    "decode": [],
    "compile_time": ["--warmup", "0", "--layers", "3", "1", "--batch", "1", "--seq", "16", "--remat", "none"],
    "hf_anchor": ["--modes", "eager"],
    "cpu_vs_torch": ["--seq", "16", "--prompt", "8", "--new-tokens", "4"],
}
KEYS = {"benchmark", "name", "figure", "unit", "config", "device", "platform", "versions", "small", "warmup",
        "iters", "date"}


def load(name: str):
    """The script as a module; its folder goes on sys.path, as `python benchmarks/NAME.py` puts it."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_knows_every_script():
    from eqx_models.cli import BENCHMARKS as NAMES, benchmarks_dir

    assert benchmarks_dir() == BENCHMARKS
    assert set(NAMES) == set(CASES) == {p.stem for p in BENCHMARKS.glob("*.py")} - {"common"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_benchmark_runs_small(name, tmp_path, capsys):
    import jax

    results = tmp_path / "RESULTS.md"
    # The scripts run as `python benchmarks/NAME.py`, i.e. under JAX's standard promotion, not the suite's strict
    # one (optax's Adam bias correction computes `float ** int32` and fails under strict).
    with jax.numpy_dtype_promotion("standard"):
        load(name).main([*TINY, *CASES[name], "--results", str(results)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines, f"{name} printed no JSON line"
    for row in lines:
        assert KEYS <= set(row), f"{name}: missing keys {KEYS - set(row)}"
        assert row["benchmark"] == name and row["platform"] == "cpu" and row["small"] is True
        assert isinstance(row["config"], dict) and row["config"]
        assert row["figure"] is None or (isinstance(row["figure"], float) and math.isfinite(row["figure"]))
        assert row["date"].startswith("20") and row["date"].endswith("Z")
    assert any(row["figure"] is not None for row in lines)
    table = [line for line in results.read_text().splitlines() if line.startswith(f"| {lines[0]['date'][:10]} |")]
    assert [cells.split(" | ")[1:3] for cells in table] == [[name, row["name"]] for row in lines]
    assert all(line.rstrip(" |").endswith("CPU smoke (--small)") for line in table)


def test_record_appends_under_one_header(tmp_path):
    common = load("common")
    results = tmp_path / "RESULTS.md"
    row = {"benchmark": "x", "name": "y", "figure": 12345.6, "unit": "tok/s", "config": {"a|b": 1},
           "platform": "gpu", "small": False, "device": "H100", "versions": "jax", "date": "2026-11-23T00:00:00Z"}
    common.record(row, results)
    common.record({**row, "figure": None, "platform": "cpu"}, results)
    text = results.read_text()
    assert text.count("| date | benchmark |") == 1
    rows = text.splitlines()[-2:]
    assert rows[0].startswith("| 2026-11-23 | x | y | 12,346 | tok/s | H100 | jax |") and rows[0].endswith("| GPU |")
    assert "| n/a |" in rows[1] and rows[1].endswith("| CPU |")
    assert all(line.count(" | ") == 8 for line in rows), "a '|' inside the config broke the table"


def test_shared_formulas():
    """Hand-derived figures for the FLOP accounting of reference/performance.md."""
    common = load("common")
    # causal attention forward 4*b*s^2*h*d/2; fwd+bwd 3.5x
    assert common.causal_attention_flops(2, 8, 3, 4, backward=False) == 4 * 2 * 64 * 3 * 4 / 2
    assert common.causal_attention_flops(2, 8, 3, 4, backward=True) == 3.5 * 4 * 2 * 64 * 3 * 4 / 2
    import eqx_models as em

    cfg = em.Qwen3Config()  # Qwen3-0.6B: 28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, vocab 151936
    per_layer = 1024 * 128 * (16 + 8 + 8 + 16) + 3 * 1024 * 3072
    assert common.dense_matmul_params(cfg) == 28 * per_layer + 1024 * 151936 == 595_984_384
    assert common.train_flops_per_token(cfg, 2048) == 6 * 595_984_384 + 6 * 28 * 2048 * 16 * 128


def run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "eqx_models.cli", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_forwards_flags_and_reports_failures(tmp_path):
    """`bench` runs each named script with the shared flags and `--script-args`, in order; a failing script is
    named in one error line (exit 2) after the others ran."""
    (tmp_path / "common.py").write_text("")
    from eqx_models.cli import BENCHMARKS as NAMES

    for name in NAMES:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""\
            import json, sys
            print(json.dumps({{"script": {name!r}, "argv": sys.argv[1:]}}))
            sys.exit(3 if {name!r} == "moe" else 0)
        """))
    out = run_cli("decode", "moe", "attention", "--small", "--record", "--iters", "2", "--dir", str(tmp_path),
                  "--script-args=--impls sorted")
    calls = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [c["script"] for c in calls] == ["decode", "moe", "attention"]
    assert calls[0]["argv"] == ["--small", "--record", "--iters", "2", "--impls", "sorted"]
    assert out.returncode == 2
    assert out.stderr.strip() == "eqx-models: error: benchmark failed: moe (exit 3)"


@pytest.mark.parametrize(
    ("args", "message"),
    [(("nope",), "unknown benchmark nope"), (("--dir", "/nonexistent"), "no benchmark scripts in /nonexistent"),
     (("--iters", "0"), "--iters must be >= 1")],
)
def test_cli_errors_are_one_line(args, message, capsys):
    from eqx_models.cli import main

    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err and err.startswith("eqx-models: error:")


def test_timing_helpers():
    """`time_or_error` turns an XLA failure (out of memory) into `(None, its first line)`; `time_alternating`
    gives each function its own inputs every round and reports per-function medians."""
    import jax

    common = load("common")

    def out_of_memory():
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes\nmore detail")

    assert common.time_or_error(out_of_memory, lambda i: (), warmup=0, iters=1) == (
        None, "RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes")
    seen = []
    medians = common.time_alternating(
        {"a": lambda x: seen.append(("a", x)), "b": lambda x: seen.append(("b", x))},
        lambda i: {"a": (i,), "b": (-i,)}, warmup=1, iters=2)
    assert seen == [("a", 0), ("b", 0), ("a", 1), ("b", -1), ("a", 2), ("b", -2)]
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())
