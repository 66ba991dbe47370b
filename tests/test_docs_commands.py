"""Every shell command that vlpet's messages and documentation quote exists in this install.

The commands are found in backquotes in vlpet_cli's source (error messages, hints) and in the code blocks and inline
code of README.md and every Markdown file under docs/. A command counts when its program is one a user is told to
run here: vlpet (also `python -m vlpet_cli`), hf, huggingface-cli, accelerate, torchrun, make, pip and python. Then:
vlpet's sub-commands and options exist (and `--help` parses); hf's, accelerate's and torchrun's sub-commands answer
`--help` and list the options used; a make target is in the Makefile; pip's files and extras exist; python's
scripts exist and modules import."""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from vlpet_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROGRAMS = {"vlpet", "hf", "huggingface-cli", "accelerate", "torchrun", "make", "pip", "python", "python3"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ---- finding the commands ----------------------------------------------------------------------------------
def _command(text: str) -> str | None:
    """The command in a line of shell (comments and `VAR=value` prefixes dropped), if its program is one of ours."""
    text = re.sub(r"\s#.*$", "", text).strip()
    words = text.split()
    while words and ASSIGNMENT.match(words[0]):
        words.pop(0)
    return " ".join(words) if words and words[0] in PROGRAMS else None


def commands_in_markdown(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command in a Markdown text's code blocks (a line, with its `\\`
    continuations, split at `&&`, `;` and `|`) and inline code (which may run over a line break)."""
    found: list[tuple[int, str]] = []
    prose: list[str] = []  # the text outside code blocks, code blocks blanked (line numbers kept)
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = line.lstrip().startswith("```")
        prose.append("" if in_block or fence else line)
        if fence:
            in_block, pending = not in_block, ""
        elif in_block:
            start = start if pending else number
            pending += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                for part in re.split(r"\s(?:&&|\|\||;|\|)\s|;\s*$|\s>\s.*$", pending.replace("; do ", " ")):
                    if (command := _command(part)) is not None:
                        found.append((start, command))
                pending = ""
    joined = "\n".join(prose)
    for match in re.finditer(r"`([^`]+)`", joined):
        if (command := _command(" ".join(match.group(1).split()))) is not None:
            found.append((joined.count("\n", 0, match.start()) + 1, command))
    return sorted(found)


def commands_in_source(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every backquoted command in Python source; f-string fields become X."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`([^`]+)`", line):
            if (command := _command(re.sub(r"\{[^}]*\}", "X", span))) is not None:
                found.append((number, command))
    return found


# ---- checking one command ----------------------------------------------------------------------------------
def _program(name: str) -> str | None:
    """The program's path: next to this Python (the project's environment), else on PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


@functools.cache
def _help(*argv: str) -> str | None:
    """The --help text of a command (stdout), or None when it does not exit 0."""
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    return result.stdout if result.returncode == 0 else None


def _options(words: list[str]) -> list[str]:
    """The option names among the words (`--x=1` -> `--x`), leaving out negative numbers and `-`."""
    return [w.split("=")[0] for w in words if w.startswith("-") and w != "-" and not re.match(r"-\d", w)]


def check_vlpet(words: list[str]) -> str | None:
    """A vlpet command line (after the program): its sub-commands exist, its options are the command's, and
    `vlpet SUB... --help` exits 0."""
    words = [w for w in " ".join(words).replace("[", " ").replace("]", " ").split()]
    command = typer.main.get_command(app)
    path: list[str] = []
    for word in words:
        if not getattr(command, "commands", None) or word.startswith("-"):
            continue
        if word not in command.commands:
            if word == "..." or word.isupper():  # `vlpet COMMAND --help`: a placeholder for any command
                break
            return f"`vlpet {' '.join([*path, word])}`: no such command"
        command = command.commands[word]
        path.append(word)
    known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"-h", "--help"}
    unknown = [o for o in _options(words) if o not in known]
    if unknown:
        return f"`vlpet {' '.join(path)}` has no option {', '.join(unknown)}"
    result = CliRunner().invoke(app, [*path, "--help"])
    return None if result.exit_code == 0 else f"`vlpet {' '.join(path)} --help` exits {result.exit_code}"


