"""The example scripts and the quickstart notebook run as a user runs them (subprocesses, tiny settings)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, f"examples/{name} failed ({out.returncode}):\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_train_tiny_loss_falls():
    """`examples/train_tiny.py`: its filter_jit loop lowers the loss well below uniform over bytes (ln 256)."""
    stdout = run_example("train_tiny.py", "--steps", "30", "--batch", "4", "--seq", "32", "--layers", "1")
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", stdout).groups())
    assert len(re.findall(r"^step ", stdout, re.M)) == 4
    assert last < first - 1.0 and last < 4.5, stdout


@pytest.mark.slow
def test_hf_generate_matches_hf(tmp_path):
    """`examples/hf_generate.py`: greedy tokens from the loaded checkpoint equal HF `generate`'s (the script
    exits non-zero otherwise) and it prints them."""
    stdout = run_example("hf_generate.py", "--new-tokens", "6", "--out", str(tmp_path / "ckpt"))
    assert "greedy tokens equal HF generate's" in stdout
    assert (tmp_path / "ckpt" / "config.json").exists()
    ours = [json.loads(line.split("ours", 1)[1]) for line in stdout.splitlines() if line.strip().startswith("ours")]
    assert len(ours) == 2 and all(len(row) == 6 for row in ours)


@pytest.mark.slow
def test_layers_tour():
    stdout = run_example("layers_tour.py")
    assert "RoPE scores depend only on relative position" in stdout


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_quickstart_is_saved_executed():
    """The committed notebook carries its outputs: every code cell ran, in order, without errors, and the loss
    plot is embedded."""
    import nbformat

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    cells = _code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_quickstart_executes(tmp_path):
    """Executes notebooks/quickstart.ipynb with nbclient (a fresh kernel): no cell errors, the shapes printed
    are the documented ones, the loss falls and the plot renders."""
    import nbclient
    import nbformat

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for cell in _code_cells(notebook) for o in cell.outputs)
    assert "logits    (2, 16, 256) float32" in text
    first, last = map(float, re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", text).groups())
    assert last < first - 1.0
    assert any("image/png" in o.get("data", {}) for cell in _code_cells(notebook) for o in cell.outputs)
