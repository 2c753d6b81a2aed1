#!/usr/bin/env bash
# A throw-away single-node Slurm cluster in one folder, for tests and for trying
# `make ... SCHEDULER=slurm` on a machine without a cluster. Debian's slurmctld, slurmd,
# slurm-client and munge (installed with apt-get when missing and we are root); its own munge
# key and socket, ports, state, spool, logs and PID files, all under DIR; no systemd, no
# cgroups. Recipe and pitfalls: ../shared/slurm/NOTES.md.
#
#   scripts/slurm/cluster.sh start DIR [PORT]   # prints: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm/cluster.sh stop DIR           # cancels its jobs, stops its daemons by PID
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop DIR [PORT]}
dir=${2:?usage: cluster.sh start|stop DIR [PORT]}
port=${3:-7100}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v mungekey >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing slurmctld slurmd slurm-client munge" >&2
        apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
    else
        echo "Slurm is missing: install slurmctld slurmd slurm-client munge (Debian packages)" >&2
        exit 1
    fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && [ "$(ps -o stat= -p "$(cat "$1")" | cut -c1)" != Z ]; }

stop() {
    [ -f "$dir/slurm.conf" ] || return 0
    export SLURM_CONF=$dir/slurm.conf
    if alive "$dir/slurmctld.pid"; then
        # jobs first, while the daemons can still reap them (else slurmstepd orphans stay)
        timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(timeout 5 squeue -h -t R,CG 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    local pids=()
    for f in slurmd.pid slurmctld.pid munge/munged.pid; do
        alive "$dir/$f" && pids+=("$(cat "$dir/$f")")
    done
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        local up=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" | cut -c1)" != Z ] && up=1; done
        [ $up = 0 ] && return 0
        sleep 0.1
    done
    [ ${#pids[@]} -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null || true
}

start() {
    install
    stop
    rm -rf "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
    chmod 755 "$dir" "$dir/munge"
    local user; user=$(id -un)
    # 1. this cluster's own munge key and daemon
    mungekey -c -k "$dir/munge/munge.key" >/dev/null
    munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
    # 2. the configuration: 80 % of the memory, every core, one partition
    local mem cpus
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    cpus=$(nproc)
    cat >"$dir/slurm.conf" <<EOC
ClusterName=selfedit$port
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
MinJobAge=300
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
DependencyParameters=kill_invalid_depend
SchedulerParameters=batch_sched_delay=0
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=$((mem / cpus))
EOC
    export SLURM_CONF=$dir/slurm.conf
    # 3. the daemons; they return 0 right after forking, so check they stay up
    slurmctld
    slurmd -N localhost
    for _ in $(seq 100); do
        if ! alive "$dir/slurmctld.pid" || ! alive "$dir/slurmd.pid"; then
            sleep 0.1
            if ! alive "$dir/slurmctld.pid" || ! alive "$dir/slurmd.pid"; then
                echo "Slurm did not start (port $port in use?); logs in $dir/log" >&2
                stop
                exit 1
            fi
        fi
        if timeout 5 sinfo -h -o %t 2>/dev/null | grep -q idle; then
            echo "export SLURM_CONF=$dir/slurm.conf"
            return 0
        fi
        sleep 0.1
    done
    echo "Slurm started but the node never became idle; logs in $dir/log" >&2
    stop
    exit 1
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) echo "usage: cluster.sh start|stop DIR [PORT]" >&2; exit 2 ;;
esac
