"""`--config FILE` for `serve` and `index`: every option of the command, read from TOML or YAML,
under the flag names (`max-batch` or `max_batch`). A file may hold one command's options at its
top level, or a table per command (`[serve]`, `[index]`). Flags given on the command line win
over the file, and the file over RAGBLEND_* variables and defaults: the file's values become the
command's defaults (click's `default_map`), which a flag overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

COMMANDS = ("serve", "index")


class ConfigError(ValueError):
    pass


def read_config(path: Path) -> dict[str, Any]:
    """The file's mapping: TOML for .toml, YAML for .yaml/.yml."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read it ({e.strerror or e})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(raw.decode("utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8")) or {}
        else:
            raise ConfigError("name a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as e:  # a syntax error of either format, or bytes that are not UTF-8
        raise ConfigError(f"not valid {suffix.lstrip('.').upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping of option names to values")
    return data


def options_for(data: dict[str, Any], command: str, known: set[str]) -> dict[str, Any]:
    """The options `data` gives `command`, by parameter name; an option the command does not
    have is an error naming it (a typo never passes silently)."""
    sections = {k: v for k, v in data.items() if k in COMMANDS and isinstance(v, dict)}
    values = sections.get(command, {}) if sections else data
    stray = [k for k in data if k not in COMMANDS] if sections else []
    if stray:
        raise ConfigError(f"{', '.join(map(repr, stray))}: with [serve]/[index] tables, every option goes in one")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config":
            raise ConfigError(f"{key!r} is not an option of `ragblend {command}`")
        out[name] = value
    return out


def _apply(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    if value is None:
        return value
    try:
        values = options_for(read_config(value), ctx.info_name, {p.name for p in ctx.command.params})
    except ConfigError as e:
        typer.echo(f"error: --config {value}: {e}", err=True)
        raise typer.Exit(2) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", callback=_apply, is_eager=True,
    help="a TOML or YAML file with this command's options (flag names); flags given override it")]
