"""The `eqx-models` command end to end, in subprocesses as a user runs it."""

import json
import subprocess
import sys

import pytest


def run(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "eqx_models.cli", *args], capture_output=True, text=True,
                         timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"eqx-models {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


@pytest.mark.slow
def test_train_then_generate_then_convert(tmp_path):
    """`train` (tiny steps) writes checkpoints and a loss PNG; `generate` samples from it; `convert` goes to
    an HF directory that transformers loads and back."""
    run_dir = tmp_path / "run"
    out = run("train", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--save-every", "2",
              "--out", str(run_dir), "--quiet")
    assert "loss" in out.stdout and "sample:" in out.stdout
    assert (run_dir / "loss.png").stat().st_size > 1000
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["2", "4"]

    out = run("generate", "--checkpoint", str(run_dir), "--prompt", "The lamp", "--max-new-tokens", "12")
    assert out.stdout.startswith("The lamp")

    hf_dir = tmp_path / "hf"
    run("convert", str(run_dir), str(hf_dir))
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 256
    import transformers

    transformers.Qwen3ForCausalLM.from_pretrained(hf_dir)
    back = tmp_path / "back"
    run("convert", str(hf_dir), str(back))
    out = run("generate", "--checkpoint", str(back), "--prompt", "The lamp", "--max-new-tokens", "4")
    assert out.stdout.startswith("The lamp")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"), "does not exist"),
        (("train", "--model", "/nonexistent/config.json"), "does not exist"),
        (("train", "--steps", "0"), "--steps must be >= 1"),
    ],
)
def test_errors_are_one_line(args, message):
    """Bad input prints one `eqx-models: error:` line (no traceback) and exits 2."""
    out = run(*args, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    out = run("train", "--model", str(bad), check=False)
    assert out.returncode == 2 and "is not valid JSON" in out.stderr and "Traceback" not in out.stderr


def test_help_lists_the_commands():
    out = run("--help")
    for command in ("train", "generate", "convert"):
        assert command in out.stdout


@pytest.mark.slow
def test_train_and_generate_a_qwen3_next_config(tmp_path):
    """`--model CONFIG.json` picks the model class from `model_type`: a tiny hybrid GDN/attention MoE model
    trains, checkpoints and samples through its generation state."""
    config = dict(
        model_type="qwen3_next", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256,
    )
    (tmp_path / "next.json").write_text(json.dumps(config))
    run_dir = tmp_path / "run"
    out = run("train", "--model", str(tmp_path / "next.json"), "--steps", "2", "--batch-size", "2", "--seq-len",
              "32", "--out", str(run_dir), "--quiet")
    assert "loss" in out.stdout
    out = run("generate", "--checkpoint", str(run_dir), "--prompt", "The lamp", "--max-new-tokens", "6")
    assert out.stdout.startswith("The lamp")


def test_non_causal_lm_config_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "qwen3_omni_moe_thinker"}))
    out = run("train", "--model", str(bad), check=False)
    assert out.returncode == 2 and "not a causal LM" in out.stderr and "Traceback" not in out.stderr
