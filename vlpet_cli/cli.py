"""The `vlpet` command line: every command is a thin call into one function elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vlpet_cli.errors import VlpetError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient tuning of vision-and-language encoder-decoders (VL-PET and baselines).")
presets_app = typer.Typer(no_args_is_help=True, help="List, show and copy presets.")
features_app = typer.Typer(no_args_is_help=True, help="Inspect and convert visual feature files.")
merge_app = typer.Typer(no_args_is_help=True, help="Combine, fold and export trained adapters.")
app.add_typer(presets_app, name="presets")
app.add_typer(features_app, name="features")
app.add_typer(merge_app, name="merge")

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}

OVERRIDES = typer.Argument(None, help="preset overrides as dotted key=value, e.g. train.lr=5e-4", show_default=False)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks for errors")) -> None:
    STATE["debug"] = debug


# ---- presets ----------------------------------------------------------------------------------------------
@presets_app.command("ls")
def presets_ls() -> None:
    """Name, method, description and backbone families of every shipped preset."""
    from vlpet_cli.presets import list_presets, load_raw

    table = Table("preset", "method", "families", "description")
    for name in list_presets():
        raw = load_raw(name)
        table.add_row(name, raw.get("method", ""), ", ".join(raw.get("families", ["bart", "t5"])),
                      raw.get("description", ""))
    console.print(table)


@presets_app.command("show")
def presets_show(name: str, backbone: Optional[str] = typer.Option(None, help="resolve for this backbone"),
                 overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Print the resolved preset as YAML."""
    from vlpet_cli.presets import resolve, to_yaml

    print(to_yaml(resolve(name, overrides, backbone)), end="")


@presets_app.command("cp")
def presets_cp(name: str, file: Path, force: bool = typer.Option(False, help="overwrite FILE")) -> None:
    """Copy a preset to FILE for editing; use it with --preset FILE."""
    from vlpet_cli.presets import preset_path

    if file.exists() and not force:
        raise VlpetError(f"{file} exists; pass --force to overwrite it")
    text = preset_path(name).read_text()
    file.write_text(text)
    console.print(f"copied preset '{name}' to {file}")


# ---- params -----------------------------------------------------------------------------------------------
@app.command()
def params(preset: str = typer.Option(..., "--preset", "-p", help="preset name or YAML file"),
           backbone: Optional[str] = typer.Option(None, help="bart-base | t5-base | tiny-bart | tiny-t5 | HF id | dir"),
           as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
           overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Trainable-parameter budget per module group, built on the meta device (no weights needed)."""
    from vlpet_cli.presets import resolve
    from vlpet_cli.pet.budget import budget
    from vlpet_cli.vl.model import build_model

    resolved = resolve(preset, overrides, backbone)
    model, _ = build_model(resolved, weights=False)
    result = {"preset": resolved.name, "backbone": resolved.model.backbone, **budget(model)}
    if as_json:
        print(json.dumps(result))
        return
    table = Table("group", "trainable", "total", title=f"{resolved.name} on {resolved.model.backbone}")
    for row in result["groups"]:
        table.add_row(row["group"], f"{row['trainable']:,}", f"{row['total']:,}")
    table.add_section()
    table.add_row("all", f"{result['trainable']:,}", f"{result['total']:,}", style="bold")
    console.print(table)
    console.print(f"trainable: [bold]{result['percent']:.2f} %[/bold] "
                  f"({result['trainable']:,} / {result['total']:,}; denominator: {result['denominator']})")
    console.print(f"saved trainable state: {result['saved_mb']:.1f} MB (fp32)")


def main() -> None:
    """Entry point: user errors print one line and exit 2 (tracebacks only with --debug)."""
    try:
        app(standalone_mode=False)
    except VlpetError as exc:
        if STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
