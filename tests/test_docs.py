"""The documentation: every page is in mkdocs.yml's navigation, every `vlpet ...` command a page shows parses (its
`--help` runs, through the installed console script, and lists every option the page gives it), the README's links
resolve, and the parameter-budget tables are what `vlpet params` prints.

The table helpers here are also used by the tests whose tables the pages quote (the quick starts)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
WORD = re.compile(r"[a-z][a-z0-9-]*")  # a command or subcommand name (placeholders are upper case)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def pages() -> list[Path]:
    """The README, every docs page and the benchmarks' README."""
    return [README, *doc_pages(), ROOT / "benchmarks" / "README.md"]


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them)."""
    prose: list[str] = []
    code: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def markdown_tables(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of a page, outside code blocks, as (header, rows) of stripped cells."""
    tables: list[list[list[str]]] = []
    previous = False
    for line in (line.strip() for line in split_fences(path.read_text(encoding="utf-8"))[0]):
        row = line.startswith("|")
        if row:
            if not previous:
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous = row
    out = []
    for header, rule, *rows in tables:
        assert all(set(cell) <= set("-: ") for cell in rule), (path, rule)
        out.append((header, rows))
    return out


def tables_with_header(header: tuple[str, ...]) -> list[tuple[Path, list[list[str]]]]:
    """(page, rows) of every table in the pages whose header is exactly `header`."""
    return [(path, rows) for path in pages() for head, rows in markdown_tables(path) if tuple(head) == header]


def quickstart_tables(tasks: list[str]) -> list[tuple[Path, list[list[str]]]]:
    """(page, rows) of every table that shows the quick start's columns (`vlpet quickstart`'s table) for `tasks`."""
    from vlpet_cli.quickstart import TABLE_COLUMNS

    return [(page, rows) for page, rows in tables_with_header(TABLE_COLUMNS) if [r[0] for r in rows] == tasks]


# ---- the site -----------------------------------------------------------------------------------------------


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice in mkdocs.yml's nav"
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert set(nav) == on_disk, f"not in the nav: {sorted(on_disk - set(nav))}; missing: {sorted(set(nav) - on_disk)}"


def test_readme_is_short_and_links_to_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    assert {p.name for p in doc_pages()} - {"index.md"} <= linked | {"index.md"}


def github_slug(heading: str) -> str:
    """The anchor GitHub (and, for these headings, mkdocs) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    return {github_slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md"])
def test_readme_links_resolve(page):
    """mkdocs checks the links of docs/; the READMEs sit outside it, so their relative links are checked here."""
    source = ROOT / page
    prose, _ = split_fences(source.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", "\n".join(prose)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (source.parent / file).resolve() if file else source
        assert path.exists(), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"{page} links to {target}: no such heading in {file}"


# ---- vlpet commands shown in the pages ----------------------------------------------------------------------


def shown_commands(path: Path) -> list[str]:
    """Every `vlpet ...` command line a page shows: lines of its code blocks (continuations joined: after a
    backslash, or indented lines of options in brackets; comments cut) and inline code spans."""
    prose, code = split_fences(path.read_text(encoding="utf-8"))
    found: list[str] = []
    previous = ""
    for line in re.sub(r"\\\n\s*", " ", "\n".join(code)).splitlines():
        continued = line[:1].isspace() and line.lstrip()[:1] in ("[", "-")
        line = re.sub(r"\s#\s.*$", "", line).strip()
        if continued and previous.startswith("vlpet "):
            found[-1] += " " + line
        elif line.startswith("vlpet "):
            found.append(line)
        previous = found[-1] if found and (continued or line.startswith("vlpet ")) else line
    for span in re.findall(r"`(vlpet [^`]+)`", "\n".join(prose)):
        found.append(" ".join(span.split()))
    return found


def console_script() -> str:
    """The installed `vlpet` beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "vlpet"
    return str(beside) if beside.exists() else (shutil.which("vlpet") or pytest.fail("no vlpet console script"))


