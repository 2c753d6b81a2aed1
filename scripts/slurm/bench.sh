#!/usr/bin/env bash
# `make bench-slurm`: the scale-out figure on a throw-away single-node Slurm: the wall time of
# one tiny iteration with 1, 2 and 4 shards, and the scheduling overhead of one job (submit
# to finish of a job that does nothing). Prints RESULT lines. Not a test: times are noisy.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
CONFIG=${CONFIG:-configs/tiny.toml}
work=$(mktemp -d)
trap 'scripts/slurm/cluster.sh stop "$work/cluster"; rm -rf "$work"' EXIT
mkdir -p "$work/cluster"
scripts/slurm/cluster.sh start "$work/cluster" "${PORT:-7180}" >/dev/null
export SLURM_CONF=$work/cluster/slurm.conf SELFEDIT_LOGS=$work/logs
# scheduling overhead: ten empty jobs, one after another
t0=$(date +%s.%N)
for _ in $(seq 10); do scripts/slurm/run.sh job overhead -- true >/dev/null; done
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "RESULT slurm_job_overhead_s %.2f\n", (b - a) / 10 }'
for shards in 1 2 4; do
    t0=$(date +%s.%N)
    make --no-print-directory pipeline CONFIG="$CONFIG" OUTPUTS="$work/out$shards" BIN="$BIN" BUILD= SCHEDULER=slurm SHARDS=$shards >"$work/make$shards.log" 2>&1 \
        || { cat "$work/make$shards.log"; exit 1; }
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v n="$shards" 'BEGIN { printf "RESULT slurm_iteration_s_shards_%d %.1f\n", n, b - a }'
done
