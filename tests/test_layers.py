"""The layers of atrium hold: pyproject.toml's import-linter contracts (runtime above http
above domain ... above core and seams; core and seams importing nothing of atrium;
supervision knowing no kind of child) are kept by the code as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
from importlinter.cli import lint_imports

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_every_import_contract_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    status = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert status == 0, f"an import breaks a layer contract of pyproject.toml:\n{report}"
    assert "0 broken" in report
