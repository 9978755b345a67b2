"""Typed parameters from strings: the one conversion the method, task and command-line option parsers share."""
from __future__ import annotations

import types
import typing
from typing import Any


def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Convert a CLI string to the field's type (bool/int/float/str, Optional of those)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        for arg in args:
            try:
                return coerce(value, arg, field)
            except ValueError:
                continue
        raise ValueError(f"parameter {field}={value!r} does not parse as {annotation}")
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"parameter {field}={value!r} is not a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise ValueError(f"parameter {field}={value!r} is not a valid {annotation.__name__}") from None
    return value
