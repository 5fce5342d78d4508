"""The hostile table of test_hostile.py as a user's shell runs it: one fresh interpreter per command.

The fast tier runs every row of the table in this process (helpers.run_in_process: the same Click
command, argv, cwd and environment, its exit status and output). This slow-tier test runs, for each
script the table exercises, its first row again as a real subprocess, so the process boundary holds
too: the exit status the interpreter returns, nothing printed at import, no traceback on the way out."""

from __future__ import annotations

import pytest
from helpers import run_script
from test_hostile import CASES, tree, world  # noqa: F401  (world: the fixture the rows are built in)

pytestmark = pytest.mark.slow


def test_one_row_per_script_as_a_subprocess(world, tmp_path):  # noqa: F811
    seen: dict[str, str] = {}
    for case_id, setup, fragments in CASES:
        case = world / "cases" / f"process-{case_id}"
        case.mkdir()
        cmd = setup(world, case)
        if cmd[0] in seen:
            continue
        seen[cmd[0]] = case_id
        before = tree(world)
        proc = run_script(cmd[0], *cmd[1:], cwd=tmp_path, env_extra={"OPENAI_API_KEY": "sk-test-not-sent"},
                          inprocess=False)
        after = tree(world)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("llamaforge: error:")]
        assert proc.returncode == 1, (case_id, proc.returncode, proc.stderr[-3000:])
        assert len(errors) == 1 and "Traceback" not in proc.stderr, (case_id, proc.stderr[-3000:])
        assert all(f in errors[0] for f in fragments) and "Fix:" in errors[0], (case_id, errors[0])
        assert proc.stdout.strip() == "" or "llamaforge: error:" not in proc.stdout, (case_id, proc.stdout)
        assert after == before, (case_id, sorted(set(after.items()) ^ set(before.items()))[:10])
    # every script the table exercises was run as a real process
    assert len(seen) >= 8, seen
