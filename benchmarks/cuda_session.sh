#!/usr/bin/env bash
# Every CUDA check of docs/performance-cuda.md as one script, for a lent GPU with a short time budget: the CUDA
# tests, then the benchmarks, each bounded so that a slow step cannot use up the rest. Results (JSON and logs) go
# to $OUT (the device tool's output folder) or ./cuda-results. Uses the python3 on the machine, installs nothing.
# The bounds add up to 9 minutes: one device-tool command (10 minutes at most).
# Run: bash benchmarks/cuda_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-cuda-results}"
mkdir -p "$out"
python=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree, without installing it

step() {  # step NAME SECONDS COMMAND...: run one check with a time bound, keep its log, go on when it fails
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds}s)"
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    echo "   rc=$? $(tail -n 1 "$out/$name.log")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
$python -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" \
    >>"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
step kernel-tests 90 $python -m pytest -q -x tests/test_kernels.py tests/test_quant.py
step cuda-tests 90 $python -m pytest -q -k cuda tests/
step linear 90 $python benchmarks/linear.py --dtype bfloat16 --tokens 1,16,64,600 --peers --repeats 20
step crossover 60 $python benchmarks/crossover.py --dtype bfloat16 --tokens 1,4,16,17,32,64,128 --repeats 10
step generation 120 $python benchmarks/generation.py --decoder-layers 2 --new-tokens 32 --calib-samples 8 \
    --dtype bfloat16 --workdir "$out/models"
step prefill 90 $python benchmarks/prefill.py --decoder-layers 2 --keep-ratios 1.0,0.5,0.25,0.125 \
    --dtype bfloat16 --repeats 30 --workdir "$out/models"
rm -rf "$out/models"  # random-weight checkpoints, rebuilt by each run