def help_text(words: tuple[str, ...]) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([console_script(), *words, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, f"`vlpet {' '.join(words)} --help` failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


@cache
def groups() -> frozenset[str]:
    """The commands that have subcommands (their usage line reads `COMMAND [ARGS]`)."""
    top = help_text(())
    commands = re.findall(r"^│ ([a-z][a-z0-9-]*) ", top, flags=re.M)
    assert commands, top
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(commands, pool.map(lambda c: help_text((c,)), commands)))
    return frozenset(c for c, text in helps.items() if "COMMAND [ARGS]" in text)


def command_words(line: str) -> tuple[tuple[str, ...], list[str]]:
    """(the command path, e.g. ("merge", "fold"), the long options given) of a shown command line."""
    tokens = line.split()[1:]
    while tokens and tokens[0].startswith("-"):  # global options: checked against `vlpet --help`
        tokens = tokens[1:]
    path: tuple[str, ...] = ()
    if tokens and WORD.fullmatch(tokens[0]):
        path = (tokens[0],)
        if tokens[0] in groups() and len(tokens) > 1 and WORD.fullmatch(tokens[1]):
            path += (tokens[1],)
    return path, OPTION.findall(line)


@pytest.mark.cli
def test_pages_show_vlpet_commands():
    """The collection below finds what the pages show (a guard against a parser that finds nothing)."""
    shown = {command_words(line)[0] for path in pages() for line in shown_commands(path)}
    assert {("train",), ("eval",), ("predict",), ("merge", "fold"), ("features", "inspect"), ("presets", "show"),
            ("extract-features",), ("import-reference",), ("report",), ("params",), ("quickstart",)} <= shown


@pytest.mark.cli
def test_every_vlpet_command_shown_parses():
    """`vlpet CMD [SUB] --help` runs for every command a page shows, and its help lists every long option the pages
    pass to it (litgpt checks its docs' commands the same way)."""
    wanted: dict[tuple[str, ...], dict[str, set[str]]] = {}
    for path in pages():
        for line in shown_commands(path):
            words, options = command_words(line)
            given = wanted.setdefault(words, {})
            for option in options:
                given.setdefault(option, set()).add(path.relative_to(ROOT).as_posix())
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(wanted, pool.map(help_text, wanted)))
    missing = [f"`vlpet {' '.join(words)}` has no {option} (shown in {', '.join(sorted(where))})"
               for words, options in wanted.items() for option, where in options.items()
               if option not in helps[words]]
    assert not missing, "\n".join(missing)


# ---- tables that quote what a command prints -----------------------------------------------------------------


def test_the_quick_start_tables_are_where_the_quick_start_tests_check_them():
    """tests/test_quickstart.py and test_quickstart_video.py (slow) compare these tables with what the quick starts
    print; here, quickly, that they are found on the pages that show them."""
    from vlpet_cli.quickstart import TABLE_COLUMNS, TASKS, VIDEO_TASKS

    where = {name: {page.relative_to(ROOT).as_posix() for page, _ in quickstart_tables(tasks)}
             for name, tasks in (("image", TASKS), ("video", VIDEO_TASKS))}
    assert where == {"image": {"README.md", "docs/toy-world.md"}, "video": {"docs/toy-world.md"}}
    assert len(tables_with_header(TABLE_COLUMNS)) == 3  # no other table with these columns escapes the checks


# ---- tables that quote `vlpet params` -----------------------------------------------------------------------


@cache
def counted(preset: str, backbone: str) -> dict:
    from vlpet_cli.pet.budget import budget
    from vlpet_cli.presets import resolve
    from vlpet_cli.vl.model import build_model

    model, _ = build_model(resolve(preset, backbone=backbone), weights=False)
    return budget(model)


BUDGET_COLUMNS = {  # column -> (backbone, what `vlpet params` prints there)
    "trainable": ("bart-base", lambda b: f"{b['trainable']:,}"),
    "total": ("bart-base", lambda b: f"{b['total']:,}"),
    "%": ("bart-base", lambda b: f"{b['percent']:.2f}"),
    "trainable %": ("bart-base", lambda b: f"{b['percent']:.2f}"),
    "T5-base %": ("t5-base", lambda b: f"{b['percent']:.2f}"),
}


def preset_tables() -> list[tuple[Path, list[str], list[list[str]]]]:
    return [(path, header, rows) for path in pages() for header, rows in markdown_tables(path)
            if header[0] == "preset"]


def test_preset_tables_name_shipped_presets_and_the_readme_names_them_all():
    from vlpet_cli.presets import list_presets

    shipped = set(list_presets())
    tables = preset_tables()
    assert {path.name for path, *_ in tables} >= {"README.md", "presets.md"}
    for path, _, rows in tables:
        for row in rows:
            names = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", row[0].replace("`", " "))
            assert set(names) <= shipped, (path, row[0])
    (_, _, readme_rows), = [t for t in tables if t[0] == README]
    assert {n for row in readme_rows for n in re.findall(r"`([a-z0-9-]+)`", row[0])} == shipped


@pytest.mark.slow  # counts 60 full-size models on the meta device: 2 s
def test_parameter_budget_tables_are_what_vlpet_params_prints():
    checked = 0
    for path, header, rows in preset_tables():
        columns = [(i, BUDGET_COLUMNS[name]) for i, name in enumerate(header) if name in BUDGET_COLUMNS]
        for row in rows:
            for preset in re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", row[0].replace("`", " ")):
                for i, (backbone, printed) in columns:
                    if row[i]:
                        assert row[i] == printed(counted(preset, backbone)), (path.name, preset, header[i], row[i])
                        checked += 1
    assert checked >= 60  # README's % column and the Table 2 table in presets.md
