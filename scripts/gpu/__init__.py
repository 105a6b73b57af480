"""GPU benchmarks, sweeps and profiling regions for jllm's kernels: one entry point,
`python -m scripts.gpu PART [options]` (PART list: `python -m scripts.gpu --help`), and one timer
(`scripts/gpu/timing.py`). Correctness on the GPU is `pytest -m gpu`, not here; every benchmark
still checks each kernel against its `_ref` before timing it."""
