"""The resource plane's packages are leaves: of simbridge they import only config, errors and logs.

import-linter checks the packages that exist today; this also catches packages added later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import simbridge

ALLOWED = ("simbridge.config", "simbridge.errors", "simbridge.logs")
PACKAGES = [p for p in ("gpus", "models") if (Path(simbridge.__file__).parent / p).is_dir()]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_config_errors_and_itself(package: str) -> None:
    root = Path(simbridge.__file__).parent / package
    own = f"simbridge.{package}"
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name == "simbridge" or name.startswith("simbridge."):
                    assert name.startswith((own + ".", *ALLOWED)) or name == own, (
                        f"{path.name} imports {name}; {own} may use only {ALLOWED}"
                    )
