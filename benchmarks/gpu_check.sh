#!/usr/bin/env bash
# GPU checks, for whenever a CUDA device is at hand: the generator benchmark on CUDA in
# fp32 and bf16 autocast (outputs checked against the plain version; model FLOP
# utilisation against the device's dense bf16 peak), then the training-step benchmark
# (images/s, peak CUDA memory, the step vs the matmul limit of its products, the loop's
# device-side sums vs a host read per step), then the metrics (feature networks vs the
# device's own convolution and matmul throughput on the same shapes, channels-last vs
# NCHW, bf16; the Frechet distance; extraction vs torch-fidelity) and the whole evaluate
# stage.
# Paste the output into docs/benchmarks.md.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=.venv/bin/python by default
#   PEAK_TFLOPS=989 bash benchmarks/gpu_check.sh   # a device the peak table lacks
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

"$PYTHON" -c 'import torch' || { echo "gpu_check: $PYTHON cannot import torch" >&2; exit 1; }
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -m benchmarks --only generator --only train_step --only metrics \
    --only evaluate --json gpu_check.json "$@"
