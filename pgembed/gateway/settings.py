"""The gateway's settings: `pgembed serve`'s options, each also PGEMBED_GATEWAY_<NAME>.

The bearer tokens come from the environment only (PGEMBED_GATEWAY_TOKENS, comma-separated),
never from the command line, where `ps` would show them. A gateway without tokens refuses
to start, unless told `--no-auth`, which only a loopback address may take: an open
gateway spends the API key's money for anyone who can reach it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

TOKENS_VARIABLE = "PGEMBED_GATEWAY_TOKENS"
MAX_WINDOW_MS = 20.0  # a query waits at most this long for batch-mates
MAX_INPUTS = 2048  # OpenAI's limit on one request's inputs


class SettingsError(ValueError):
    """A setting the gateway cannot start with: the operator's mistake (exit 2)."""


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    window_ms: float = 10.0
    max_batch: int = MAX_INPUTS
    max_body_bytes: int = 4 * 1024 * 1024
    concurrency: int = 16
    pool_size: int = 10
    tokens: tuple[str, ...] = ()
    no_auth: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.window_ms <= MAX_WINDOW_MS:
            raise SettingsError(f"--window-ms must be between 0 and {MAX_WINDOW_MS:g}, not {self.window_ms:g}")
        if not 1 <= self.max_batch <= MAX_INPUTS:
            raise SettingsError(f"--max-batch must be between 1 and {MAX_INPUTS}, not {self.max_batch}")
        if self.max_body_bytes < 1024:
            raise SettingsError("--max-body-bytes must be at least 1024")
        if self.no_auth and not _loopback(self.host):
            raise SettingsError(f"--no-auth is for a gateway on localhost only, not on {self.host}: "
                                f"set {TOKENS_VARIABLE} instead")
        if not self.no_auth and not self.tokens:
            raise SettingsError(f"no bearer tokens: set {TOKENS_VARIABLE} (comma-separated), "
                                "or --no-auth on localhost")

    @property
    def window(self) -> float:
        return self.window_ms / 1000


def parse_tokens(value: str | None) -> tuple[str, ...]:
    """The tokens of PGEMBED_GATEWAY_TOKENS; blanks around commas are not part of a token."""
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
