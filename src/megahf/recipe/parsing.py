"""Flat YAML keys and `--key value` overrides -> a verb's recipe (a dataclass of section dataclasses).

    recipe = parse_recipe(PretrainRecipe, "recipes/gpt/tiny.yaml", ["--train_steps", "50",
                                                                    "--model_overrides.num_layers", "2"])

Like `HfArgumentParser.parse_dict` over several dataclasses, with what a recipe needs besides: every key is routed to
the section that declares it, an unknown key is refused with the closest known one, a value of the wrong type is
refused with an example of the right one, `--model_overrides.FIELD value` sets one entry of a mapping, and each
section's checks run before anything is computed or written.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any

import yaml

from ..atomic import atomic_write_text
from .errors import RecipeError, did_you_mean

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
_EXAMPLES = {int: "300", float: "1.0e-3", bool: "true", str: "some-text", dict: "{num_layers: 2}"}


# Keys that once existed: refused with what replaced them (a recipe that still sets one would silently lose it).
RETIRED_KEYS = {
    "activation_checkpointing": "recompute: full (every layer recomputed; recompute: selective recomputes only the "
                                "attention core, recompute: none nothing)",
}


def _refuse_retired(key: str, value: Any, where: str) -> None:
    if key in RETIRED_KEYS:
        raise RecipeError(f"recipe key {key}={value!r} {where} was replaced: use {RETIRED_KEYS[key]}")


def recipe_keys(recipe_class: type) -> dict[str, tuple[str, dataclasses.Field, type]]:
    """Flat key -> (section attribute, field, the plain type its value must have: int, float, bool, str, dict)."""
    keys = {}
    for section in dataclasses.fields(recipe_class):
        section_class = section.default_factory
        hints = typing.get_type_hints(section_class)
        for f in dataclasses.fields(section_class):
            hint = hints[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            keys[f.name] = (section.name, f, typing.get_origin(hint) or hint)
    return keys


def optional_keys(recipe_class: type) -> set[str]:
    """The flat keys whose type admits None (`str | None`): `null` in YAML, `--key null` on the command line."""
    optional = set()
    for section in dataclasses.fields(recipe_class):
        hints = typing.get_type_hints(section.default_factory)
        for name, hint in hints.items():
            if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
                optional.add(name)
    return optional


def parse_recipe(recipe_class: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """Read a flat YAML recipe, apply `--key value` overrides (`--key=value`, `--model_overrides.field value`, a bare
    `--flag` for booleans), route every key to its section and run each section's checks. `path=None` starts from
    the defaults. A key typed `X | None` also takes `null` (YAML) or `--key null`."""
    keys = recipe_keys(recipe_class)
    kinds = {key: kind for key, (_, _, kind) in keys.items()}
    nullable = optional_keys(recipe_class)
    where = str(path) if path is not None else "the recipe"
    checked: dict[str, Any] = {}
    for key, value in (_read_yaml(where) if path is not None else {}).items():
        _refuse_retired(key, value, f"in {where}")
        if key not in keys:
            raise RecipeError(f"unknown recipe key {key!r} in {where}{did_you_mean(str(key), keys)}")
        if value is None and key in nullable:
            checked[key] = None
            continue
        checked[key] = _check_type(key, value, kinds[key], f"in {where}")
    for key, value in parse_overrides(overrides or []):
        base, _, sub = key.partition(".")
        _refuse_retired(base, value, f"on the command line (--{key})")
        if base not in keys:
            raise RecipeError(
                f"unknown recipe key {base!r} on the command line (--{key}){did_you_mean(base, keys, prefix='--')}"
            )
        kind = kinds[base]
        if value is True and kind is not bool:
            raise RecipeError(f"--{key} needs a value, e.g. --{key} {_EXAMPLES[kind]}")
        if sub:
            if kind is not dict:
                raise RecipeError(f"--{key}: only model_overrides takes dotted sub-keys; write --{base} VALUE")
            checked[base] = {**checked.get(base, {}), sub: _parse_scalar(value)}
        elif base in nullable and isinstance(value, str) and value.lower() in ("null", "none", "~"):
            checked[base] = None
        else:
            checked[base] = _check_type(base, _from_command_line(value, kind), kind,
                                        f"on the command line (--{key})", command_line=True)
    section_classes = {f.name: f.default_factory for f in dataclasses.fields(recipe_class)}
    values_by_section: dict[str, dict[str, Any]] = {name: {} for name in section_classes}
    for key, value in checked.items():
        values_by_section[keys[key][0]][key] = value
    recipe = recipe_class(**{name: section_classes[name](**values) for name, values in values_by_section.items()})
    recipe.validate()
    return recipe


def parse_overrides(tokens: list[str]) -> list[tuple[str, str | bool]]:
    """`["--a", "1", "--b=2", "--flag"]` -> `[("a", "1"), ("b", "2"), ("flag", True)]` (dashes in names become
    underscores)."""
    pairs: list[tuple[str, str | bool]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise RecipeError(f"unexpected command-line argument {token!r}; overrides look like --key value")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            pairs.append((name, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            pairs.append((name, tokens[i + 1]))
            i += 2
        else:  # a bare flag: true for a boolean key, an error for anything else (reported by the type check)
            pairs.append((name, True))
            i += 1
    return pairs


def save_recipe(recipe, path: str | os.PathLike) -> None:
    """Write the recipe as the flat YAML file it can be loaded from again (atomically: complete or absent)."""
    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def recipe_help(recipe_class: type) -> str:
    """One line per recipe key, grouped by section: name, default, help (for `megahf <verb> --help`)."""
    lines, section = [], None
    for key, (name, f, _) in recipe_keys(recipe_class).items():
        if name != section:
            section = name
            lines.append(f" {name}:")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{key} (default: {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path!r} not found; pass the path of a YAML recipe, e.g. recipes/gpt/tiny.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys (key: value lines), got {type(values).__name__}")
    return values


def _check_type(key: str, value: Any, kind: type, where: str, command_line: bool = False) -> Any:
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string: accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if not ok:
        raise RecipeError(
            f"recipe key {key!r} {where} must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__}); "
            + (f"pass e.g. --{key} {_EXAMPLES[kind]}" if command_line else f"write e.g. {key}: {_EXAMPLES[kind]}")
        )
    return value


def _from_command_line(value: str | bool, kind: type) -> Any:
    """Turn a command-line string into the field's type when it reads as one; otherwise leave it for the check."""
    if value is True or kind is str:
        return value
    if kind is dict:
        parsed = _parse_scalar(value)
        return parsed if isinstance(parsed, dict) else value
    if kind is bool:
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            value.lower(), value
        )
    try:
        return int(value) if kind is int else float(value)
    except ValueError:
        return value


def _parse_scalar(value: str | bool) -> Any:
    if value is True:
        return True
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


__all__ = ["optional_keys", "parse_overrides", "parse_recipe", "recipe_help", "recipe_keys", "save_recipe"]
