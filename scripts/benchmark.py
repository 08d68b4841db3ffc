"""Speed and memory of the variants against SDPA and eager attention: `python scripts/benchmark.py [--device cuda]`
(the same as the `hfna-benchmark` console script; `--help` lists the options). The code lives in
hf_neural_attention/experiments/benchmark.py (CPU) and benchmark_cuda.py (GPU, the Triton kernels)."""

from hf_neural_attention.experiments.benchmark import main

if __name__ == "__main__":
    main()
