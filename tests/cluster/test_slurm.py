"""The default target through a real SLURM (issue 7): `snakemake --profile profiles/slurm`.

tests/cluster/setup_slurm.sh (through the `slurm_cluster` fixture in conftest.py) installs and
starts a one-host cluster. The demo is then built twice, in two fresh copies of the workflow:
locally (`--cores N`) and through SLURM (`--profile profiles/slurm` plus a test profile holding
the site settings of this cluster). The test asserts that every job that runs a command went
through sbatch (a SLURM job id per job in Snakemake's log, one sbatch log file per job, and
slurmctld's own log allocating and completing each of those ids in the partition the profile
asked for), and that the two builds' outputs are byte-identical.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import copy_workflow, snakemake, snakemake_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1500),
              pytest.mark.xdist_group("demo_build")]  # with the other users of the session's demo build

# Folders that hold build outputs (whatever exists after the default build is compared).
OUTPUT_DIRS = ("resources", "tokenizers", "imported", "merged", "exports", "eval")
# Not outputs: Snakemake's empty marker in directory outputs, logs, benchmark tables.
NOT_COMPARED = (".snakemake_timestamp", "*.log", "*.tsv")


def check(proc: subprocess.CompletedProcess, what: str) -> str:
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-8000:]}")
    return proc.stdout


def _stop(proc: subprocess.Popen, log: Path | None = None) -> None:
    """End a snakemake run that is still going: SIGINT first (Snakemake then cancels its SLURM
    jobs), SIGKILL after a minute, and scancel whatever SLURM jobs of the run are left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
        if log is not None and log.is_file():
            for uuid in set(re.findall(r"SLURM run ID: (\S+)", log.read_text(errors="replace"))):
                subprocess.run(["scancel", "--name", uuid], capture_output=True, timeout=60)


