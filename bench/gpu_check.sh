#!/usr/bin/env bash
# The checks that need a GPU, in one script sized for about 6 minutes on one H200 (each step has
# a time limit of its own; together they stay under 10 minutes):
#   1. the gpu-marked tests (the learner and the workers' policy on CUDA, samplers on CUDA);
#   2. the Flux-size policy (about 20M parameters) on CUDA: learner step, worker forward, and the
#      weight broadcast in fp32 / bf16 / fp16 (bench/learner_step.py), beside the same on the CPU,
#      and what one request costs a GPU worker beside its sampler (bench/worker_request.py);
#   3. the real FLUX.1-dev and SD3.5 Large transformer architectures at 1024², random weights built
#      from their configs (nothing downloaded), bf16: our batched per-sample loop against the
#      stock pipeline called once per schedule (bench/rollout_throughput.py --arch real);
#   4. bench/overhead.py at 16 and 32 workers with sampler calls of 1 s and a reward at 3% of
#      sampling (the goal settings), on policy and one step off, the paper's 20.3M policy on the
#      GPU on both sides: the learner's (learner.device auto) and the workers' (a 1/W share of the
#      GPU each).
# Every figure is printed; the ratios are what to compare across machines. On one H200 (16 cores)
# steps 1, 2, 2c and 3 took 69, 14, 16 and 51 s, and step 4's runs about 144 s (step 2w has not run).
#
#     bash bench/gpu_check.sh                   # every step, from the repository root
#     bash bench/gpu_check.sh 2 3               # only those steps (a rerun of the ones that failed)
#     GPU_CHECK_OUT=logs bash bench/gpu_check.sh   # also each step's output in logs/step<N>.log
#
# A step that fails or runs past its limit does not stop the others; the last lines sum up each
# step (ok, failed, timed out, skipped) and the exit status is 1 if one did not pass. Where Ray is
# not installed (a GPU box with PyTorch and diffusers only), the steps and test files that need
# it are skipped by name, and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"
export PYTHONUNBUFFERED=1
dry="${GPU_CHECK_DRY_RUN:-}"  # 1: print each step's command instead of running it (tests/unit/test_gpu_check.py)
if [ -z "$dry" ]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_check.sh: no CUDA device')" || exit 1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
python - <<'EOF'
import importlib.metadata as m
versions = []
for name in ("torch", "diffusers", "transformers", "ray", "pydantic"):
    try:
        versions.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        versions.append(f"{name} not installed")
print(", ".join(versions))
EOF

out="${GPU_CHECK_OUT:-}"
[ -n "$out" ] && mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(1 2 3 4)
for step in "${steps[@]}"; do
    case "$step" in
    1 | 2 | 3 | 4) ;;
    *)
        echo "bench/gpu_check.sh: no step '$step' (the steps are 1, 2, 3, 4)" >&2
        exit 2
        ;;
    esac
done
if python -c "import ray" 2>/dev/null; then has_ray=1; else has_ray=0; fi
summary=()
failed=0

# run N LIMIT_S TITLE COMMAND...: one step, its output to the terminal (and $out/stepN.log)
run() {
    local n=$1 limit=$2 title=$3
    shift 3
    echo "== $n. $title"
    local log=/dev/null start rc
    [ -n "$out" ] && log="$out/step$n.log"
    start=$(date +%s)
    if [ -n "$dry" ]; then
        echo "timeout $limit $*" | tee -a "$log"
        rc=0
    else
        timeout "$limit" "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
    fi
    local took=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        summary+=("step $n ($title): ok in ${took} s")
    elif [ "$rc" -eq 124 ]; then
        summary+=("step $n ($title): timed out after ${limit} s")
        failed=1
    else
        summary+=("step $n ($title): failed (exit $rc) after ${took} s")
        failed=1
    fi
}

skip() {
    echo "== $1. $2: skipped ($3)"
    summary+=("step $1 ($2): skipped ($3)")
}

for step in "${steps[@]}"; do
    case "$step" in
    1)
        # the test files holding gpu-marked tests, less those that cannot be imported here (Ray)
        mapfile -t files < <(python - <<'EOF'
import importlib
import sys
from pathlib import Path

sys.path.insert(0, ".")
for path in sorted(Path("tests").rglob("test_*.py")):
    if "mark.gpu" not in path.read_text():
        continue
    try:
        importlib.import_module(".".join(path.with_suffix("").parts))
    except ImportError as e:
        print(f"skipped {path}: {e}", file=sys.stderr)
        continue
    print(path)
EOF
        )
        if [ ${#files[@]} -eq 0 ]; then
            skip 1 "gpu-marked tests" "no test file could be imported"
        else
            run 1 120 "gpu-marked tests" python -m pytest -q -n 0 -m gpu -p no:cacheprovider "${files[@]}"
        fi
        ;;
    2)
        run 2 50 "Flux-size policy on CUDA" python bench/learner_step.py --device cuda --threads 4
        run 2c 45 "Flux-size policy on the CPU" \
            python bench/learner_step.py --device cpu --threads 8 --contexts 8 --repeats 1
        run 2w 45 "a request's own cost on a GPU worker" python bench/worker_request.py --device cuda
        ;;
    3)
        run 3 120 "real transformers at 1024x1024, bf16: batched loop vs the stock pipeline" \
            python bench/rollout_throughput.py --arch real --families flux sd3 --device cuda --dtype bfloat16 \
            --size 1024 --contexts 2 --k 2 --steps 5 --repeats 1 --threads 4
        ;;
    4)
        if [ "$has_ray" -eq 0 ]; then
            skip 4 "overhead at the goal settings" "needs ray"
        else
            run 4 210 "overhead at the goal settings: the paper's policy, learner and workers on the GPU" \
                python bench/overhead.py --workers 16 32 --iterations 4 --cpus 16 \
                --policy paper --worker-gpus 1 --seconds-per-image-step 0.1 --reward-seconds-per-image 0.015 \
                --png "${out:-/tmp}/overhead_gpu.png"
        fi
        ;;
    esac
done

echo "== summary"
printf '%s\n' "${summary[@]}"
[ -n "$out" ] && printf '%s\n' "${summary[@]}" >"$out/summary.log"
exit "$failed"
