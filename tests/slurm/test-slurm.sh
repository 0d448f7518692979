#!/usr/bin/env bash
# A real SLURM run of a fluxrecipe sweep through the hydra/launcher=slurm preset (submitit): `make test-slurm`.
#
# On a Debian machine, as root, with no network but the package registries:
#   1. installs Debian's slurm-wlm and munge (apt-get --no-install-recommends; only what is missing);
#   2. starts a one-node cluster: this host is the controller and the only compute node, with the CPUs and
#      memory `slurmd -C` finds; no accounting database; cgroups (proctrack/cgroup, task/cgroup: cores and
#      memory enforced) where they work, else proctrack/linuxproc and task/none;
#   3. runs a 3-job sweep of the demo recipe, previews included, with the preset, and checks it: every SLURM
#      job completed, every job ok, the summary, grid and index there, the grid's cells the jobs' previews
#      (tests/slurm/sweep_report.py, which also prints the summary's rows), every merged model verifies, and
#      the model a SLURM job wrote is byte for byte the one the same merge writes on this machine without SLURM;
#   4. stops the daemons it started and removes its folder (--keep leaves both, for debugging).
#
# Everything it makes is in one folder, FLUXRECIPE_SLURM_DIR (default /tmp/fluxrecipe-slurm): slurm.conf,
# the munge key and socket, the daemons' state and logs, the caches (demo checkpoints, a tiny preview
# pipeline) and the sweep. Nothing is written to /etc or the home folder; the daemons listen on ports
# FLUXRECIPE_SLURM_PORT and the next one (default 16817, 16818), not SLURM's own 6817/6818. A run stops
# whatever an earlier run left (--keep, or killed) and starts afresh; every wait is bounded.
#
# Usage: tests/slurm/test-slurm.sh [--keep] [--stop] [--no-cgroup] [--purge]
#   --keep       leave the cluster running and its folder in place; prints how to use and stop it
#   --stop       stop a cluster that --keep left, remove its folder, and exit
#   --no-cgroup  proctrack/linuxproc and task/none even where cgroups work (nothing enforces cores or memory)
#   --purge      at the end, apt-get purge the packages this run installed (none if they were there before)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=${FLUXRECIPE_SLURM_DIR:-/tmp/fluxrecipe-slurm}
PORT=${FLUXRECIPE_SLURM_PORT:-16817}
PY=$REPO/.venv/bin/python
PACKAGES=(slurm-wlm munge)
APT_LOCK_WAIT=(-o DPkg::Lock::Timeout=600)  # apt-get waits (up to 10 minutes) while another apt or dpkg holds its lock
MARKER=.fluxrecipe-slurm  # in DIR: this script made the folder, so it may remove it
PARTITION=cpu
ALPHAS=(0 0.5 1)
SWEEP_TIMEOUT=900  # seconds for the whole sweep (it takes 1-3 minutes on 2 cores)
KEEP=0 STOP_ONLY=0 CGROUP=1 PURGE=0
STARTED=$SECONDS
INSTALLED=()   # packages this run installed
CLUSTER_UP=0   # whether this run started daemons (the EXIT trap stops them)
PASSED=0

say() { printf 'test-slurm: %s\n' "$*"; }
die() { printf 'test-slurm: error: %s\n' "$*" >&2; exit 1; }

CHILD=  # the long step running now (bounded): a signal to this script ends it too
bounded() {  # bounded SECONDS CMD...: CMD with a time limit, waited for so that Ctrl-C or a kill stops it at once
    local limit=$1 status=0; shift
    timeout -k 10 "$limit" "$@" &
    CHILD=$!
    wait "$CHILD" || status=$?
    CHILD=
    return "$status"
}
end_child() {  # the step a signal interrupted: TERM (timeout passes it on to its command), KILL after 15 s
    [[ -n $CHILD ]] && kill -0 "$CHILD" 2>/dev/null || return 0
    kill -TERM "$CHILD" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while kill -0 "$CHILD" 2>/dev/null && (( SECONDS < deadline )); do sleep 1; done
    if kill -0 "$CHILD" 2>/dev/null; then pkill -KILL -P "$CHILD" 2>/dev/null; kill -KILL "$CHILD" 2>/dev/null; fi
    wait "$CHILD" 2>/dev/null || true
}

