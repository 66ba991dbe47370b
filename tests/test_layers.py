"""The package's layering (DESIGN.md) holds: the import-linter contracts in pyproject.toml are kept."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, str(config)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_checker_sees_an_import_between_layers(tmp_path):
    """Guard against a contract that passes vacuously: declaring quickstart and train independent (quickstart
    composes train) must be reported broken, naming the import."""
    config = tmp_path / ".importlinter"
    config.write_text("[importlinter]\nroot_package = vlpet_cli\n\n[importlinter:contract:one]\n"
                      "name = commands are independent\ntype = independence\n"
                      "modules =\n    vlpet_cli.quickstart\n    vlpet_cli.train\n")
    result = lint_imports(config)
    assert result.returncode != 0
    assert "vlpet_cli.quickstart -> vlpet_cli.train" in result.stdout