def _subcommand(program: str, words: list[str]) -> list[str]:
    """The longest run of leading words (at most two) that `PROGRAM ... --help` accepts as a sub-command."""
    for n in (2, 1):
        sub = words[:n]
        if len(sub) == n and all(re.match(r"^[a-z][a-z-]*$", w) for w in sub) and _help(_program(program), *sub):
            return sub
    return []


def check_tool(program: str, words: list[str]) -> str | None:
    """hf, accelerate, torchrun: the sub-command answers --help and lists every option used before the script;
    the script `-m vlpet_cli ...` of a launcher is checked as a vlpet command."""
    sub = _subcommand(program, words)
    rest = words[len(sub):]
    script = rest.index("-m") if "-m" in rest else len(rest)
    text = _help(_program(program), *sub)
    if text is None:
        return f"`{program} {' '.join(sub)} --help` fails"
    missing = [o for o in _options(rest[:script]) if o not in text]
    if missing:
        return f"`{program} {' '.join(sub)}` has no option {', '.join(missing)}"
    return check_python(rest[script:])


def check_make(words: list[str]) -> str | None:
    makefile = (ROOT / "Makefile").read_text()
    missing = [t for t in words if not t.startswith("-") and "=" not in t
               and not re.search(rf"^{re.escape(t)}\s*:", makefile, re.M)]
    return f"the Makefile has no target {', '.join(missing)}" if missing else None


def check_pip(words: list[str]) -> str | None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))
    for flag, value in zip(words, words[1:]):
        if flag in ("-c", "-r") and not (ROOT / value).is_file():
            return f"`pip {' '.join(words)}`: no file {value}"
    for word in words:
        match = re.match(r"^(?:\.|vlpet)\[([^\]]+)\]$", word)
        unknown = [e for e in (match.group(1).split(",") if match else []) if e.strip() not in extras]
        if unknown:
            return f"`pip {' '.join(words)}`: vlpet has no extra {', '.join(unknown)}"
    return None


def check_python(words: list[str]) -> str | None:
    if words[:1] == ["-c"] or not words:
        return None
    if words[0] == "-m":
        if len(words) < 2:
            return None
        if words[1] == "vlpet_cli":
            return check_vlpet(words[2:])
        return None if importlib.util.find_spec(words[1]) else f"no module {words[1]}"
    return None if (ROOT / words[0]).exists() else f"no file {words[0]}"


def check(command: str) -> str | None:
    """None when the command exists in this install, else what is wrong."""
    try:
        program, *words = shlex.split(command)
    except ValueError:
        program, *words = command.split()
    if program in ("python", "python3"):
        return check_python(words)
    if _program(program) is None:
        return f"`{program}` is not installed"
    if program == "vlpet":
        return check_vlpet(words)
    if program == "make":
        return check_make(words)
    if program == "pip":
        return check_pip(words)
    return check_tool(program, words)


def problems(found: list[tuple[int, str]], where: str) -> list[str]:
    return [f"{where}:{line}: {command}: {why}" for line, command in found if (why := check(command))]


# ---- the tests ---------------------------------------------------------------------------------------------
SOURCES = sorted((ROOT / "vlpet_cli").rglob("*.py"))
MARKDOWN = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if p.is_file()]


@pytest.mark.cli
def test_every_command_the_messages_quote_exists():
    found = {p: commands_in_source(p.read_text(encoding="utf-8")) for p in SOURCES}
    quoted = {c for commands in found.values() for _, c in commands}
    assert {"hf download X --local-dir DIR", "vlpet train"} <= quoted  # the scan sees them
    bad = [msg for p, commands in found.items() for msg in problems(commands, str(p.relative_to(ROOT)))]
    assert not bad, "\n".join(bad)


