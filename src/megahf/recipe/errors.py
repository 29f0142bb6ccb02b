"""The one error a recipe raises, and the helpers that word it: key, value, fix."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable

from ..errors import MegahfError


class RecipeError(MegahfError, ValueError):
    """A recipe (or the data it points to) is unusable; the message says which key, which value and the fix."""


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """'; did you mean 'X'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def need(section, ok: bool, key: str, rule: str) -> None:
    """Raise `RecipeError` naming `key`, its value in `section` and the `rule` it breaks, unless `ok`."""
    if not ok:
        raise RecipeError(f"recipe key {key}={getattr(section, key)!r} is invalid: {rule}")


def need_at_least(section, minimum: int, *keys: str) -> None:
    for key in keys:
        need(section, getattr(section, key) >= minimum, key,
             "it must be at least 1" if minimum == 1 else "it must be 0 or more")


def need_finite(section) -> None:
    """Refuse inf and nan in every number field of a section (`RecipeError` naming the key, the value and an
    example of a sensible value: its default); run before the range checks, which nan would slip past."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            example = f"e.g. {f.default!r}" if isinstance(f.default, float) else "e.g. 1.0"
            raise RecipeError(f"recipe key {f.name}={value!r} is invalid: it must be a finite number, {example}")


__all__ = ["RecipeError", "did_you_mean", "need", "need_at_least", "need_finite"]
