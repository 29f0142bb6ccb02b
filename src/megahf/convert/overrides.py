"""`--model-overrides KEY=VALUE ...` (or one YAML/JSON mapping) into a dict; values are read as YAML scalars."""

from __future__ import annotations

import yaml

from .common import ConversionError


def parse_overrides(items: list[str]) -> dict:
    """`["vocab_size=50257", "max_position_embeddings=2048"]` or `["{vocab_size: 50257}"]` -> {"vocab_size": ...}."""
    result: dict = {}
    for item in items:
        if "=" not in item:
            try:
                mapping = yaml.safe_load(item)
            except yaml.YAMLError:
                mapping = None
            if not isinstance(mapping, dict):
                raise ConversionError(f"--model-overrides {item!r}: expected KEY=VALUE (e.g. vocab_size=50257) or a "
                                      "mapping such as '{vocab_size: 50257}'")
            result.update(mapping)
            continue
        key, _, value = item.partition("=")
        if not key.strip():
            raise ConversionError(f"--model-overrides {item!r}: the key is empty")
        try:
            result[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as error:
            raise ConversionError(f"--model-overrides {item!r}: the value is not readable ({error})") from None
    return result


__all__ = ["parse_overrides"]
