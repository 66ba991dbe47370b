"""Usage errors, help and versions through the installed `vlpet` console script, as a user meets them.

Each case runs the console script next to this Python in a subprocess (with PYTHONPATH on this checkout), so the
exit code and the output are what a shell sees, whatever click the installed typer bundles: a usage error is the
command's usage and one `Error:` line, exit 2, never a traceback; `-h` is `--help` on every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from importlib.metadata import version
from pathlib import Path

import pytest
import typer

from vlpet_cli.cli import app

pytestmark = pytest.mark.cli  # runs the installed console script in a subprocess

ROOT = Path(__file__).resolve().parents[2]
VLPET = Path(sys.executable).with_name("vlpet")


def vlpet(*args: str, cwd: Path, env: dict | None = None, python: list[str] | None = None):
    """Run `vlpet ARGS` (or `python ...` when given) in a subprocess; the CompletedProcess."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "COLUMNS": "100",
            **(env or {})}
    return subprocess.run(python or [str(VLPET), *args], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=300)


def _paths(command, prefix=()) -> list[tuple[str, ...]]:
    """Every command path of the app: groups first, then their commands (e.g. (), ('merge',), ('merge', 'fold'))."""
    out = [tuple(prefix)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        out += _paths(sub, (*prefix, name))
    return out


PATHS = _paths(typer.main.get_command(app))


def _command(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _is_group(path: tuple[str, ...]) -> bool:
    return bool(getattr(_command(path), "commands", None))


def _number_option(path: tuple[str, ...]) -> str | None:
    """The first option of a command that takes an int or a float."""
    command = _command(path)
    hints = typing.get_type_hints(command.callback)
    return next((p.opts[0] for p in command.params if p.param_type_name == "option"
                 and hints.get(p.name) in (int, float, int | None, float | None)), None)


COMMANDS = [p for p in PATHS if not _is_group(p)]
GROUPS = [p for p in PATHS if _is_group(p)]
WITH_REQUIRED = [p for p in COMMANDS if any(param.required for param in _command(p).params)]
WITH_NUMBER = [(p, _number_option(p)) for p in COMMANDS if _number_option(p)]


def assert_usage_error(result, message: str) -> None:
    """Exit 2; on stderr the usage and a hint (when click gives them) and one `Error:` line holding `message`;
    no traceback; stdout empty."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    assert len(lines) <= 3 and lines[-1].startswith("Error: ") and message in lines[-1], result.stderr
    assert len(lines) == 1 or lines[0].startswith("Usage: vlpet")


def test_the_console_script_is_installed_next_to_python():
    assert VLPET.is_file(), f"{VLPET}: run `make install`"


def test_the_commands_are_all_found():
    assert {("train",), ("eval",), ("predict",), ("extract-features",), ("merge", "export-peft"), ("report",),
            ("import-reference",), ("features", "inspect"), ("presets", "show"), ("params",), ("quickstart",)} \
        <= set(COMMANDS)
    assert {("predict",), ("params",), ("merge", "fold")} <= set(WITH_REQUIRED)
    assert {("train",), ("eval",), ("extract-features",)} <= {p for p, _ in WITH_NUMBER}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "vlpet")
def test_h_is_help_on_every_command(path, tmp_path):
    result = vlpet(*path, "-h", cwd=tmp_path)
    assert result.stdout == vlpet(*path, "--help", cwd=tmp_path).stdout if path in [(), ("train",)] else True
    assert result.returncode == 0, result.stderr
    assert re.search(rf"Usage: vlpet {' '.join(path)}\s*\[OPTIONS\]", result.stdout), result.stdout
    assert result.stderr == ""
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_an_unknown_option_on_every_command(path, tmp_path):
    assert_usage_error(vlpet(*path, "--no-such-option", cwd=tmp_path), "No such option: --no-such-option")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("path", WITH_REQUIRED, ids=" ".join)
def test_a_missing_argument_or_option_on_every_command(path, tmp_path):
    result = vlpet(*path, cwd=tmp_path)
    assert_usage_error(result, "Missing ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("path, option", WITH_NUMBER, ids=[" ".join(p) for p, _ in WITH_NUMBER])
def test_a_value_of_the_wrong_type_on_every_command(path, option, tmp_path):
    assert_usage_error(vlpet(*path, option, "x", cwd=tmp_path), f"Invalid value for '{option}")


USAGE_ERRORS = [
    (["trian"], "No such command 'trian'. Did you mean 'train'?"),
    (["merge", "exprot-peft"], "No such command 'exprot-peft'. Did you mean 'export-peft'?"),
    (["train", "--preest", "vlpet-small"], "No such option: --preest (Possible options: --preset, --resume, --seeds)"),
    (["train", "--stop-after", "x"], "Invalid value for '--stop-after'"),
    (["eval", "RUN", "--batch-size", "1.5"], "Invalid value for '--batch-size'"),
    (["params"], "Missing option '--preset'"),
    (["train", "--preset"], "Option '--preset' requires an argument"),
    (["predict", "--task", "vqa"], "Missing argument"),
    (["presets", "show"], "Missing argument"),
    (["-x"], "No such option: -x"),
]


@pytest.mark.parametrize("args, message", USAGE_ERRORS, ids=[" ".join(args) for args, _ in USAGE_ERRORS])
def test_usage_errors(args, message, tmp_path):
    assert_usage_error(vlpet(*args, cwd=tmp_path), message)


def test_a_bad_choice_is_one_line(tmp_path):
    result = vlpet("merge", "average", "a", "b", "--out", "c", "--mode", "bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: unknown merge mode 'bogus'; choose mean or sum\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("group", GROUPS, ids=lambda p: " ".join(p) or "vlpet")
def test_a_group_without_its_command_shows_its_help(group, tmp_path):
    result = vlpet(*group, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert "Commands" in result.stdout + result.stderr


def test_version_prints_the_versions_without_importing_torch(tmp_path):
    result = vlpet("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    expected = f"vlpet {version('vlpet')} (torch {version('torch')}, transformers {version('transformers')}, Python "
    assert result.stdout.startswith(expected), result.stdout
    code = ("import sys\nfrom vlpet_cli.cli import main\nsys.argv = ['vlpet', '--version']\ntry:\n    main()\n"
            "except SystemExit as exc:\n    assert exc.code == 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert vlpet(cwd=tmp_path, python=[sys.executable, "-c", code]).stdout.splitlines()[-1] == "[]"


def test_shell_completion(tmp_path):
    # the script for the shell vlpet runs in (typer asks the process tree), so a bash that stays vlpet's parent
    # (a lone command would replace it), whatever shell runs the tests
    script = vlpet(cwd=tmp_path, python=["bash", "-c", f"'{VLPET}' --show-completion; exit $?"])
    assert script.returncode == 0 and "_VLPET_COMPLETE=complete_bash" in script.stdout, script.stderr
    assert "--install-completion" in vlpet("-h", cwd=tmp_path).stdout
    env = {"_VLPET_COMPLETE": "complete_bash", "COMP_WORDS": "vlpet merge ex", "COMP_CWORD": "2"}
    assert vlpet(cwd=tmp_path, env=env).stdout.split() == ["export-peft"]
    env = {"_VLPET_COMPLETE": "complete_bash", "COMP_WORDS": "vlpet train --pre", "COMP_CWORD": "2"}
    assert vlpet(cwd=tmp_path, env=env).stdout.split() == ["--preset"]


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """A KeyboardInterrupt inside a command (typer >= 0.2x turns it into a silent exit 130, older ones into
    Abort) ends as 'interrupted' and exit code 130."""
    code = ("import sys\nimport vlpet_cli.cli as cli\n"
            "def interrupted():\n    raise KeyboardInterrupt\n"
            "cli.list_presets = interrupted\nsys.argv = ['vlpet', 'presets', 'ls']\ncli.main()\n")
    result = vlpet(cwd=tmp_path, python=[sys.executable, "-c", code])
    assert result.returncode == 130
    assert result.stderr.startswith("interrupted (SIGINT): ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stdout
