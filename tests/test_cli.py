"""The `eqx-models` command end to end, in subprocesses as a user runs it."""

import json
import signal
import subprocess
import sys
import time

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
    an HF directory that transformers loads (keeping its other files, refusing to overwrite the checkpoint) and
    back, into a run that `train --resume` fine-tunes with a fresh optimizer state."""
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
    hf_dir.mkdir()
    (hf_dir / "notes.txt").write_text("kept")
    run("convert", str(run_dir), str(hf_dir))
    assert (hf_dir / "notes.txt").read_text() == "kept"
    weights = (hf_dir / "model.safetensors").read_bytes()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 256
    import transformers

    transformers.Qwen3ForCausalLM.from_pretrained(hf_dir)
    back = tmp_path / "back"
    run("convert", str(hf_dir), str(back))
    out = run("generate", "--checkpoint", str(back), "--prompt", "The lamp", "--max-new-tokens", "4")
    assert out.stdout.startswith("The lamp")
    out = run("train", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", str(back), "--resume")
    assert "step 0 in" in out.stderr and "has no optimizer state (a converted checkpoint)" in out.stderr
    assert sorted(p.name for p in (back / "checkpoints").iterdir()) == ["0", "2"]
    _assert_one_line_error(run("convert", str(run_dir), str(hf_dir), check=False),
                           f"{hf_dir} already holds a checkpoint (config.json, model.safetensors)")
    assert (hf_dir / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"), "does not exist"),
        (("train", "--model", "/nonexistent/config.json"), "does not exist"),
        (("train", "--steps", "0"), "--steps must be >= 1"),
        (("train", "--model", "/"), "--model must be 'tiny' or a config JSON file; / is a directory"),
        (("train", "--seed", "-1"), "--seed must be in [0, 2**63)"),
        (("generate", "--checkpoint", "x", "--prompt", "x", "--seed", str(2**64)), "--seed must be in [0, 2**63)"),
        (("train", "--prompt", ""), "--prompt must not be empty"),  # before training, not after it
    ],
)
def test_errors_are_one_line(args, message):
    """Bad input prints one `eqx-models: error:` line (no traceback) and exits 2."""
    out = run(*args, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_ids_past_the_bytes_decode_as_replacement_characters():
    """A converted HF model's vocabulary goes past the 256 byte ids the command tokenizes with; its samples print
    (ids >= 256 as U+FFFD) instead of failing after generation with 'bytes must be in range(0, 256)'."""
    from eqx_models.cli import decode, encode

    assert decode([*encode("é!"), 300, 72]) == "é!\ufffdH"


def test_resume_compares_model_fields_not_runtime_ones():
    """A run converted from a bf16 checkpoint saved dtype bfloat16; its own config.json as `--model` (read with
    the default runtime fields) is the same model, so resuming with it is not refused."""
    import eqx_models as em
    from eqx_models.cli import _differing_fields

    saved = em.Qwen3Config(dtype="bfloat16", param_dtype="bfloat16", remat_policy="full")
    assert _differing_fields(em.Qwen3Config(), saved) == []
    assert _differing_fields(em.Qwen3Config(rope_theta=5.0), saved) == ["rope_theta"]


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


def _assert_one_line_error(out, message):
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


def test_bad_out_and_data_paths_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    _assert_one_line_error(run("train", "--out", str(tmp_path / "afile"), check=False), "is not a directory")
    out = run("train", "--data", str(tmp_path / "adir"), "--out", str(tmp_path / "r"), check=False)
    _assert_one_line_error(out, "is a directory; give a UTF-8 text file")


@pytest.mark.parametrize("dest", [".", "..", "hf"], ids=["same", "parent", "inside"])
def test_convert_refuses_dest_overlapping_source(tmp_path, dest):
    """DEST equal to SOURCE, containing it or inside it is refused before anything is written."""
    source = tmp_path / "runs" / "a"
    source.mkdir(parents=True)
    (source / "eqx_models_config.json").write_text("{}")
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "runs" / "other" / "notes.txt").write_text("precious")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    _assert_one_line_error(run("convert", str(source), str(source / dest), check=False), "must not be SOURCE")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_convert_hf_into_non_empty_directory_is_refused(tmp_path):
    """HF -> run into a folder that already holds something (another run) is refused: its higher steps would
    stay the latest and its config would be overwritten."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eqx_models_config.json").write_text('{"model_type": "qwen3"}')
    out = run("convert", str(tmp_path / "hf"), str(tmp_path / "run"), check=False)
    _assert_one_line_error(out, "already exists and is not empty")
    assert (tmp_path / "run" / "eqx_models_config.json").read_text() == '{"model_type": "qwen3"}'