@pytest.mark.cli
@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_the_documentation_quotes_exists(path):
    found = commands_in_markdown(path.read_text(encoding="utf-8"))
    bad = problems(found, str(path.relative_to(ROOT)))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("command, why", [
    ("huggingface-cli download facebook/bart-base --local-dir DIR", "is not installed"),
    ("hf download x --no-such-flag", "has no option --no-such-flag"),
    ("vlpet trian --preset x", "no such command"),
    ("vlpet train --preest vlpet-small", "has no option --preest"),
    ("vlpet merge export-peft A --out B --no-bass", "has no option --no-bass"),
    ("accelerate launch --num_procs 2 -m vlpet_cli train", "has no option --num_procs"),
    ("accelerate launch --num_processes 2 -m vlpet_cli trian", "no such command"),
    ("make tets", "no target tets"),
    ("pip install 'vlpet[vidoe]'", "no extra vidoe"),
    ("pip install -c constraint.txt -e .", "no file constraint.txt"),
    ("python benchmarks/no_such.py", "no file"),
    ("python -m vlpet_cli eval --splt val", "has no option --splt"),
])
@pytest.mark.cli
def test_the_checker_reports_a_command_that_does_not_exist(command, why):
    assert why in (check(command) or "")


@pytest.mark.cli
def test_the_checker_accepts_the_commands_that_exist():
    for command in ["hf download openai/clip-vit-base-patch32 --local-dir clip-vit-b32",
                    "vlpet train --preset vlpet-small --task coco --data-root toy train.lr=5e-4",
                    "vlpet eval RUN [--split test|val] [--metric cider]", "vlpet merge ...", "vlpet -h",
                    "accelerate launch --multi_gpu --num_processes 4 -m vlpet_cli train --preset vlpet-large",
                    "torchrun --standalone --nproc_per_node 2 -m vlpet_cli eval RUN",
                    "make install", "make test-latest", "make lock", "pip install 'vlpet[video]'",
                    "pip install -c constraints.txt -e '.[dev]'", "python -m pycocoevalcap.spice.get_stanford_models",
                    "vlpet extract-features --images DIR --layer -1 --model M --out O"]:
        assert check(command) is None, (command, check(command))


def test_markdown_commands_are_found_in_blocks_and_inline():
    text = ("Run `make demo`, then `vlpet-small` is a preset.\n```\nIMG=x vlpet predict RUN --task vqa \\\n"
            "    --image $IMG   # a comment\nM=m; D=d\nfor s in a b; do\n  vlpet eval $s\ndone\n"
            "benchmarks/gpu.sh 3 > gpu.jsonl\n```\n")
    assert commands_in_markdown(text) == [(1, "make demo"), (3, "vlpet predict RUN --task vqa --image $IMG"),
                                          (7, "vlpet eval $s")]


@pytest.mark.cli
def test_the_peft_load_command_survives_an_80_column_terminal(tiny_dirs, tmp_path):
    """`vlpet merge export-peft` prints how to load the export with PEFT: on one line (the terminal wraps it, a
    copy keeps it whole), never broken by rich at 80 columns."""
    pytest.importorskip("peft")
    import torch

    from vlpet_cli.artifacts import save_adapter
    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    torch.manual_seed(0)
    resolved = resolve("lora", ["model.feat_dim=16"], backbone=str(tiny_dirs["bart"]))
    model, _ = build_model(resolved, weights=True)
    save_adapter(tmp_path / "adapter", model, resolved)
    out = tmp_path / "a-folder-with-a-long-name-for-the-exported-adapter" / "peft"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "80", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(BIN / "vlpet"), "merge", "export-peft", str(tmp_path / "adapter"), "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if "PeftModel.from_pretrained(" in x)
    command = re.search(r"PeftModel\.from_pretrained\(AutoModelForSeq2SeqLM\.from_pretrained\('[^']+'\), '[^']+'\)",
                        line)
    assert command and f"'{out}'" in command.group(0) and f"'{out.resolve() / 'base'}'" in command.group(0), line
    ast.parse(command.group(0))
