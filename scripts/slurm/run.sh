#!/usr/bin/env bash
# Runs a pipeline command as Slurm jobs and waits for them, for `make ... SCHEDULER=slurm`:
# make's targets stay the files, so caching and resume are make's as usual.
#
#   run.sh job NAME -- CMD...
#       one job; waits; exits 0 only when the job COMPLETED.
#   run.sh array NAME N PATTERN [--newer-than "FILES"] [--then "MERGE CMD"] -- CMD...
#       one job array over the shards 0..N-1 whose file (PATTERN with %i = the shard) is
#       missing or older than one of FILES; CMD sees its shard as %i. Then MERGE CMD as a
#       job that depends on the array (afterok). Waits; exits 0 only when every task and the
#       merge COMPLETED; a failed or cancelled task is named with its log.
#
# The environment: SLURM_CONF (for a cluster of scripts/slurm/cluster.sh), SELFEDIT_LOGS
# (the log folder, default logs), SELFEDIT_SBATCH (extra sbatch flags: partition, account,
# time, CPUs, memory, --gres=gpu:1).
set -euo pipefail

logs=${SELFEDIT_LOGS:-logs}
mkdir -p "$logs"
read -r -a extra <<<"${SELFEDIT_SBATCH:-}"

quote() { printf '%q ' "$@"; }

# Waits until no task of job $1 is pending or running (squeue), polling every 0.2 s.
wait_job() {
    while [ -n "$(timeout 30 squeue -h -j "$1" -o %i 2>/dev/null)" ]; do sleep 0.2; done
}

# The final state of every task of job $1, as "TASK STATE" lines (TASK "-" for a plain job):
# scontrol while Slurm still knows the job (MinJobAge), else sacct.
states() {
    local out
    if out=$(timeout 30 scontrol -o show job "$1" 2>/dev/null) && [ -n "$out" ]; then
        awk '{task="-"; state="?"; for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "ArrayTaskId") task = kv[2]; if (kv[1] == "JobState") state = kv[2] } print task, state}' <<<"$out"
    else
        timeout 30 sacct -n -X -P -j "$1" -o JobID,State 2>/dev/null | awk -F'|' '{n = split($1, id, "_"); print (n > 1 ? id[2] : "-"), $2}'
    fi
}

# Checks that every task of job $1 COMPLETED; else names each failure with its log.
check() {
    local job=$1 name=$2 bad=0
    while read -r task state; do
        [ "$state" = COMPLETED ] && continue
        bad=1
        if [ "$task" = - ]; then
            echo "slurm: job $job ($name) ended $state; log: $logs/$name-$job.out" >&2
        else
            echo "slurm: task $task of job $job ($name) ended $state; log: $logs/$name-${job}_$task.out" >&2
        fi
    done < <(states "$job")
    return $bad
}

submit() { # NAME [sbatch flags...] -- COMMAND STRING
    local name=$1; shift
    local flags=()
    while [ "$1" != -- ]; do flags+=("$1"); shift; done
    shift
    sbatch --parsable --job-name="selfedit-$name" "${extra[@]}" "${flags[@]}" --wrap "$1" | cut -d';' -f1
}

case ${1:-} in
    job)
        name=${2:?NAME}; shift 2; [ "${1:-}" = -- ] && shift
        id=$(submit "$name" --output="$logs/$name-%j.out" -- "$(quote "$@")")
        echo "slurm: submitted $name as job $id (log $logs/$name-$id.out)"
        wait_job "$id"
        check "$id" "$name"
        tail -n 1 "$logs/$name-$id.out" 2>/dev/null || true
        ;;
    array)
        name=${2:?NAME}; n=${3:?N}; pattern=${4:?PATTERN}; shift 4
        newer="" then=""
        while [ $# -gt 0 ] && [ "$1" != -- ]; do
            case $1 in
                --newer-than) newer=$2; shift 2 ;;
                --then) then=$2; shift 2 ;;
                *) echo "run.sh array: unknown option $1" >&2; exit 2 ;;
            esac
        done
        shift
        todo=()
        for i in $(seq 0 $((n - 1))); do
            f=${pattern//%i/$i}
            stale=0
            [ -f "$f" ] || stale=1
            for dep in $newer; do [ $stale = 0 ] && [ "$dep" -nt "$f" ] && stale=1; done
            [ $stale = 1 ] && todo+=("$i")
        done
        cmd=$(quote "$@")
        cmd=${cmd//%i/\$SLURM_ARRAY_TASK_ID}
        deps=()
        if [ ${#todo[@]} -gt 0 ]; then
            list=$(IFS=,; echo "${todo[*]}")
            array=$(submit "$name" --array="$list" --output="$logs/$name-%A_%a.out" -- "$cmd")
            echo "slurm: submitted $name shards $list of $n as array job $array (logs $logs/$name-${array}_*.out)"
            deps=(--dependency="afterok:$array")
        fi
        merge=""
        if [ -n "$then" ]; then
            merge=$(submit "$name-merge" "${deps[@]}" --output="$logs/$name-merge-%j.out" -- "$then")
            echo "slurm: submitted $name-merge as job $merge"
        fi
        status=0
        if [ ${#todo[@]} -gt 0 ]; then
            wait_job "$array"
            check "$array" "$name" || status=1
        fi
        if [ -n "$merge" ]; then
            wait_job "$merge"
            # a merge cancelled because its array failed is that failure, already reported
            [ $status = 1 ] || check "$merge" "$name-merge" || status=1
            [ $status = 1 ] || tail -n 1 "$logs/$name-merge-$merge.out" 2>/dev/null || true
        fi
        exit $status
        ;;
    *)
        echo "usage: run.sh job NAME -- CMD... | run.sh array NAME N PATTERN [--newer-than FILES] [--then CMD] -- CMD..." >&2
        exit 2
        ;;
esac
