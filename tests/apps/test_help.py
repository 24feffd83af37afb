"""Every command's --help prints its options (argparse formats help strings with %, so one stray % in a help text
turns --help into a traceback)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

SCRIPTS = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_prints_its_help():
    runs = {}
    for command, target in SCRIPTS.items():
        module, function = target.split(":")
        code = f"import sys; sys.argv = [{command!r}, '--help']; from {module} import {function}; {function}()"
        runs[command] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    assert len(runs) == 6
    for command, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, (command, err[-2000:])
        assert out.startswith(f"usage: {command}") and "--help" in out, (command, out[:200])
