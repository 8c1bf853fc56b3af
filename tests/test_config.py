"""WorkerConfig refuses, at construction, every value a worker cannot run with."""

from __future__ import annotations

from typing import Any

import pytest

from pgembed.config import ConfigError, WorkerConfig
from pgembed.worker import WorkerConfig as ReExported


@pytest.mark.parametrize(("option", "value", "message"), [
    ("lease_seconds", -1, "lease_seconds must be greater than 0, not -1"),
    ("lease_seconds", 0, "lease_seconds must be greater than 0, not 0"),
    ("lease_seconds", float("nan"), "lease_seconds must be greater than 0, not nan"),
    ("lease_seconds", float("inf"), "lease_seconds must be greater than 0, not inf"),
    ("lease_seconds", "300", "lease_seconds must be greater than 0, not '300'"),
    ("poll_interval", 0, "poll_interval must be greater than 0, not 0"),
    ("retry_base", -0.5, "retry_base must be 0 or more, not -0.5"),
    ("outage_backoff", -1, "outage_backoff must be 0 or more, not -1"),
    ("shutdown_timeout", -1, "shutdown_timeout must be 0 or more, not -1"),
    ("heartbeat_interval", -1, "heartbeat_interval must be 0 or more, not -1"),
    ("concurrency", 0, "concurrency must be a whole number of at least 1, not 0"),
    ("concurrency", 1.5, "concurrency must be a whole number of at least 1, not 1.5"),
    ("concurrency", True, "concurrency must be a whole number of at least 1, not True"),
    ("batch_size", 0, "batch_size must be a whole number of at least 1, not 0"),
    ("bulk_batch_size", 0, "bulk_batch_size must be None or a whole number of at least 1, not 0"),
    ("prefetch", -1, "prefetch must be a whole number, 0 or more, not -1"),
    ("max_attempts", 0, "max_attempts must be a whole number of at least 1, not 0"),
    ("metrics_port", -1, "metrics_port must be None or a port number from 0 to 65535, not -1"),
    ("metrics_port", 65536, "metrics_port must be None or a port number from 0 to 65535, not 65536"),
])
def test_a_setting_no_worker_can_run_with_is_refused_by_name(option: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        WorkerConfig(**{option: value})
    assert str(refused.value) == message
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize(("option", "value"), [
    ("retry_base", 0.0), ("outage_backoff", 0.0), ("shutdown_timeout", 0), ("heartbeat_interval", 0),
    ("prefetch", 0), ("concurrency", 1), ("batch_size", 1), ("max_attempts", 1), ("lease_seconds", 0.5),
    ("poll_interval", 0.01), ("metrics_port", 0), ("metrics_port", 65535), ("metrics_port", None),
])
def test_the_edges_of_what_is_allowed_are_accepted(option: str, value: Any) -> None:
    assert getattr(WorkerConfig(**{option: value}), option) == value


def test_the_defaults_are_valid_and_the_worker_module_still_exports_the_config() -> None:
    assert ReExported is WorkerConfig
    WorkerConfig()
