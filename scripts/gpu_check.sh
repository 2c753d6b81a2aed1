#!/usr/bin/env bash
# The GPU checks, on a GPU machine with the driver and CUDA 13 libraries but no Rust toolchain,
# from the binaries `scripts/cuda_build_here.sh` leaves in gpu-bin/:
#   1. tiny_models' GPU tests: bf16 logits and LoRA gradients against the f32 CPU model, training,
#      generation with the KV cache; packed attention (padded on a GPU) against each segment alone;
#   2. tests/grouped.rs on the real SmolLM2 in bf16: a group of 6 self-edits against each alone,
#      and a generation batch of several adapters against each alone;
#   3. the many-self-edits benchmark at the paper's settings (16 self-edits, 4 alone, groups of
#      16);
#   4. the synthetic benchmark (random weights of SmolLM2's shape): decode, training;
#   5. 64 self-edits of 2 epochs in one group of 64, to see how a larger group scales.
# Where gpu-bin/runtime_before exists (a benchmark built from an earlier commit), step 3 runs it
# too, first, so a change is measured before and after on the same machine (machines differ by
# tens of percent). STEPS="tiny_models grouped ..." runs only the steps named.
# A model larger than what one call to the GPU machine may carry can travel in parts
# (`split -b 53M MODEL part.` here, `cat part.* > MODEL` there), in calls made while it stays warm.
# Usage: scripts/gpu_check.sh MODEL.gguf OUTDIR. Each step has its own time limit and the script
# goes on after a failure, so one run reports every step; OUTDIR/log holds everything.
set -uo pipefail
MODEL=$1
OUT=${2:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
cd "$(dirname "$0")/.."
(cd gpu-bin && for f in *.xz; do [ -e "$f" ] && xz -d -f "$f"; done; chmod +x ./*)
for d in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib /usr/local/nvidia/lib64; do
  [ -d "$d" ] && LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nproc
step() {
  local limit=$1 name=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  # a step whose binary did not travel is skipped (the model may have come in another call)
  if [ ! -x "$1" ]; then echo "=== $name: skipped, no $1 ==="; return; fi
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s ==="
}
export SELFEDIT_TEST_DEVICE=cuda:0 SELFEDIT_MODEL=$MODEL
step 60 tiny_models ./gpu-bin/tiny_models --ignored --nocapture gpu_
step 150 grouped ./gpu-bin/grouped --nocapture --test-threads=1
step 200 bench_paper_before ./gpu-bin/runtime_before --model "$MODEL" --device cuda:0 --only-many --self-edits 16 --solo-self-edits 4 --group-sizes 16
step 200 bench_paper ./gpu-bin/runtime --model "$MODEL" --device cuda:0 --only-many --self-edits 16 --solo-self-edits 4 --group-sizes 16
step 60 bench_synthetic ./gpu-bin/runtime --synthetic --device cuda:0
step 90 bench_64 ./gpu-bin/runtime --model "$MODEL" --device cuda:0 --only-many --self-edits 64 --solo-self-edits 0 --group-sizes 64 --self-edit-epochs 2
