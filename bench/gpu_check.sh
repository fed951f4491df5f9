#!/usr/bin/env bash
# The checks that need a GPU, in one script that fits in about 5 minutes on one H200:
#   1. the gpu-marked tests (the learner and the workers' policy on CUDA, samplers on CUDA);
#   2. the Flux-size policy (about 20M parameters) on CUDA: learner step, worker forward, and the
#      weight broadcast in fp32 / bf16 / fp16 (bench/learner_step.py), beside the same on the CPU;
#   3. the real FLUX.1-dev and SD3.5 Large transformer architectures at 1024², random weights built
#      from their configs (nothing downloaded), bf16: our batched per-sample loop against the
#      stock pipeline called once per schedule (bench/rollout_throughput.py --arch real);
#   4. bench/overhead.py with the learner and the workers' policy on the GPU, on policy and one step off.
# Every figure is printed; the ratios are what to compare across machines.
#
#     bash bench/gpu_check.sh            # from the repository root, after pip install -e '.[test]'
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_check.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== 1. gpu-marked tests"
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider

echo "== 2. Flux-size policy: learner step, worker forward, broadcast"
timeout 120 python bench/learner_step.py --device cuda --threads 4
timeout 180 python bench/learner_step.py --device cpu --threads 8 --contexts 8 --repeats 1

echo "== 3. real transformers at 1024x1024, bf16: batched per-sample loop vs the stock pipeline"
timeout 420 python bench/rollout_throughput.py --arch real --families flux sd3 --device cuda --dtype bfloat16 \
    --size 1024 --contexts 2 --k 2 --steps 5 --repeats 1 --threads 4

echo "== 4. overhead with the learner on the GPU"
timeout 300 python bench/overhead.py --workers 1 4 16 --iterations 3 --cpus 8 --png /tmp/overhead_gpu.png
