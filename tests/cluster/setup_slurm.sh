#!/usr/bin/env bash
# A real one-host SLURM cluster for tests/cluster/ (README: "Running on SLURM").
#
#   sudo bash tests/cluster/setup_slurm.sh
#
# Installs slurm-wlm and munge with apt-get when they are missing, writes /etc/slurm/slurm.conf
# (that exact path: the Snakemake SLURM job-step plugin clears SLURM_CONF inside jobs), starts
# munged, slurmctld and slurmd, and waits until the node is idle. Safe to run again: it installs
# nothing that is there, rewrites the config only when it changed, restarts only daemons that are
# not running or whose config changed, and only processes it started (by their pid files).
#
# Debian/Ubuntu, as root. Every wait has a timeout; every failure says what failed and shows the
# relevant log. Ends with the lines
#   SLURMCTLD_LOG=/var/log/slurm/slurmctld.log
#   SLURM_PARTITION=<the default partition>
#
# Environment: SLURM_SETUP_TIMEOUT (seconds to wait for each daemon and the node, default 120),
# SLURM_PARTITION (the default partition, default "debug"), SLURM_TEST_PARTITION (a second,
# non-default partition on the same node, default "llamaforge": the tests submit there through
# their profile, to show that a site's partition setting reaches sbatch).
#
# It refuses to replace an /etc/slurm/slurm.conf that it did not write (a real cluster's).
set -euo pipefail

