#!/usr/bin/env bash
# The GPU checks and benchmarks in stages that each fit one 10-minute call on a lent machine (issue 9), run from
# the repository root: `bash benchmarks/gpu_session.sh STAGE`. Logs and RESULTS.md go to $OUT (./gpu_logs if
# unset; RESULTS.md is copied after each benchmark, so a call cut off at its limit keeps the rows so far).
# Wheels in .whl/ (beartype, for the suite's type-check hook) are installed first; without beartype the tests run
# without the hook. The package is imported from this checkout (PYTHONPATH), not installed: the lent machine has
# no package index, and pip's isolated build would fetch setuptools from one.
#
#   tests      versions, then tests/test_gpu.py (cuDNN attention, the Triton kernels, GPU vs CPU logits)
#   train      attention and the Qwen3-0.6B train step
#   kernels    gated delta (chunk, chunk_pallas) and MoE (auto, grouped, grouped_pallas)
#   decode     decode and the HF anchors (train step eager / torch.compile, generate)
#   remat      the train step under two other remat policies (train runs "full"; "none" needs ~90 GB at
#              8 x 2048), to choose the default, then compile time 28 vs 2 layers
set -uo pipefail
stage="${1:?usage: gpu_session.sh tests|train|kernels|decode|remat}"
out="${OUT:-gpu_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

run() {  # run SECONDS NAME COMMAND...: a step under a time limit, its output kept in $out/NAME.log
    local seconds=$1 name=$2
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

bench() {  # bench SECONDS SCRIPT ARGS...: one benchmark script, its results appended to RESULTS.md
    local seconds=$1 script=$2
    shift 2
    local name="$script${*:+_$*}"
    run "$seconds" "${name//[^A-Za-z0-9_.-]/_}" python3 "benchmarks/$script.py" --record "$@"
    cp benchmarks/RESULTS.md "$out/RESULTS.md"
}

case "$stage" in
tests)
    python3 - <<'EOF' | tee "$out/versions.txt"
import importlib.metadata as md
import jax
print(jax.devices(), getattr(jax.devices()[0], "compute_capability", None))
for name in ("jax", "jaxlib", "equinox", "optax", "jaxtyping", "beartype", "orbax-checkpoint", "torch", "transformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
    hook=()
    python3 -c "import beartype" 2>/dev/null || hook=(-o "addopts=-ra --strict-markers")
    run 480 test_gpu python3 -m pytest -q "${hook[@]}" tests/test_gpu.py
    ;;
train)
    bench 200 attention
    bench 360 train_step
    ;;
kernels)
    bench 240 gated_delta --impls chunk chunk_pallas
    bench 330 moe --impls auto grouped grouped_pallas
    ;;
decode)
    bench 200 decode
    bench 330 hf_anchor
    ;;
remat)
    for policy in save_dot_except_mlp minimal; do
        bench 180 train_step --remat "$policy"
    done
    bench 180 compile_time
    ;;
*)
    echo "unknown stage $stage: tests, train, kernels, decode or remat" >&2
    exit 2
    ;;
esac
cp benchmarks/RESULTS.md "$out/RESULTS.md"