@pytest.mark.parametrize("entry", ["model.safetensors", "model.safetensors.index.json", "eqx_models_config.json",
                                   "checkpoints"])
def test_convert_run_into_a_checkpoint_is_refused(tmp_path, entry):
    """Run -> HF into a folder already holding an HF checkpoint (it would be replaced) or a run (an HF checkpoint
    would be mixed into it) is refused in one line naming what is there, before anything is read or written."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eqx_models_config.json").write_text("{}")
    dest = tmp_path / "dest"
    dest.mkdir()
    if entry == "checkpoints":
        (dest / entry).mkdir()
    else:
        (dest / entry).write_text("precious")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = run("convert", str(tmp_path / "run"), str(dest), check=False)
    _assert_one_line_error(out, f"{dest} already holds a checkpoint ({entry})")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_loss_plot_uses_the_logged_step_numbers(tmp_path, monkeypatch):
    """The loss curve of a resumed run is drawn at its true steps (a resume at step 20 plots 21.., not 1..)."""
    import matplotlib.figure

    from eqx_models.cli import _plot_losses

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kwargs: drawn.append(list(fig.axes[0].lines[0].get_xdata())))
    _plot_losses({22: 1.5, 21: 2.0, 23: 1.0}, tmp_path / "loss.png")
    assert drawn == [[21, 22, 23]]


def _tiny_omni_thinker():
    """A tiny random Qwen3-Omni thinker of ours (text MoE, vision and audio encoders)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eqx_models.config import (Qwen3OmniAudioConfig, Qwen3OmniThinkerConfig, Qwen3OmniThinkerTextConfig,
                                   Qwen3OmniVisionConfig)
    from eqx_models.models.qwen3_omni import Qwen3OmniThinkerForConditionalGeneration

    cfg = Qwen3OmniThinkerConfig(
        text_config=Qwen3OmniThinkerTextConfig(
            vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=128, mrope_section=(4, 2, 2)),
        vision_config=Qwen3OmniVisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                            patch_size=4, out_hidden_size=32, num_position_embeddings=16,
                                            deepstack_visual_indexes=(0,)),
        audio_config=Qwen3OmniAudioConfig(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2,
                                          encoder_ffn_dim=32, d_model=16, max_source_positions=64,
                                          n_window_infer=200, downsample_hidden_size=8, output_dim=32),
        audio_token_id=250, image_token_id=251, video_token_id=252, audio_start_token_id=253,
        vision_start_token_id=254,
    )
    skeleton = eqx.filter_eval_shape(Qwen3OmniThinkerForConditionalGeneration, cfg, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), skeleton)