def planned_jobs(text: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of each job with a command in a dry run (rules without output, like
    `all`, run no command and are not submitted)."""
    jobs, rule, fields = [], None, {}
    for line in text.splitlines() + ["<end>"]:
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):\s*$", line)
        if m or line == "<end>":
            if rule and fields.get("output"):
                jobs.append((rule, fields.get("wildcards", "")))
            rule, fields = (m.group(1) if m else None), {}
            continue
        f = re.match(r"^ {4}(\w+): (.*)$", line)
        if rule and f:
            fields.setdefault(f.group(1), f.group(2))
    return jobs


def output_digests(root: Path) -> dict[str, str]:
    out = {}
    for d in OUTPUT_DIRS:
        for p in sorted((root / d).rglob("*")) if (root / d).is_dir() else []:
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in NOT_COMPARED):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_demo_through_slurm_matches_a_local_build(slurm_cluster, demo_build, tmp_path):
    cores = str(min(2, slurm_cluster.cpus))  # the threads of the local reference build (--cores 2)
    local = demo_build  # the local reference: the session's `snakemake --cores 2` of a fresh copy (conftest.py)
    cluster = copy_workflow(tmp_path / "slurm")

    # The site settings of this cluster, layered over profiles/slurm as a site would: the
    # partition for every rule, squeue for status (no accounting database here, so no sacct),
    # quick first status checks for second-long jobs, threads capped at the node's cores (the
    # local build's --cores gives every rule the same threads, so the commands are the same), and
    # the sbatch logs of successful jobs kept for the assertions below.
    rules = check(snakemake(cluster, "--list-rules", check=False, timeout=1200, merge_output=True), "snakemake --list-rules").split()
    rules = [r for r in rules if re.fullmatch(r"[A-Za-z_]\w*", r)]
    site = tmp_path / "site-profile"
    site.mkdir()
    (site / "config.yaml").write_text(yaml.safe_dump({
        "set-resources": {r: {"slurm_partition": slurm_cluster.partition} for r in rules},
        "slurm-status-command": "squeue",
        "slurm-init-seconds-before-status-checks": 2,
        "slurm-keep-successful-logs": True,
        "max-threads": int(cores),
        "jobs": 4,
    }, sort_keys=False))
    profile_args = ["--profile", str(cluster / "profiles" / "slurm"), "--profile", str(site)]

    expected = planned_jobs(check(snakemake(cluster, "-n", *profile_args, check=False, timeout=1200, merge_output=True), "the SLURM dry run"))
    assert expected, "the default target plans no jobs?"

    with open(tmp_path / "slurm.log", "w") as slurm_log:
        log_start = slurm_cluster.ctld_log.stat().st_size if slurm_cluster.ctld_log.is_file() else 0
        t0 = time.monotonic()
        run = subprocess.Popen([sys.executable, "-m", "snakemake", "--nocolor", *profile_args], cwd=cluster,
                               env=snakemake_env(), stdout=slurm_log, stderr=subprocess.STDOUT)
        try:
            slurm_rc = run.wait(timeout=1200)
        finally:
            _stop(run, tmp_path / "slurm.log")
        slurm_seconds = time.monotonic() - t0
    text = (tmp_path / "slurm.log").read_text(errors="replace")
    assert slurm_rc == 0, f"snakemake --profile profiles/slurm ({len(expected)} jobs) failed:\n{text[-8000:]}"

    # 1. Snakemake submitted every job with a command through sbatch, and got a job id for each
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.?$", text, re.M)
    ids = [int(i) for i, _ in submitted]
    assert len(ids) == len(expected) == len(set(ids)), (
        f"{len(expected)} jobs planned, {len(ids)} submitted to SLURM (ids {ids}):\n{text[-6000:]}")
    ran_here = set(re.findall(r"^localrule (\w+):", text, re.M)) & {r for r, _ in expected}
    assert not ran_here, f"jobs of {sorted(ran_here)} ran on the submit host, not through SLURM"
    by_rule = sorted(re.search(r"/rule_(\w+?)/", log).group(1) for _, log in submitted)
    assert by_rule == sorted(r for r, _ in expected), f"submitted rules {by_rule} != planned {sorted(expected)}"
    for _, log in submitted:  # the job's own sbatch log: it ran snakemake for its rule on the node
        assert Path(log).is_file(), f"no SLURM log at {log}"
        body = Path(log).read_text(errors="replace")
        assert "slurm-jobstep" in body and "Finished jobid" in body, (
            f"{log} does not show the job step finishing:\n{body[-3000:]}")

    # 2. slurmctld allocated and completed each of those ids, in the partition the profile named
    ctld = slurm_cluster.ctld_log.read_bytes()[log_start:].decode(errors="replace")
    # the main scheduler logs "sched: Allocate JobId=N ... Partition=P", the backfill scheduler
    # "sched/backfill: _start_job: Started JobId=N in P on NODE"
    allocated = {int(j): p for j, p in re.findall(r"sched: Allocate JobId=(\d+) .*?Partition=(\S+)", ctld)}
    allocated.update({int(j): p for j, p in re.findall(r"_start_job: Started JobId=(\d+) in (\S+) on", ctld)})
    completed = {int(j) for j in re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS 0", ctld)}
    missing = [i for i in ids if i not in allocated or i not in completed]
    assert not missing, (f"slurmctld's log ({slurm_cluster.ctld_log}) has no allocation or clean completion for "
                         f"jobs {missing}:\n{ctld[-4000:]}")
    wrong = {i: allocated[i] for i in ids if allocated[i] != slurm_cluster.partition}
    assert not wrong, f"jobs ran outside partition {slurm_cluster.partition!r}: {wrong}"
    squeue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k", "-j", ",".join(map(str, ids))],
                            capture_output=True, text=True, timeout=60).stdout
    states = dict(line.split("|", 1) for line in squeue.splitlines() if "|" in line)
    not_done = {i: states.get(str(i)) for i in ids if not (states.get(str(i)) or "").startswith("COMPLETED")}
    assert not not_done, f"squeue does not show these jobs COMPLETED: {not_done}\n{squeue}"

    # 3. the same bytes as the local build
    got, want = output_digests(cluster), output_digests(local)
    assert sorted(got) == sorted(want), (f"different output files: only on SLURM {sorted(set(got) - set(want))}, "
                                         f"only local {sorted(set(want) - set(got))}")
    differ = [f for f in want if got[f] != want[f]]
    assert not differ, f"outputs differ between the SLURM and the local build: {differ}"
    print(f"{len(ids)} SLURM jobs in {slurm_seconds:.0f} s; {len(want)} output files identical")

    # 4. and SLURM's run is as finished as a local one
    again = check(snakemake(cluster, "-n", *profile_args, check=False, timeout=1200, merge_output=True),
                  "the dry run after the SLURM build")
    assert "Nothing to be done" in again, again[-3000:]
