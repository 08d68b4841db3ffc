#!/usr/bin/env bash
# The one prepared run for a session whose task draws a GPU (issue 23 item 9, issue 28): the fused kernels' full
# self-check against the chunked engine, then the GPU benchmark against SDPA, in about 9 minutes, reports into $OUT
# (the folder the device tool brings back) or ./gpu_reports. It needs nothing installed: the H200 image's python3
# has torch, triton and transformers (>= this package's floor), and the package runs from this checkout.
#
#   device tool:  run(command="bash scripts/gpu_session.sh", timeout_s=600)
#   by hand:      bash scripts/gpu_session.sh     (then commit gpu_reports/ and say what ran in the README)
set -uo pipefail
OUT=${OUT:-gpu_reports}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import platform, torch, transformers, triton
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"triton {triton.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF

# every case (forms, neural options, fp32/bf16/fp16, masks, grouped heads with dropout), then a short speed run
timeout 240 "$PYTHON" -m hf_neural_attention.commands.selftest 2>&1 | tee "$OUT/selftest.txt"
selftest=${PIPESTATUS[0]}

# forward + backward at n = 1k..8k, bf16 autocast, against SDPA (FlashAttention) and eager: gpu_results.{csv,md}
timeout 300 "$PYTHON" -m hf_neural_attention.experiments.benchmark_cuda --sizes 1024 2048 4096 8192 --out "$OUT" \
    2>&1 | tee "$OUT/benchmark.log"
benchmark=${PIPESTATUS[0]}

echo "selftest exit $selftest, benchmark exit $benchmark" | tee -a "$OUT/environment.txt"
exit $(( selftest != 0 || benchmark != 0 ))
