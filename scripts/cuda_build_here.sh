#!/usr/bin/env bash
# Builds the CUDA test binary and benchmark on a machine WITHOUT the CUDA toolkit or a GPU
# (this project's CPU machines), to run them on a lent GPU machine that has the driver and
# the CUDA 13 libraries but no Rust toolchain.
#
# - nvcc, nvvm, the C runtime headers and cudart come from PyPI (nvidia-* 13.0 wheels);
# - candle links libcuda/libcublas/libcublasLt/libcurand/libnvrtc at build time
#   (cudarc's dynamic-linking): we link against empty stub libraries with the real sonames,
#   and the GPU machine's real libraries are found at run time (LD_LIBRARY_PATH);
# - OpenBLAS is left out (--no-default-features): the GPU machine need not have it.
# Output: gpu-bin/{tiny_models,grouped,runtime}.xz (compressed to fit the 64 MiB carry limit),
# built in the same target folder as --check (candle's CUDA kernels compiled once for both).
# On the GPU machine:
#   cd gpu-bin && xz -d *.xz && chmod +x * && cd ..
#   export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64
#   SELFEDIT_TEST_DEVICE=cuda:0 ./gpu-bin/tiny_models --ignored --nocapture
#   SELFEDIT_TEST_DEVICE=cuda:0 SELFEDIT_MODEL=/path/to/SmolLM2.gguf ./gpu-bin/grouped --nocapture
#   ./gpu-bin/runtime --synthetic --device cuda:0
#   ./gpu-bin/runtime --model /path/to/SmolLM2.gguf --device cuda:0 --only-many
# With --check it builds nothing to run: `cargo clippy -D warnings` over every target of the
# CUDA build (library, stage binaries, tests, benches), so a change that breaks the GPU build
# is found on a CPU machine (`make check-cuda`; its own target folder, ~7 min cold).
set -euo pipefail
CHECK=0
[ "${1:-}" = --check ] && CHECK=1
cd "$(dirname "$0")/.."
TK=${TK:-/tmp/cudatk}
CU=$TK/x/nvidia/cu13
if [ ! -x "$CU/bin/nvcc" ]; then
  mkdir -p "$TK" && (cd "$TK" && python3 -m pip download -q --no-deps "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" -d . && for w in *.whl; do unzip -q -o "$w" -d x; done)
  ln -sf libcudart.so.13 "$CU/lib/libcudart.so"
fi
if [ $CHECK = 1 ]; then
  # nothing is linked, so no stub libraries are needed
  export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  export CARGO_TARGET_DIR=${CUDA_CHECK_TARGET:-$HOME/.cache/selfedit-cuda-target}
  cargo clippy --release --no-default-features --features cuda,stages --all-targets -- -D warnings
  echo "the CUDA build (library, stage binaries, tests, benches) compiles without warnings"
  exit 0
fi
CUDARC=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.* | head -1)
for spec in driver:cuda:libcuda.so.1 cublas:cublas:libcublas.so.13 cublaslt:cublasLt:libcublasLt.so.13 curand:curand:libcurand.so.10 nvrtc:nvrtc:libnvrtc.so.13; do
  IFS=: read -r mod name soname <<< "$spec"
  grep -ohE "^\s+(pub )?fn [a-zA-Z_0-9]+\(" "$CUDARC/src/$mod/sys/mod.rs" | sed -E 's/.*fn ([a-zA-Z_0-9]+)\(/\1/' | sort -u \
    | awk '{print "void " $1 "(void){}"}' > "$TK/$name.c"
  gcc -shared -fPIC -o "$CU/lib/lib$name.so" -Wl,-soname,"$soname" "$TK/$name.c"
done
export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CUDA_CHECK_TARGET:-$HOME/.cache/selfedit-cuda-target}
cargo build --release --no-default-features --features cuda --test tiny_models --test grouped --bench runtime
mkdir -p gpu-bin && rm -f gpu-bin/*
for b in tiny_models grouped runtime; do
  cp "$(ls -t "$CARGO_TARGET_DIR"/release/deps/$b-* | grep -v '\.d$' | head -1)" gpu-bin/$b
done
strip gpu-bin/* && xz -T2 -6 gpu-bin/*
ls -la gpu-bin
