#!/bin/sh
# Every figure in docs/benchmarks.md comes from these commands (2 threads, float32, K=4).
# Optional: MAX_LOAD=1.5 ./benchmarks/run_all.sh waits (<= 10 min per step) for a quieter machine.
set -e
cd "$(dirname "$0")/.."
WAIT=""
if [ -n "$MAX_LOAD" ]; then WAIT="--max-load $MAX_LOAD"; fi
python benchmarks/bench_backends.py --threads 2 --repeats 9 --batches 32,8,1 $WAIT
python benchmarks/bench_backends.py --threads 2 --repeats 9 --batches 32 --grad $WAIT
python benchmarks/bench_conv_layers.py --threads 2 --repeats 15 $WAIT
python benchmarks/bench_moe.py --threads 2 --repeats 11 $WAIT
python benchmarks/bench_models.py --threads 2 --repeats 9 $WAIT
python benchmarks/bench_micro.py --threads 2 --repeats 9 $WAIT
