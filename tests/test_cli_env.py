"""`pgembed worker` is configured by PGEMBED_* variables as fully as by its options (a unit
file or a container needs nothing else), and its defaults are WorkerConfig's and
ScheduleConfig's, not copies of them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

import pgembed.cli.worker as worker_command
from pgembed.cli import app
from pgembed.scheduler import ScheduleConfig
from pgembed.worker import WorkerConfig, WorkerStats

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def worker_params() -> list[Any]:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return group.commands["worker"].params


def worker_envvars() -> list[str]:
    return [str(p.envvar) for p in worker_params()]


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> list[WorkerConfig]:
    """The WorkerConfig each `pgembed worker` run would start with; no worker runs, and no
    PGEMBED_* variable of the caller's shell leaks in."""
    for envvar in worker_envvars():
        monkeypatch.delenv(envvar, raising=False)
    seen: list[WorkerConfig] = []

    class Captured:
        def __init__(self, dsn: str, config: WorkerConfig) -> None:
            seen.append(config)

        async def run(self) -> WorkerStats:
            return WorkerStats()

    monkeypatch.setattr(worker_command, "Worker", Captured)
    return seen


def run_worker(env: dict[str, str] | None = None) -> None:
    result = runner.invoke(app, ["worker", "--dsn", "postgresql://unused/x"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_every_worker_option_has_a_pgembed_variable_shown_in_help() -> None:
    for param in worker_params():
        assert isinstance(param, TyperOption), param.name
        assert isinstance(param.envvar, str) and param.envvar.startswith("PGEMBED_"), param.name
        assert param.show_envvar, param.name
    assert len(set(worker_envvars())) == len(worker_params()), "one variable per option"


def test_variables_reach_the_worker_config(configs: list[WorkerConfig]) -> None:
    run_worker({"PGEMBED_CONCURRENCY": "7", "PGEMBED_PREFETCH": "0", "PGEMBED_BATCH_SIZE": "9",
                "PGEMBED_BULK_BATCH_SIZE": "99", "PGEMBED_POLL_INTERVAL": "0.5", "PGEMBED_LEASE_SECONDS": "60",
                "PGEMBED_MAX_ATTEMPTS": "2", "PGEMBED_RETRY_BASE": "1.5", "PGEMBED_WORKER_NAME": "w-env",
                "PGEMBED_METRICS_ADDRESS": "0.0.0.0", "PGEMBED_AUDIT_EVERY": "off",
                "PGEMBED_RETRY_PARKED_MAX": "30d"})
    [config] = configs
    assert (config.concurrency, config.prefetch, config.batch_size, config.bulk_batch_size) == (7, 0, 9, 99)
    assert (config.poll_interval, config.lease_seconds, config.max_attempts, config.retry_base) == (0.5, 60, 2, 1.5)
    assert (config.name, config.metrics_address) == ("w-env", "0.0.0.0")
    assert config.schedule is not None
    assert (config.schedule.audit_every, config.schedule.retry_parked_max) == (None, 30 * 86400)


def test_until_empty_from_the_environment_runs_no_scheduler(configs: list[WorkerConfig]) -> None:
    run_worker({"PGEMBED_UNTIL_EMPTY": "true"})
    assert configs[0].until_empty and configs[0].schedule is None


def test_defaults_are_the_config_dataclasses(configs: list[WorkerConfig]) -> None:
    run_worker()
    [config] = configs
    plain = WorkerConfig()
    differ = {f.name for f in dataclasses.fields(WorkerConfig)
              if getattr(config, f.name) != getattr(plain, f.name)}
    assert differ == {"handle_signals", "schedule"}, "only what the CLI sets on purpose"
    assert config.schedule == ScheduleConfig()


def test_a_batch_size_from_the_environment_reaches_a_real_worker(conn: Any, dsn: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    created = runner.invoke(app, ["pipeline", "create", "notes", "body", "--model", "hash:32", "--dsn", dsn])
    assert created.exit_code == 0, created.output
    for i in range(3):  # one statement each: changes made by the application, claimed batch_size at a time
        conn.execute("INSERT INTO notes VALUES (%s, 'note')", (i,))
    monkeypatch.delenv("PGEMBED_BULK_BATCH_SIZE", raising=False)
    drained = runner.invoke(app, ["worker", "--until-empty", "--dsn", dsn], env={"PGEMBED_BATCH_SIZE": "1"},
                            catch_exceptions=False)
    assert drained.exit_code == 0 and "3 rows embedded, 0 removed, 0 failed in 3 batches" in drained.output, \
        drained.output


def test_the_example_environment_file_lists_every_worker_variable() -> None:
    listed = (ROOT / "deploy" / "pgembed.env.example").read_text()
    missing = [envvar for envvar in worker_envvars() if envvar not in listed]
    assert not missing, f"deploy/pgembed.env.example does not list {missing}"


def test_the_readme_lists_every_worker_option_with_its_variable_and_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for param in worker_params():
        default = "" if param.default is None else str(param.default)
        default = default.lower() if isinstance(param.default, bool) else default
        row = f"| {' / '.join(f'`{o}`' for o in param.opts)} | `{param.envvar}` | {default} |"
        assert row in readme, f"README's Worker options lack {row}"