TIMEOUT="${SLURM_SETUP_TIMEOUT:-120}"
PARTITION="${SLURM_PARTITION:-debug}"
TEST_PARTITION="${SLURM_TEST_PARTITION:-llamaforge}"
MARKER="Written by llamaforge tests/cluster/setup_slurm.sh"
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
STATEDIR=/var/lib/slurm
CTLD_LOG="$LOGDIR/slurmctld.log"
SLURMD_LOG="$LOGDIR/slurmd.log"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "setup_slurm: $*"; }
die() {
    echo "setup_slurm: ERROR: $*" >&2
    exit 1
}
show_log() {  # show_log FILE: the end of a daemon's log, for a failure message
    if [ -f "$1" ]; then
        echo "---- last lines of $1 ----" >&2
        tail -n 30 "$1" >&2 || true
        echo "---- end of $1 ----" >&2
    else
        echo "(no log at $1)" >&2
    fi
}
running() {  # running PIDFILE: the process named in PIDFILE is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
stop() {  # stop PIDFILE NAME: end a daemon this script started, by its pid file
    if running "$1"; then
        local pid
        pid="$(cat "$1")"
        say "stopping $2 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}
wait_for() {  # wait_for DESCRIPTION COMMAND...: poll COMMAND until it succeeds or TIMEOUT passes
    local what="$1"
    shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            return 1
        fi
        sleep 0.5
    done
    say "$what: ok"
}

# ---- preconditions -----------------------------------------------------------------------------
[ "$(uname -s)" = Linux ] || die "SLURM needs Linux (this is $(uname -s))"
[ "$(id -u)" = 0 ] || die "run as root (installs packages and starts daemons): sudo bash $0"
if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script (a real cluster?); not touching it. Move it away to use the one-host test cluster."
fi

# ---- packages ----------------------------------------------------------------------------------
need_install=0
for cmd in munged munge unmunge slurmctld slurmd sbatch squeue sinfo scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
    command -v apt-get >/dev/null 2>&1 || die "slurm is not installed and there is no apt-get; install slurm-wlm and munge by hand"
    say "installing slurm-wlm and munge with apt-get (a minute or two)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed (no network to the Debian mirror?)"
    # policy-rc.d or a missing systemd may stop the packages' own service start; we start the
    # daemons ourselves below, so such failures of the maintainer scripts are not fatal here.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/tmp/setup_slurm.apt.log 2>&1 || {
        tail -n 30 /tmp/setup_slurm.apt.log >&2
        die "apt-get install slurm-wlm munge failed (full output: /tmp/setup_slurm.apt.log)"
    }
    for cmd in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd is still missing after installing slurm-wlm"
    done
else
    say "slurm-wlm and munge are installed"
fi
say "$(sinfo -V)"

# ---- munge -------------------------------------------------------------------------------------
getent passwd munge >/dev/null || die "the munge user is missing (the munge package creates it)"
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --force --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged is running"
else
    stop "$MUNGE_PID" munged
    say "starting munged"
    # As the munge user, which owns the key, as the Debian service does; --force: start even
    # where munged frowns upon the permissions it finds (containers).
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- munged --force || die "munged did not start; see /var/log/munge/munged.log"
    else
        munged --force || die "munged did not start; see /var/log/munge/munged.log"
    fi
    wait_for "munge credential round trip" sh -c 'munge -n | unmunge' || {
        show_log /var/log/munge/munged.log
        die "munge -n | unmunge still fails after ${TIMEOUT}s"
    }
fi

# ---- slurm.conf --------------------------------------------------------------------------------
command -v slurmd >/dev/null || die "slurmd missing"
CPUS="$(nproc)"
HW="$(slurmd -C 2>/dev/null | head -n 1)" || true
[ -n "$HW" ] || die "slurmd -C printed nothing; cannot size the node"
HW_MEM="$(sed -n 's/.*RealMemory=\([0-9][0-9]*\).*/\1/p' <<<"$HW")"
[ -n "$HW_MEM" ] || die "no RealMemory in 'slurmd -C' output: $HW"
# "a little under" what the hardware shows: a node with more configured than present is drained.
MARGIN=$((HW_MEM / 20))
[ "$MARGIN" -lt 256 ] && MARGIN=256
MEM=$((HW_MEM - MARGIN))
[ "$MEM" -gt 0 ] || die "computed RealMemory $MEM from '$HW'"

mkdir -p /etc/slurm "$LOGDIR" "$STATEDIR/slurmctld" "$STATEDIR/slurmd"
NEW_CONF="$(mktemp)"
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
# $MARKER: a one-host test cluster, not for production.
ClusterName=llamaforge
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATEDIR/slurmctld
SlurmdSpoolDir=$STATEDIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# squeue (Snakemake's status command here, there is no accounting database) must still see
# finished jobs while Snakemake polls them, and the SLURM test sees every job of a build that takes
# over 10 minutes on 2 cores (600 s purged its first job before its check).
MinJobAge=3600
SlurmctldTimeout=60
SlurmdTimeout=60
# slurmd -C: $HW
NodeName=localhost CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=$TEST_PARTITION Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
conf_changed=0
if [ ! -f "$CONF" ] || ! cmp -s "$NEW_CONF" "$CONF"; then
    [ -f "$CONF" ] && cp "$CONF" "$CONF.bak"
    install -m 0644 "$NEW_CONF" "$CONF"
    conf_changed=1
    say "wrote $CONF (CPUs=$CPUS RealMemory=$MEM, partitions $PARTITION (default), $TEST_PARTITION)"
else
    say "$CONF is up to date"
fi
export SLURM_CONF="$CONF"

# ---- slurmctld, slurmd -------------------------------------------------------------------------
if [ "$conf_changed" = 1 ]; then
    stop "$SLURMD_PID" slurmd
    stop "$CTLD_PID" slurmctld
fi
if running "$CTLD_PID"; then
    say "slurmctld is running (pid $(cat "$CTLD_PID"))"
else
    rm -f "$CTLD_PID"
    say "starting slurmctld"
    # -i: ignore unreadable state left by an earlier, killed slurmctld.
    slurmctld -i || { show_log "$CTLD_LOG"; die "slurmctld did not start"; }
fi
wait_for "slurmctld answers" scontrol ping || {
    show_log "$CTLD_LOG"
    die "slurmctld does not answer 'scontrol ping' after ${TIMEOUT}s"
}
if running "$SLURMD_PID"; then
    say "slurmd is running (pid $(cat "$SLURMD_PID"))"
else
    rm -f "$SLURMD_PID"
    say "starting slurmd"
    # -N: this node's name in slurm.conf, whatever the host name is.
    slurmd -N localhost || { show_log "$SLURMD_LOG"; die "slurmd did not start"; }
fi

node_ready() {
    case "$(sinfo -h -n localhost -o %t 2>/dev/null | head -n 1)" in
        idle | mix | mixed | alloc | allocated | comp | completing) return 0 ;;
        *) return 1 ;;
    esac
}
if ! wait_for "node localhost is up" node_ready; then
    # a node drained by an earlier misconfiguration stays drained: resume it once and try again
    say "node state '$(sinfo -h -n localhost -o %t 2>/dev/null | head -n 1)'; trying to resume it"
    scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
    wait_for "node localhost is up after resume" node_ready || {
        sinfo -N -l >&2 || true
        sinfo -R >&2 || true
        show_log "$SLURMD_LOG"
        show_log "$CTLD_LOG"
        die "node localhost is not idle after ${TIMEOUT}s (state: $(sinfo -h -n localhost -o %t 2>/dev/null | head -n 1))"
    }
fi
sinfo
echo "SLURMCTLD_LOG=$CTLD_LOG"
echo "SLURM_PARTITION=$PARTITION"
echo "SLURM_TEST_PARTITION=$TEST_PARTITION"
