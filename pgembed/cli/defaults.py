"""Option defaults read from the config dataclasses, so `pgembed worker` and the Python API
cannot drift apart: a default changes in one place and --help shows the new one."""

from __future__ import annotations

import dataclasses
from typing import Any

from pgembed.scheduler import format_duration


def default_of(config: Any, name: str) -> Any:
    """The default of field `name` of dataclass `config`; a field without a plain default
    (required, or made by a factory) is a mistake here, not something to guess at."""
    field = {f.name: f for f in dataclasses.fields(config)}[name]
    if field.default is dataclasses.MISSING:
        raise TypeError(f"{config.__name__}.{name} has no plain default to show as an option's")
    return field.default


def duration_default(config: Any, name: str) -> str:
    """A duration field's default as the option takes it: 3600.0 -> '1h', None -> 'off'."""
    seconds = default_of(config, name)
    return "off" if seconds is None else format_duration(seconds)
