"""Who an embedding was for: the source, user and task recorded with its usage.

The cost views answer "what share is indexing, which users and tasks spent most" from
these, so they come from the caller (the gateway's request headers, the OpenAI `user`
field, a `Client` argument), never guessed. A value is a short label for a GROUP BY, not
free text: one that is too long or holds control characters is refused, so that a ledger
row never carries a pasted document or a terminal escape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: what an attributed call may be recorded as in pgembed.usage.purpose
PURPOSES = ("query", "index")
MAX_LABEL = 200

HEADERS = {
    "source": "x-pgembed-source",
    "user": "x-pgembed-user",
    "task": "x-pgembed-task",
    "cost_center": "x-pgembed-cost-center",
    "purpose": "x-pgembed-purpose",
}


class AttributionError(ValueError):
    """A label the ledger cannot take: the caller's input, answered with a 400 or exit 2."""


@dataclass(frozen=True)
class Attribution:
    """The labels of one call. `purpose` is `query` (searching) or `index` (an application
    embedding its own documents through the gateway)."""

    source: str | None = None
    user: str | None = None
    task: str | None = None
    cost_center: str | None = None
    purpose: str = "query"

    def __post_init__(self) -> None:
        for name in ("source", "user", "task", "cost_center"):
            _check_label(name, getattr(self, name))
        if self.purpose not in PURPOSES:
            raise AttributionError(f"purpose must be one of {', '.join(PURPOSES)}, not {self.purpose!r}")

    def usage_params(self) -> dict[str, str | None]:
        """The columns of pgembed.usage these fill (named as in sql/queries.sql)."""
        return {"source": self.source, "app_user": self.user, "task": self.task,
                "cost_center": self.cost_center, "purpose": self.purpose}


def _check_label(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise AttributionError(f"{name} must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_LABEL:
        raise AttributionError(f"{name} must be 1 to {MAX_LABEL} characters, not {len(value)}")
    if not value.isprintable():
        raise AttributionError(f"{name} must not hold control characters")


def from_headers(headers: Mapping[str, str], body_user: object = None) -> Attribution:
    """The labels of an HTTP request: `X-Pgembed-Source`, `-User`, `-Task`, `-Cost-Center`,
    `-Purpose` (header names in any case); the user falls back on the OpenAI body's `user`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    values = {name: lowered.get(header) or None for name, header in HEADERS.items()}
    if values["user"] is None and body_user is not None:
        values["user"] = body_user  # type: ignore[assignment]  # checked by Attribution
    return Attribution(source=values["source"], user=values["user"], task=values["task"],
                       cost_center=values["cost_center"], purpose=values["purpose"] or "query")
