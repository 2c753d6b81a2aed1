#!/usr/bin/env bash
# Single-adapter LoRA training, selfedit against the Python peer (../shared/bench/peer_bench.py:
# PyTorch + transformers + PEFT on the same GGUF), back to back and alternating, so both see
# the same machine state. Prints each run's tokens/s and, at the end, the medians and the
# ratios to the peer as RESULT lines (runs that shared the cores with another process left
# out, FOREIGN_LIMIT). Run by `make bench-peer` (PAIRS, DTYPES).
#
# The peer's environment (~5.6 GB: PyPI has only the CUDA build of torch, which runs on the
# CPU) is made once in .peer/ from ../shared/bench/requirements.txt.
set -euo pipefail

PAIRS=${PAIRS:-3}
DTYPES=${DTYPES:-f32 bf16}
SHARED=${SHARED:-../shared}
MODEL=${MODEL:?MODEL: the SmolLM2 GGUF (make bench-peer sets it)}
CARGO=${CARGO:-cargo}
# e.g. --no-default-features, as `make bench` passes them
BENCH_FLAGS=${BENCH_FLAGS:-}
VENV=.peer

if [[ ! -f $MODEL ]]; then
  echo "bench-peer: no model at $MODEL (run make model)" >&2
  exit 2
fi
if [[ ! -f $SHARED/bench/peer_bench.py ]]; then
  echo "bench-peer: $SHARED/bench/peer_bench.py not found (set SHARED to the folder that holds bench/)" >&2
  exit 2
fi
if [[ ! -x $VENV/bin/python ]] || ! $VENV/bin/python -c 'import torch, peft, transformers, gguf' 2>/dev/null; then
  echo "bench-peer: installing the peer's packages into $VENV/ (once; ~5.6 GB)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r "$SHARED/bench/requirements.txt"
fi
# the peer reads the GGUF from a folder
mkdir -p "$VENV/model"
ln -sf "$(realpath "$MODEL")" "$VENV/model/$(basename "$MODEL")"

# bf16 needs AMX; leave it out where the CPU lacks it rather than fail half-way
if [[ " $DTYPES " == *" bf16 "* ]] && ! grep -qw amx_bf16 /proc/cpuinfo; then
  echo "bench-peer: no AMX on this CPU, measuring f32 only" >&2
  DTYPES=${DTYPES//bf16/}
fi

$CARGO bench $BENCH_FLAGS --bench runtime --no-run --quiet
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# the value of the RESULT line `name` in a run's output; a run without it stops the script
# (through the assignment that calls this, under `set -e`)
figure() {
  local name=$1 what=$2 out=$3
  local v
  v=$(awk -v n="$name" '$1 == "RESULT" && $2 == n { print $3 }' <<<"$out" | tail -1)
  if [[ -z $v ]]; then
    echo "bench-peer: $what printed no RESULT $name; its output:" >&2
    echo "$out" | tail -20 >&2
    exit 1
  fi
  echo "$v"
}
root=$(pwd)
for i in $(seq 1 "$PAIRS"); do
  out=$(cd "$SHARED/bench" && "$root/$VENV/bin/python" peer_bench.py --threads 2 --skip-gen --matmul-n 0 \
    --model-dir "$root/$VENV/model" --gguf-file "$(basename "$MODEL")" 2>&1) || true
  tps=$(figure train_tokens_per_s peer "$out")
  foreign=$(figure foreign_cores_train peer "$out")
  echo "RESULT peer_train_tokens_per_s_run$i $tps tok/s"
  echo "RESULT peer_foreign_cores_run$i $foreign cores"
  echo "peer $tps $foreign" >>"$log"
  for dt in $DTYPES; do
    out=$($CARGO bench $BENCH_FLAGS --bench runtime --quiet -- --model "$MODEL" --quick --skip-gen --self-edits 0 --compute-dtype "$dt" 2>&1) || true
    tps=$(figure train_tokens_per_s "selfedit ($dt)" "$out")
    foreign=$(figure foreign_cores_train "selfedit ($dt)" "$out")
    echo "RESULT train_tokens_per_s_${dt}_run$i $tps tok/s"
    echo "RESULT foreign_cores_${dt}_run$i $foreign cores"
    echo "$dt $tps $foreign" >>"$log"
  done
done
# medians of each column, and each dtype's median over the peer's, leaving out runs that
# shared the cores with another process (foreign_cores above FOREIGN_LIMIT)
FOREIGN_LIMIT=${FOREIGN_LIMIT:-0.1} python3 - "$log" <<'EOF'
import os, statistics, sys
limit = float(os.environ["FOREIGN_LIMIT"])
runs = {}
for line in open(sys.argv[1]):
    who, value, foreign = line.split()
    if float(foreign) > limit:
        print(f"bench-peer: left out of the medians: {who} at {value} tok/s, {foreign} foreign cores (limit {limit})", file=sys.stderr)
        continue
    runs.setdefault(who, []).append(float(value))
if "peer" not in runs or len(runs) < 2:
    sys.exit("bench-peer: every run of one side shared its cores with another process; no medians")
peer = statistics.median(runs.pop("peer"))
print(f"RESULT peer_train_tokens_per_s_median {peer:.1f} tok/s")
for dtype, values in runs.items():
    ours = statistics.median(values)
    print(f"RESULT train_tokens_per_s_{dtype}_median {ours:.1f} tok/s")
    print(f"RESULT train_vs_peer_{dtype}_median {ours / peer:.3f} x")
EOF
