"""A running one-host SLURM cluster for the `cluster` tests, set up by setup_slurm.sh.

When the cluster is set up (and the tests run):
  - in CI (CI=true): always; setup_slurm.sh installs and starts SLURM, and any failure fails the
    tests loudly, with the script's output; nothing is skipped;
  - with LLAMAFORGE_SLURM_SETUP=1: likewise, on a developer's machine (root, Debian/Ubuntu);
  - on a machine where setup_slurm.sh ran before (its /etc/slurm/slurm.conf is there), e.g. after
    `sudo bash tests/cluster/setup_slurm.sh`: the script only checks that the daemons still run.
Otherwise (not Linux, not root, or setup not allowed) the tests are skipped, with the reason.
The script never overwrites a slurm.conf that it did not write, so a real cluster's login node is
left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().with_name("setup_slurm.sh")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "Written by llamaforge tests/cluster/setup_slurm.sh"
# A partition that is not the cluster's default: the tests submit to it through the profile, so
# they show that the site setting reaches sbatch (slurmctld logs each job's partition).
TEST_PARTITION = "llamaforge"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    default_partition: str
    ctld_log: Path
    cpus: int
    setup_output: str


def _why_setup_not_allowed() -> str | None:
    import importlib.util

    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return 'the slurm extra is not installed (pip install -e ".[slurm]")'
    if not sys.platform.startswith("linux"):
        return f"SLURM needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root to install and start SLURM (sudo, or CI)"
    ours = SLURM_CONF.is_file() and MARKER in SLURM_CONF.read_text(errors="replace")
    if not (_truthy("LLAMAFORGE_SLURM_SETUP") or ours):
        have = "sbatch is installed but" if shutil.which("sbatch") else "sbatch is not installed and"
        script = SETUP.relative_to(Path.cwd()) if SETUP.is_relative_to(Path.cwd()) else SETUP
        return (f"{have} no one-host test cluster is set up: run `sudo bash {script}` once, or set "
                "LLAMAFORGE_SLURM_SETUP=1 (or CI=true) to let the tests install and start it")
    return None


def _scontrol_config(key: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(rf"^{key}\s*=\s*(\S+)", out, re.M)
    return m.group(1) if m else None


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    ci = _truthy("CI")
    why = _why_setup_not_allowed()
    if why and not ci:
        pytest.skip(f"SLURM cluster test: {why}")
    # CI must not skip: run the script whatever the checks say, and fail with what it printed.
    env = {**os.environ, "SLURM_TEST_PARTITION": TEST_PARTITION}
    try:
        proc = subprocess.run(["bash", str(SETUP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{SETUP} did not finish in 900 s:\n{out[-5000:]}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"SLURM could not be set up: {SETUP} exited {proc.returncode}"
                    + (f" (the test would be skipped outside CI: {why})" if why else "")
                    + f"\n{proc.stdout[-6000:]}", pytrace=False)
    values = dict(re.findall(r"^(SLURMCTLD_LOG|SLURM_PARTITION|SLURM_TEST_PARTITION)=(.*)$", proc.stdout, re.M))
    ctld_log = Path(_scontrol_config("SlurmctldLogFile") or values.get("SLURMCTLD_LOG", "/var/log/slurm/slurmctld.log"))
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout.split()
    if TEST_PARTITION not in partitions:
        pytest.fail(f"partition {TEST_PARTITION!r} missing after setup; sinfo shows {partitions}\n"
                    f"{proc.stdout[-3000:]}", pytrace=False)
    cpus = int(subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%c"], capture_output=True, text=True,
                              timeout=30).stdout.split()[0].rstrip("+"))
    return SlurmCluster(partition=TEST_PARTITION, default_partition=values.get("SLURM_PARTITION", ""),
                        ctld_log=ctld_log, cpus=cpus, setup_output=proc.stdout)
