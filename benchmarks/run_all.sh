#!/bin/sh
# Every figure in docs/benchmarks.md comes from these commands (2 threads, float32, K=4).
# Optional: MAX_LOAD=1.5 ./benchmarks/run_all.sh waits (<= 10 min per step) for a quieter machine.
set -e
cd "$(dirname "$0")/.."
# Allocator effect first (it sets its own environment per child process), then the suite with glibc's
# malloc thresholds fixed so that per-call temporaries of a few MiB are not page-faulted in again on
# every call (docs/benchmarks.md, "Allocator"). jemalloc / tcmalloc have the same effect.
python benchmarks/bench_allocator.py --threads 2 --repeats 9
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296
WAIT=""
if [ -n "$MAX_LOAD" ]; then WAIT="--max-load $MAX_LOAD"; fi
python benchmarks/bench_backends.py --threads 2 --repeats 9 --batches 32,8,1 $WAIT
python benchmarks/bench_backends.py --threads 2 --repeats 9 --batches 32 --grad $WAIT
python benchmarks/bench_conv_layers.py --threads 2 --repeats 15 $WAIT
python benchmarks/bench_moe.py --threads 2 --repeats 11 $WAIT
python benchmarks/bench_models.py --threads 2 --repeats 9 $WAIT
python benchmarks/bench_micro.py --threads 2 --repeats 9 $WAIT
python benchmarks/bench_channel_split.py --threads 2 --repeats 15 $WAIT
