"""mypy over the contract package and the operator, at the strictness set in pyproject.toml [tool.mypy].

Run as a test so `make test` (CI) fails when a type error lands. The trainer is left out: it needs
torch/transformers stubs that do not exist in a form mypy can hold strictly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_operator_and_api_type_check() -> None:
    env = {**os.environ, "MYPYPATH": str(REPO / "operator")}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "-p", "finetune_api", "-p", "finetune_operator"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
