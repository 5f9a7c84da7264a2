"""`--config FILE`: a command's options kept in a TOML file (YAML too when PyYAML is installed; on Python 3.10
TOML needs tomli).

The keys are the command's own parameters, by option name (`batch-size`, `store`) or parameter name
(`batch_size`, `store_path`); the file's values become the command's defaults (click's `default_map`), so a
flag on the command line overrides the file, and every value passes the same type and range checks as the
flag. Made over the click command's parameters, so a command's new options need nothing here. A key the
command does not take, a value of the wrong type, a file that does not parse: one line naming the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import click

from imet.errors import ImetError

SKIPPED = ("help", "config")  # parameters a file does not set


def option(f):
    """Decorator adding `--config FILE` to a click command."""
    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), is_eager=True,
                        expose_value=False, callback=_apply,
                        help="TOML file of this command's options (keys: option names, e.g. batch-size = 64); "
                             "flags given on the command line override it.")(f)


def _apply(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
    if path is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read(path, ctx)}


def read(path: Path, ctx: click.Context) -> dict:
    """The file's settings as {parameter name: value} of `ctx`'s command, each checked as its flag would be."""
    raw = _parse(path)
    names = {}
    for p in ctx.command.get_params(ctx):
        if p.name in SKIPPED or not p.name or not p.expose_value:
            continue
        for alias in (p.name, *(o.lstrip("-") for o in p.opts if o.startswith("--"))):
            names[alias.replace("-", "_")] = p
    out = {}
    for key, value in raw.items():
        p = names.get(str(key).replace("-", "_"))
        if p is None:
            close = difflib.get_close_matches(str(key).replace("_", "-"), [k.replace("_", "-") for k in names], 1)
            hint = f"did you mean {close[0]}? " if close else ""
            command = " ".join(["imet", *ctx.command_path.split()[1:]])  # the program's name, not argv[0]'s
            raise ImetError(f"{path}: unknown key {key!r}: `{command}` takes no such option ({hint}the keys are "
                            f"its options: {command} --help)")
        if p.name in out:
            raise ImetError(f"{path}: {p.name.replace('_', '-')} is set twice (as {key!r} and another spelling)")
        out[p.name] = _checked(path, key, p, value, ctx)
    return out


def _parse(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ImetError(f"{path}: a config file is TOML (.toml) or YAML (.yaml, .yml); name it so")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ImetError(f"{path}: cannot read the config file ({getattr(e, 'strerror', None) or e})") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImetError(f"{path}: YAML config files need the PyYAML package, which is not installed; write "
                            "the file as TOML (.toml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ImetError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        data = {} if data is None else data
    else:
        toml = _toml(path)
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as e:
            raise ImetError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise ImetError(f"{path}: a config file holds key = value settings, not a {type(data).__name__}")
    return data


def _toml(path: Path):
    """The standard library's TOML reader (Python 3.11+), or tomli, its backport, on 3.10."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ImetError(f"{path}: reading TOML needs Python 3.11 or the tomli package") from None
    return tomllib


def _checked(path: Path, key: str, p: click.Parameter, value, ctx: click.Context):
    """`value` as the parameter's flag would give it: the type the file wrote must be the flag's own (no 3.5
    epochs rounded to 3, no "yes" for a switch), then the flag's conversion and range checks apply."""
    many = p.multiple or p.nargs != 1
    items = value if many and isinstance(value, list) else [value]
    want = _kind(p)
    if (many and not isinstance(value, list)) or not all(_is(x, want) for x in items):
        shown = "a list of " + want if many else want
        raise ImetError(f"{path}: {key} must be {shown}, not {value!r}")
    try:
        return p.type_cast_value(ctx, tuple(items) if many else value)
    except click.BadParameter as e:
        raise ImetError(f"{path}: {key}: {e.message}") from None


def _kind(p: click.Parameter) -> str:
    t = p.type
    if isinstance(p, click.Option) and p.is_flag or isinstance(t, click.types.BoolParamType):
        return "true or false"
    if isinstance(t, click.types.IntParamType):
        return "an integer"
    if isinstance(t, click.types.FloatParamType):
        return "a number"
    return "a string"


def _is(value, kind: str) -> bool:
    if kind == "true or false":
        return isinstance(value, bool)
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "a number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)
