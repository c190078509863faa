#!/bin/sh
# Every figure in docs/benchmarks.md comes from these commands: 2 threads, float32, K=4, glibc's default
# malloc (fresh.py strips MALLOC_* from the children), each benchmark script in 3 fresh processes with the
# per-row median of the in-process ratios to a static baseline; the CPU model is recorded in every result.
# Results: benchmarks/results/<name>.fresh.json. Run on a quiet machine; MAX_LOAD=1.5 makes each script wait
# (<= 10 min) for the 1-minute load average to drop below 1.5 first.
set -e
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
WAIT=""
if [ -n "$MAX_LOAD" ]; then WAIT="--max-load $MAX_LOAD"; fi
F="python benchmarks/fresh.py --runs $RUNS"
$F --name conv_layers -- python benchmarks/bench_conv_layers.py --threads 2 --repeats 15 $WAIT
$F --name models -- python benchmarks/bench_models.py --threads 2 --repeats 9 $WAIT
$F --name element_training -- python benchmarks/bench_element_training.py --threads 2 --repeats 9 $WAIT
# the element-PAD training target on its own, in more processes (the models suite's spread is as large as it)
python benchmarks/fresh.py --runs 5 --name models_train_element -- python benchmarks/bench_models.py --threads 2 \
    --repeats 9 --variants dynamic,pad_element --no-memory $WAIT
# batch 1 against CondConv with many rounds: the gap is tens of microseconds per call
$F --name conv_layers_b1_r300 -- python benchmarks/bench_conv_layers.py --threads 2 --repeats 300 --batches 1 \
    --modes fwd --variants condconv,dynamic $WAIT
# the same with the compact channel-PAD layer beside them (channel PAD at batch 1 against fully dynamic)
$F --name conv_layers_b1_r300_channel -- python benchmarks/bench_conv_layers.py --threads 2 --repeats 300 --batches 1 \
    --modes fwd --variants condconv,dynamic,compact_channel $WAIT
# ResNet-18 batch 1: the mixing GEMVs inside the model, alone, and the floor they set
$F --name b1_floor -- python benchmarks/bench_b1_floor.py --threads 2 --repeats 15 $WAIT
# the same with OpenMP's default wait policy (what users get; the suites above sleep waiting threads)
PADNET_BENCH_OMP_WAIT_POLICY=default $F --name b1_floor_omp_default -- python benchmarks/bench_b1_floor.py \
    --threads 2 --repeats 15 $WAIT
PADNET_BENCH_OMP_WAIT_POLICY=default $F --name conv_layers_b1_r300_omp_default -- python benchmarks/bench_conv_layers.py \
    --threads 2 --repeats 300 --batches 1 --modes fwd --variants condconv,dynamic $WAIT
$F --name backends -- python benchmarks/bench_backends.py --threads 2 --repeats 9 --batches 32,8,1 $WAIT
$F --name backends_grad -- python benchmarks/bench_backends.py --threads 2 --repeats 9 --batches 32 --grad $WAIT
$F --name channel_split -- python benchmarks/bench_channel_split.py --threads 2 --repeats 15 $WAIT
$F --name moe -- python benchmarks/bench_moe.py --threads 2 --repeats 11 $WAIT
$F --name moe_gated -- python benchmarks/bench_moe.py --gated --threads 2 --repeats 11 $WAIT
$F --name compile -- python benchmarks/bench_compile.py --threads 2 --repeats 9 $WAIT
$F --name fused -- python benchmarks/bench_fused.py --threads 2 --repeats 9 $WAIT
$F --name fused_tiles -- python benchmarks/bench_fused_tiles.py --threads 2 --repeats 9 $WAIT
$F --name fused_b1 -- python benchmarks/bench_fused_b1.py --threads 2 --repeats 40 $WAIT
$F --name micro -- python benchmarks/bench_micro.py --threads 2 --repeats 9 $WAIT
# allocator sensitivity (sets its own malloc environment per child, by design)
python benchmarks/bench_allocator.py --threads 2 --repeats 9
python benchmarks/render_results.py
