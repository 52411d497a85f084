"""A warm child builds Prefect's logging again only when what it is made of changed
(orchestrator.prefect_env.refresh_imported); run in a fresh interpreter, as the warm
process imports Prefect, so this test process's own Prefect import plays no part."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

from orchestrator import prefect_env

CHILD = r"""
import json, logging, os, sys
from orchestrator import prefect_env, zygote
zygote.preload()  # what the warm process imports: Prefect builds its logging on the way
import prefect.logging.configuration as cfg
assert cfg.PROCESS_LOGGING_CONFIG
built = []
real = cfg.setup_logging
cfg.setup_logging = lambda **kw: built.append(1) or real(**kw)
steps = []
for change in json.loads(sys.argv[1]):
    os.environ.update(change)
    before = len(built)
    prefect_env.refresh_imported()
    steps.append([len(built) - before, logging.getLogger("prefect").level])
print(json.dumps(steps))
"""


def _steps(tmp_path: Path, *changes: dict[str, str]) -> list[list[int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "warm-prefect")
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(changes)],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_logging_is_built_again_only_when_its_inputs_change(tmp_path):
    command = {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": "http://127.0.0.1:1/api"}
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    user_file = tmp_path / "mine.yml"
    user_file.write_text(Path(DEFAULT_LOGGING_SETTINGS_PATH).read_text())
    steps = _steps(
        tmp_path,
        command,  # another home and server, Ferry's defaults: the same logging
        {"PREFECT_LOGGING_LEVEL": "DEBUG"},  # a setting it fills in
        {"PREFECT_LOGGING_LEVEL": "WARNING"},  # and back
        {"PREFECT_LOGGING_TO_API_ENABLED": "false"},  # a logging setting
        {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"},  # a key of the config itself
        {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"},  # nothing changed since
        {"PREFECT_LOGGING_SETTINGS_PATH": str(user_file)},  # the user's own file: each time
        {},
    )
    debug, warning = 10, 30
    assert steps[0] == [0, warning]
    assert steps[1] == [1, debug]
    assert steps[2] == [1, warning]
    assert steps[3][0] == 1 and steps[4][0] == 1 and steps[5][0] == 0
    assert steps[6][0] == 1 and steps[7][0] == 1


def test_the_default_logging_template_fills_in_only_the_settings_compared(tmp_path):
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    names = string.Template(Path(DEFAULT_LOGGING_SETTINGS_PATH).read_text()).get_identifiers()
    # a Prefect upgrade that fills in another setting must be compared too
    assert set(names) <= prefect_env.LOGGING_TEMPLATE_NAMES, names
