"""The `ferry` executable: a warm process runs the command when one is up
(orchestrator/zygote.py); otherwise the command line is imported and runs here."""

from __future__ import annotations

import sys


def main() -> None:
    from orchestrator import zygote  # stdlib only: ~0.1 s less than importing the CLI

    code = zygote.run_warm(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from orchestrator.cli.main import main as run_here

    run_here(warm_tried=True)
