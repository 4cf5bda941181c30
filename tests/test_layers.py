"""The layers of atrium hold: pyproject.toml's import-linter contracts (runtime above http
above domain ... above core and seams; core and seams importing nothing of atrium;
supervision knowing no kind of child; http reaching persistence through the domain
services only; no cycle inside atrium.jobs) are kept by the code as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# In a process of its own: lint_imports configures logging with dictConfig, which would
# disable every logger this test process has already made (atrium.access and the rest).
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def test_every_import_contract_is_kept() -> None:
    done = subprocess.run(
        [sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"an import breaks a layer contract of pyproject.toml:\n{report}"
    assert "0 broken" in report