for arg in "$@"; do
    case $arg in
        --keep) KEEP=1 ;;
        --stop) STOP_ONLY=1 ;;
        --no-cgroup) CGROUP=0 ;;
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,/^set -E/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (arguments: --keep, --stop, --no-cgroup, --purge)" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "must run as root (apt-get, and the SLURM and munge daemons): sudo make test-slurm"
[[ $DIR == /* && $DIR =~ ^[A-Za-z0-9/._-]+$ ]] || die "FLUXRECIPE_SLURM_DIR=$DIR: give an absolute path of letters, digits and / . _ - (it goes into slurm.conf)"
if ! [[ $PORT =~ ^[0-9]+$ ]] || (( PORT < 1024 || PORT > 65534 )); then die "FLUXRECIPE_SLURM_PORT=$PORT: give a port from 1024 to 65534 (slurmd takes the next one)"; fi
export SLURM_CONF=$DIR/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin

# --- one run at a time ---------------------------------------------------------------------------------
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock -n 9 || die "another test-slurm run is using $DIR (lock $DIR.lock); wait for it, or set FLUXRECIPE_SLURM_DIR"

# --- stopping (also what an earlier run left) ------------------------------------------------------------

alive() {  # alive PIDFILE: the daemon of that pid file runs, and is ours (its command line names DIR)
    local pid
    [[ -s $1 ]] && pid=$(<"$1") && [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' </proc/"$pid"/cmdline | grep -q -- "$DIR/" || return 1
    grep -q '^State:[[:space:]]*Z' /proc/"$pid"/status 2>/dev/null && return 1  # a zombie has stopped
    echo "$pid"
}

wait_gone() {  # wait_gone SECONDS PIDFILE...: until none of the daemons runs; 1 if some still do
    local deadline=$((SECONDS + $1)) f; shift
    while (( SECONDS < deadline )); do
        for f in "$@"; do alive "$f" >/dev/null && break; f=; done
        [[ -z ${f:-} ]] && return 0
        sleep 1
    done
    return 1
}

stop_cluster() {  # stop the daemons of DIR, jobs first; quiet when there are none
    local run=$DIR/run pids=() f pid
    local files=("$run/slurmctld.pid" "$run/slurmd.pid" "$run/munged.pid")
    if alive "$run/slurmctld.pid" >/dev/null; then
        timeout 20 scancel --quiet --partition="$PARTITION" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while (( SECONDS < deadline )) && [[ -n $(timeout 10 squeue -h -o %i 2>/dev/null) ]]; do sleep 1; done
    fi
    if alive "$run/slurmctld.pid" >/dev/null; then
        timeout 20 scontrol shutdown >/dev/null 2>&1 || true
    fi
    wait_gone 30 "$run/slurmctld.pid" "$run/slurmd.pid" || true
    if pid=$(alive "$run/munged.pid"); then
        kill -TERM "$pid" 2>/dev/null || true
    fi
    if ! wait_gone 10 "${files[@]}"; then  # what did not stop when asked: TERM, then KILL, by pid
        for f in "${files[@]}"; do pid=$(alive "$f") && pids+=("$pid"); done
        say "stopping by signal: pids ${pids[*]}"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait_gone 10 "${files[@]}" || { kill -KILL "${pids[@]}" 2>/dev/null || true; wait_gone 5 "${files[@]}" || say "warning: could not stop pids ${pids[*]}"; }
    fi
    remove_cgroups
}

remove_cgroups() {  # the cgroups slurmd made (slurm_HOST under each v1 hierarchy), if this run's cluster made them
    [[ -f $DIR/cgroups-made ]] || return 0
    local d
    for d in /sys/fs/cgroup/*/"slurm_$(hostname -s)"; do
        [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    rm -f "$DIR/cgroups-made"
}

remove_dir() {
    [[ -e $DIR ]] || return 0
    [[ -f $DIR/$MARKER ]] || die "$DIR exists and was not made by this script: set FLUXRECIPE_SLURM_DIR to another folder"
    rm -rf "$DIR"
}

purge_packages() {  # only what this run's apt-get install put there, and only if nothing else needs it now
    (( PURGE && ${#INSTALLED[@]} )) || return 0
    local removes=() others=()
    mapfile -t removes < <(LC_ALL=C apt-get -s purge "${INSTALLED[@]}" 2>/dev/null | awk '/^Purg /{print $2}' | sort)
    mapfile -t others < <(comm -23 <(printf '%s\n' "${removes[@]}") <(printf '%s\n' "${INSTALLED[@]}" | sort))
    if (( ${#others[@]} )); then  # packages installed since (another apt-get) that depend on ours: keep all
        say "warning: not purging ${INSTALLED[*]}: apt-get would also remove ${others[*]}, which this run did not install"
        return 0
    fi
    say "purging what this run installed: ${INSTALLED[*]}"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get "${APT_LOCK_WAIT[@]}" purge -y -qq "${INSTALLED[@]}" >"$DIR.purge.log" 2>&1 \
        || { say "warning: apt-get purge failed, see $DIR.purge.log"; return 0; }
    rm -f "$DIR.purge.log"
    say "purged: ${#INSTALLED[@]} packages and their config files"
}

on_exit() {
    local status=$?
    trap - EXIT
    end_child
    if (( CLUSTER_UP && !(KEEP && PASSED) )); then stop_cluster; fi
    if (( PASSED && !KEEP )); then remove_dir; fi
    if (( !PASSED && status == 0 )); then status=1; fi
    if (( status != 0 )) && [[ -f $DIR/$MARKER ]]; then
        local what=FAILED
        (( status < 128 )) || what=interrupted
        say "$what after $((SECONDS - STARTED)) s; the cluster is stopped, its logs and the sweep are in $DIR (the next run removes it)"
    fi
    purge_packages
    rm -f "$DIR.lock"  # this run holds the lock (the trap is set once it does)
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM HUP

stop_what_is_left() {  # a cluster and folder an earlier run left (--keep, a failure, a kill)
    [[ -e $DIR ]] || return 0
    [[ -f $DIR/$MARKER ]] || die "$DIR exists and was not made by this script: set FLUXRECIPE_SLURM_DIR to another folder"
    if compgen -G "$DIR/run/*.pid" >/dev/null; then say "stopping what an earlier run left in $DIR"; fi
    stop_cluster
    rm -rf "$DIR"
}

if (( STOP_ONLY )); then
    stop_what_is_left
    PASSED=1
    say "nothing of $DIR is left: its daemons (if any ran) are stopped and the folder is removed"
    exit 0
fi

# --- 1. the packages -------------------------------------------------------------------------------------

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

install_packages() {
    local missing=() p
    command -v apt-get >/dev/null || die "no apt-get: this script installs Debian's slurm-wlm and munge (a Debian or Ubuntu machine)"
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    if (( ${#missing[@]} )); then
        if [[ $(apt-cache policy "${missing[@]}" 2>/dev/null) != *Candidate:* ]] || apt-cache policy "${missing[@]}" | grep -q 'Candidate: (none)'; then
            say "apt-get update (the package lists do not have ${missing[*]})"
            timeout 900 apt-get "${APT_LOCK_WAIT[@]}" update -qq >/dev/null || die "apt-get update failed (is a Debian mirror reachable?)"
        fi
        # what this install adds, as apt-get plans it: the packages --purge may remove again (a diff of all the
        # installed packages before and after would also take in what another apt-get installs meanwhile)
        local planned=()  # (an "Inst NAME [OLD VERSION] ..." line is an upgrade of a package that was there)
        mapfile -t planned < <(LC_ALL=C apt-get -s install --no-install-recommends "${missing[@]}" 2>/dev/null | awk '/^Inst / && $3 !~ /^\[/ {print $2}')
        (( ${#planned[@]} )) || die "apt-get -s install ${missing[*]} plans to install nothing: is the package list usable?"
        say "installing ${missing[*]} with apt-get install --no-install-recommends (the daemons are not started by the packages here)"
        DEBIAN_FRONTEND=noninteractive timeout 1500 apt-get "${APT_LOCK_WAIT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >"$DIR.apt.log" 2>&1 \
            || { tail -5 "$DIR.apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $DIR.apt.log)"; }
        rm -f "$DIR.apt.log"
        for p in "${planned[@]}"; do installed "$p" && INSTALLED+=("$p"); done
        say "installed ${#INSTALLED[@]} packages: ${INSTALLED[*]}"
    fi
    for p in slurmctld slurmd sinfo sbatch srun scontrol munged mungekey; do
        command -v "$p" >/dev/null || die "$p is not on the PATH after installing ${PACKAGES[*]}"
    done
    say "packages: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm), munge $(dpkg-query -W -f='${Version}' munge)"
}

# --- 2. the cluster ----------------------------------------------------------------------------------

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_munge() {
    CLUSTER_UP=1  # from here on, the EXIT trap stops whatever runs
    mkdir -m 700 "$DIR/munge"  # munged wants its key's folder private, its socket's open to all
    mkdir -m 755 "$DIR/run"
    timeout 30 mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null || die "mungekey could not create $DIR/munge/munge.key"
    timeout 30 munged --key-file="$DIR/munge/munge.key" --socket="$DIR/run/munge.socket" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start: $(tail -1 "$DIR/log/munged.log" 2>/dev/null)"
    local deadline=$((SECONDS + 15))
    until timeout 5 munge -S "$DIR/run/munge.socket" -n 2>/dev/null | timeout 5 unmunge -S "$DIR/run/munge.socket" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || die "munged runs but does not answer on $DIR/run/munge.socket within 15 s: $(tail -1 "$DIR/log/munged.log")"
        sleep 1
    done
}

write_slurm_conf() {  # write_slurm_conf cgroup|linuxproc
    local node host
    node=$(timeout 30 slurmd -C 2>/dev/null | head -1)
    [[ $node == NodeName=*CPUs=*RealMemory=* ]] || die "slurmd -C did not describe this machine (got: '$node')"
    host=$(hostname -s)
    if [[ $1 == cgroup ]]; then
        TRACKING="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup"
        printf '%s\n' "CgroupPlugin=autodetect" "ConstrainCores=yes" "ConstrainRAMSpace=yes" >"$DIR/cgroup.conf"
    else
        TRACKING="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"
        rm -f "$DIR/cgroup.conf"
    fi
    cat >"$SLURM_CONF" <<EOF
# A one-node SLURM cluster for fluxrecipe's tests/slurm/test-slurm.sh (this host: controller and compute node).
ClusterName=fluxrecipe-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/run/munge.socket
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$TRACKING
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=3600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=60 State=UP
EOF
}

start_slurm() {  # start_slurm cgroup|linuxproc: 0 when the node is idle and runs a job step, else 1 with $WHY
    local mode=$1 state=
    mkdir -p "$DIR/state/slurmctld" "$DIR/state/slurmd"
    write_slurm_conf "$mode"
    if [[ $mode == cgroup ]] && ! compgen -G "/sys/fs/cgroup/*/slurm_$(hostname -s)" >/dev/null; then
        touch "$DIR/cgroups-made"  # slurmd makes them: the stop removes them again
    fi
    timeout 30 slurmctld -f "$SLURM_CONF" || { WHY="slurmctld did not start: $(grep -m1 -E 'fatal|error' "$DIR/log/slurmctld.log")"; return 1; }
    timeout 30 slurmd -f "$SLURM_CONF" || { WHY="slurmd did not start: $(grep -m1 -E 'fatal' "$DIR/log/slurmd.log")"; return 1; }
    local started=$SECONDS deadline=$((SECONDS + 60))
    while (( SECONDS < deadline )); do
        state=$(timeout 10 sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | head -1) || true
        [[ $state == idle ]] && break
        alive "$DIR/run/slurmctld.pid" >/dev/null || { WHY="slurmctld stopped: $(grep -E 'fatal|error' "$DIR/log/slurmctld.log" | tail -1)"; return 1; }
        alive "$DIR/run/slurmd.pid" >/dev/null || { WHY="slurmd stopped: $(grep -E 'fatal|error' "$DIR/log/slurmd.log" | tail -1)"; return 1; }
        sleep 1
    done
    [[ $state == idle ]] || { WHY="the node is not idle after 60 s (sinfo: '${state:-no answer}'); see $DIR/log/"; return 1; }
    local out
    out=$(timeout 60 srun --partition="$PARTITION" --ntasks=1 --cpus-per-task=1 --mem=64M --time=1 cat /proc/self/cgroup 2>&1) \
        || { WHY="the node is idle but a job step fails: $(tail -1 <<<"$out")"; return 1; }
    if [[ $mode == cgroup && $out != *slurm_* ]]; then WHY="a job step did not run in a SLURM cgroup"; return 1; fi
    say "slurmctld and slurmd up (ports $PORT, $((PORT + 1))); node $(hostname -s) idle, a test step ran, after $((SECONDS - started)) s"
}

start_cluster() {
    local p
    for p in "$PORT" $((PORT + 1)); do
        port_free "$p" || die "port $p on this machine is taken (another SLURM?): set FLUXRECIPE_SLURM_PORT to a free pair"
    done
    mkdir -m 755 "$DIR" "$DIR/log"
    touch "$DIR/$MARKER"
    start_munge
    say "munged up (key $DIR/munge/munge.key, socket $DIR/run/munge.socket)"
    if (( CGROUP )) && start_slurm cgroup; then
        TRACKING_SAID="proctrack/cgroup, task/cgroup (cores and memory enforced per job)"
    else
        if (( CGROUP )); then
            say "cgroups do not work here ($WHY): restarting with proctrack/linuxproc and task/none"
            stop_slurm_only
        fi
        start_slurm linuxproc || die "$WHY"
        TRACKING_SAID="proctrack/linuxproc, task/none (nothing enforces cores or memory)"
    fi
    local node
    node=$(grep '^NodeName=' "$SLURM_CONF" | grep -o -E '^NodeName=[^ ]+|CPUs=[0-9]+|RealMemory=[0-9]+' | paste -sd' ')
    say "slurm.conf: $node (from slurmd -C), partition $PARTITION; $TRACKING_SAID; no accounting database"
}

stop_slurm_only() {  # after a failed cgroup start: slurmctld and slurmd down, munged kept
    timeout 20 scontrol shutdown >/dev/null 2>&1 || true
    if ! wait_gone 30 "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"; then
        local f pid
        for f in "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid"; do pid=$(alive "$f") && kill -KILL "$pid" 2>/dev/null; done
        wait_gone 5 "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid" || die "slurmctld or slurmd of the cgroup attempt does not stop"
    fi
    remove_cgroups
    rm -rf "$DIR/state"
}

# --- 3. the sweep --------------------------------------------------------------------------------------

check_venv() {
    [[ -x $PY ]] || die "no $PY: run \`make test\` first (it makes .venv with the test, sweep and preview extras)"
    "$PY" -c 'import hydra_plugins.hydra_submitit_launcher, submitit, transformers, pytest' 2>/dev/null \
        || die "$PY lacks the sweep, preview or test extras (hydra-submitit-launcher, transformers, pytest): run \`make test\` or .venv/bin/pip install -e '.[test]'"
}

build_pipeline() {  # a tiny FluxPipeline (random weights) that fits the demo recipe's architecture: previews offline
    local code='import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2])
from sweep_helpers import build_pipeline; from fluxrecipe.families.flux1 import DEMO
build_pipeline(Path(sys.argv[1]), DEMO["schnell"])'
    bounded 300 "$PY" -c "$code" "$DIR/pipeline" "$REPO/tests" >"$DIR/log/pipeline.log" 2>&1 \
        || die "building the preview pipeline failed: $(tail -1 "$DIR/log/pipeline.log")"
}

SWEEP_ARGS=(
    -m recipe=demo "recipe.alpha=$(IFS=,; echo "${ALPHAS[*]}")"
    hydra/launcher=slurm "hydra.launcher.partition=$PARTITION" hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1 hydra.launcher.timeout_min=10
    hydra.sweep.dir=sweep
    preview=true preview.pipeline=../pipeline "preview.prompts=[a red fox in fresh snow]" "preview.seeds=[0,1]" preview.steps=2 preview.height=64 preview.width=64
)

shell_word() {  # an argument as one would type it: quoted where the shell would split or expand it
    if [[ $1 =~ [^A-Za-z0-9_./=,:@%+-] ]]; then printf "'%s'" "$1"; else printf '%s' "$1"; fi
}

run_sweep() {
    local words=() arg
    for arg in "${SWEEP_ARGS[@]}"; do words+=("$(shell_word "$arg")"); done
    mkdir -p "$DIR/work"
    say "running the sweep from $DIR/work:"
    say "  python -m fluxrecipe ${words[*]}"
    # This cluster has no accounting database, so submitit's sacct polls fail (it then finds finished jobs by
    # their result files): those lines go to log/sweep.log and are counted, not shown.
    local status=0 start=$SECONDS
    : >"$DIR/log/sweep.log"  # there before tail opens it
    (cd "$DIR/work" && export PYTHONUNBUFFERED=1 && exec timeout -k 30 "$SWEEP_TIMEOUT" "$PY" -m fluxrecipe "${SWEEP_ARGS[@]}") >"$DIR/log/sweep.log" 2>&1 &
    local sweep_pid=$!  # shown as it goes, without submitit's sacct lines
    tail -n +1 -f --pid="$sweep_pid" "$DIR/log/sweep.log" \
        | grep --line-buffered -v -e 'Bypassing sacct error' -e 'Slurm accounting storage is disabled' | sed -u 's/^/    | /' &
    CHILD=$sweep_pid
    wait "$sweep_pid" || status=$?
    CHILD=
    wait "$!" 2>/dev/null || true  # the display: tail ends a second after the sweep
    local polls
    polls=$(grep -o 'Call #[0-9]* - Bypassing sacct error' "$DIR/log/sweep.log" | sort -u | wc -l)
    if (( status == 124 )); then
        die "the sweep did not end within $SWEEP_TIMEOUT s (squeue: $(timeout 10 squeue -h -o '%i %T %R' | tr '\n' ' '))"
    fi
    (( status == 0 )) || die "the sweep exited with status $status (its log: $DIR/log/sweep.log)"
    say "the sweep ended after $((SECONDS - start)) s; submitit asked sacct $polls times, in vain (no accounting database: harmless here)"
}

check_sweep() {
    local sweep=$DIR/work/sweep problems=() alpha job record state
    # SLURM's view: one array task per job (submitit's log of each names it), each COMPLETED with exit code 0
    local tasks=() array_id
    mapfile -t tasks < <(grep -ho 'Starting with JobEnvironment(job_id=[0-9_]*' "$sweep"/.submitit/*/*_log.out 2>/dev/null | sed 's/.*job_id=//' | sort -u)
    array_id=${tasks[0]%%_*}
    if [[ ${#tasks[@]} != "${#ALPHAS[@]}" || -z $array_id ]]; then
        problems+=("expected ${#ALPHAS[@]} SLURM array tasks in the submitit logs ($sweep/.submitit), found ${#tasks[@]}: ${tasks[*]}")
    else
        state=$(timeout 20 scontrol -o show job "$array_id" 2>&1 | sed -E 's/.* JobState=([A-Z_]+) .* ExitCode=([0-9:]+) .*/JobState=\1 ExitCode=\2/' | sort | uniq -c | sed 's/^ *//') || true
        [[ $state == "${#ALPHAS[@]} JobState=COMPLETED ExitCode=0:0" ]] \
            || problems+=("SLURM job $array_id: expected ${#ALPHAS[@]} array tasks COMPLETED with exit code 0:0, scontrol says: ${state//$'\n'/; }")
    fi
    for alpha in "${ALPHAS[@]}"; do
        job="alpha=$alpha"  # the folder of a job: what differs between the jobs
        record=$(cd "$sweep/$job" 2>/dev/null && timeout 60 "$PY" -c 'import json; r = json.load(open("fluxrecipe-job.json")); print(r["status"], r.get("error") or "")' 2>&1) \
            || { problems+=("$job: no readable fluxrecipe-job.json"); continue; }
        [[ $record == "ok " ]] || problems+=("$job: status $record")
        [[ $(compgen -G "$sweep/$job/previews/*.png" | wc -l) == 2 ]] || problems+=("$job: expected 2 preview images in $job/previews")
        bounded 120 "$PY" -m fluxrecipe verify "$sweep/$job/transformer" >"$DIR/log/verify.log" 2>&1 \
            || problems+=("fluxrecipe verify $job/transformer: $(tail -1 "$DIR/log/verify.log")")
    done
    local f
    for f in summary.csv summary.md summary_blocks.csv summary.png grid.png index.html; do
        [[ -s $sweep/$f ]] || problems+=("the sweep folder has no $f")
    done
    [[ $(grep -c ',ok,' "$sweep/summary.csv" 2>/dev/null) == "${#ALPHAS[@]}" ]] || problems+=("summary.csv does not list ${#ALPHAS[@]} jobs ok")
    # grid.png: a column per alpha, a row per seed, each cell the job's own preview (it prints the summary's rows)
    bounded 120 "$PY" "$REPO/tests/slurm/sweep_report.py" "$sweep" "${ALPHAS[@]}" >"$DIR/log/report.log" 2>&1 \
        || problems+=("$(tail -1 "$DIR/log/report.log")")
    bounded 120 "$PY" -m fluxrecipe summary --no-plot "$sweep" >"$DIR/log/summary.log" 2>&1 \
        || problems+=("fluxrecipe summary $sweep: $(tail -1 "$DIR/log/summary.log")")
    # the same merge on this machine, without SLURM: the same bytes
    if bounded 300 "$PY" -m fluxrecipe recipe=demo recipe.alpha=0.5 output="$DIR/local-merge" progress=false \
        hydra.run.dir="$DIR/work/local-run" >"$DIR/log/local-merge.log" 2>&1; then
        local a b
        for a in "$DIR"/local-merge/*.safetensors; do
            b="$sweep/alpha=0.5/transformer/$(basename "$a")"
            cmp -s "$a" "$b" || problems+=("$(basename "$a") of the SLURM job (alpha 0.5) differs from the same merge run here without SLURM")
        done
    else
        problems+=("the merge without SLURM (alpha 0.5) failed: $(tail -1 "$DIR/log/local-merge.log")")
    fi
    if (( ${#problems[@]} )); then
        printf 'test-slurm: error: %s\n' "${problems[@]}" >&2
        exit 1
    fi
    sed 's/^/test-slurm: /' "$DIR/log/report.log"
    say "checked: SLURM array job $array_id: ${#ALPHAS[@]} tasks COMPLETED (exit 0:0); every job ok with 2 previews;" \
        "summary.csv/.md, summary.png, grid.png, index.html written; \`fluxrecipe summary\` rereads the folder;" \
        "\`fluxrecipe verify\` passes on every model; alpha 0.5's shard equals the merge run without SLURM byte for byte"
}

# --- main ------------------------------------------------------------------------------------------------

check_venv
install_packages
stop_what_is_left
start_cluster
export FLUXRECIPE_CACHE=$DIR/cache HF_HUB_OFFLINE=1  # the demo checkpoints in DIR; nothing from the hub
say "building a tiny preview pipeline (random weights, the demo's architecture) in $DIR/pipeline"
build_pipeline
run_sweep
check_sweep
PASSED=1
if (( KEEP )); then
    say "passed in $((SECONDS - STARTED)) s; --keep: the cluster runs on. Use it with: export SLURM_CONF=$SLURM_CONF"
    say "  the sweep: $DIR/work/sweep; logs: $DIR/log; stop it all with: $0 --stop"
else
    say "passed in $((SECONDS - STARTED)) s; cluster stopped, $DIR removed"
fi
if (( ${#INSTALLED[@]} )) && (( !PURGE )); then
    say "left installed: ${INSTALLED[*]} (apt-get purge ${INSTALLED[*]} removes them; --purge does it at the end)"
fi
