"""Bearer tokens: every route but /healthz and /metrics needs one of the configured tokens.

Compared with hmac.compare_digest against every token, so that neither which token matched
nor how much of one did shows in the answer's timing."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def authorized(headers: Mapping[str, str], tokens: tuple[str, ...]) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    offered = given.strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(offered, token.encode())
    return matched