@pytest.mark.slow
def test_convert_omni_thinker_both_ways(tmp_path):
    """A Qwen3-Omni thinker converts HF -> run -> HF with every tensor unchanged; `generate` (byte-level text
    from causal LMs) refuses it in one line."""
    import numpy as np
    from safetensors.numpy import load_file

    import eqx_models as em

    em.save_pretrained(_tiny_omni_thinker(), tmp_path / "hf")
    run("convert", str(tmp_path / "hf"), str(tmp_path / "run"))
    run("convert", str(tmp_path / "run"), str(tmp_path / "back"))
    before = load_file(tmp_path / "hf" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(np.array_equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text())
    out = run("generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x", check=False)
    _assert_one_line_error(out, "generate samples text from qwen3")


@pytest.mark.slow
def test_resume_keeps_the_run_config_and_names_a_corrupt_step(tmp_path):
    """`--resume` without `--model` trains on with the run's saved config (not `tiny`); a `--model` that differs
    (here only in rope_theta and rms_norm_eps) is refused naming those fields; a damaged latest step is one
    line naming its folder."""
    model = dict(model_type="qwen3", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    (tmp_path / "tiny.json").write_text(json.dumps(model))
    (tmp_path / "other.json").write_text(json.dumps({**model, "rope_theta": 5.0, "rms_norm_eps": 0.5}))
    run_dir, common = tmp_path / "run", ("--batch-size", "2", "--seq-len", "16", "--quiet")
    run("train", "--model", str(tmp_path / "tiny.json"), "--steps", "2", "--out", str(run_dir), *common)
    saved = (run_dir / "eqx_models_config.json").read_text()
    logged = _logged_losses(run_dir)
    assert sorted(logged) == [1, 2]
    with open(run_dir / "losses.jsonl", "a") as log:  # steps logged after the last save, then a crash mid-line
        log.write('{"step": 3, "loss": 99.0}\n{"step": 4, "lo')

    out = run("train", "--model", str(tmp_path / "other.json"), "--steps", "4", "--out", str(run_dir), "--resume",
              *common, check=False)
    _assert_one_line_error(out, "in rms_norm_eps, rope_theta; leave out --model")
    out = run("train", "--steps", "3", "--save-every", "1", "--out", str(run_dir), "--resume", *common)
    assert "over 1 step after resuming at step 2" in out.stdout and "loss curve of steps 1-3" in out.stdout
    resumed = _logged_losses(run_dir)
    assert sorted(resumed) == [1, 2, 3] and resumed[3] != 99.0 and resumed[2] == logged[2]
    assert (run_dir / "eqx_models_config.json").read_text() == saved
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]

    data = max((run_dir / "checkpoints" / "3" / "model" / "ocdbt.process_0" / "d").iterdir(),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = run("generate", "--checkpoint", str(run_dir), "--prompt", "x", "--max-new-tokens", "2", check=False)
    _assert_one_line_error(out, f"step 3 in {run_dir / 'checkpoints' / '3'} cannot be read")
    assert "delete it to fall back to step 2" in out.stderr


def _logged_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "losses.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len({entry["step"] for entry in entries}) == len(entries), lines
    return {entry["step"]: entry["loss"] for entry in entries}


@pytest.mark.slow
def test_ctrl_c_during_train_stops_cleanly_and_resumes(tmp_path):
    """SIGINT once checkpoints are being written (every 2 steps, so it often lands in a save): one line naming the
    run's checkpoints, exit 130, no step folder left half-written; `--resume` then continues from the last step,
    with the loss log contiguous."""
    model = dict(model_type="qwen3", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    (tmp_path / "tiny.json").write_text(json.dumps(model))
    run_dir, common = tmp_path / "run", ("--batch-size", "2", "--seq-len", "16", "--quiet")
    checkpoints = run_dir / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, "-m", "eqx_models.cli", "train", "--model", str(tmp_path / "tiny.json"), "--steps",
         "100000", "--save-every", "2", "--out", str(run_dir), *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint written within 400 s"
            time.sleep(0.2)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert f"interrupted; run the same command with --resume to continue from the last checkpoint in {checkpoints}" \
        in stderr
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert steps and sorted(p.name for p in checkpoints.iterdir()) == sorted(str(step) for step in steps)

    out = run("train", "--steps", str(steps[-1] + 1), "--out", str(run_dir), "--resume", *common)
    assert f"over 1 step after resuming at step {steps[-1]}" in out.stdout
    assert sorted(_logged_losses(run_dir)) == list(range(1, steps[-1] + 2))


def test_a_fresh_optimizer_state_resumes_the_schedule_at_the_restored_step(tmp_path):
    """Resuming a step saved without optimizer state starts Adam anew but keeps the learning-rate schedule in
    step with the loop, which goes on at that step (a schedule at 0 would warm up again mid-run)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqx_models as em
    from eqx_models.checkpoint import Checkpointer
    from eqx_models.cli import _resume
    from eqx_models.training import make_optimizer

    cfg = em.Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = em.Qwen3ForCausalLM(cfg, key=jax.random.key(0))
    optimizer = make_optimizer(1e-3, total_steps=100, warmup_steps=10)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(40, model)
        restored = _resume(checkpointer, model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)), True)
    counts = dict(optax.tree_utils.tree_get_all_with_path(restored.opt_state, "count"))
    by_state = {path[-1].tuple_name: int(count) for path, count in counts.items()}
    assert restored.step == 40 and by_state == {"ScaleByAdamState": 0, "ScaleByScheduleState": 40}
    moments = optax.tree_utils.tree_get(restored.opt_state, "mu")
    assert all(not jnp.any(m) for m in jax.tree.leaves(moments))
