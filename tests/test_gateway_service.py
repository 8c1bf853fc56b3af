"""`pgembed serve` as a command and a service: it refuses to start open or misconfigured
(exit 2) or on the wrong schema (exit 3), serves as a process until SIGTERM, and its unit
file passes `systemd-analyze verify`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from typer.testing import CliRunner

from pgembed.cli import app
from pgembed.cli.common import EXIT_SCHEMA_MISMATCH, EXIT_USAGE

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "pgembed-gateway.service"
runner = CliRunner()


@pytest.mark.parametrize(("args", "env", "words"), [
    ([], {}, "PGEMBED_GATEWAY_TOKENS"),
    (["--no-auth", "--host", "0.0.0.0"], {}, "localhost only"),
    (["--window-ms", "50"], {"PGEMBED_GATEWAY_TOKENS": "t"}, "between 0 and 20"),
    ([], {"PGEMBED_GATEWAY_TOKENS": " , "}, "PGEMBED_GATEWAY_TOKENS"),
    ([], {"PGEMBED_GATEWAY_TOKENS": "t", "PGEMBED_GATEWAY_MAX_BATCH": "5000"}, "--max-batch"),
])
def test_refuses_to_start_misconfigured(dsn, monkeypatch, args, env, words):
    monkeypatch.delenv("PGEMBED_GATEWAY_TOKENS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["serve", "--dsn", dsn, *args])
    assert result.exit_code == EXIT_USAGE, result.output
    assert words in " ".join(result.output.split())


def test_refuses_a_database_without_the_schema(empty_dsn, monkeypatch):
    monkeypatch.setenv("PGEMBED_GATEWAY_TOKENS", "t")
    result = runner.invoke(app, ["serve", "--dsn", empty_dsn])
    assert result.exit_code == EXIT_SCHEMA_MISMATCH and "pgembed init" in result.output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_as_a_process_until_sigterm(dsn, fake_api, tmp_path):
    port = _free_port()
    env = {**os.environ, "PGEMBED_GATEWAY_TOKENS": "one,two", "PGEMBED_GATEWAY_PORT": str(port)}
    pgembed = Path(sys.executable).with_name("pgembed")
    log = (tmp_path / "err").open("w")
    proc = subprocess.Popen([str(pgembed), "serve", "--dsn", dsn, "--json"], stdout=subprocess.PIPE,
                            stderr=log, env=env, text=True)
    try:
        started = json.loads(proc.stdout.readline() + "".join(iter(proc.stdout.readline, "}\n")) + "}")
        assert started == {"listening": f"http://127.0.0.1:{port}", "window_ms": 10.0, "max_batch": 2048,
                           "auth": True, "tokens": 2}
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="two", max_retries=0) as client:
            assert len(client.embeddings.create(model="text-embedding-3-small", input="hi").data) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        proc.stdout.close()
        log.close()
    assert code == 0, (tmp_path / "err").read_text()
    assert fake_api.requests == 1


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    pgembed = Path(sys.executable).with_name("pgembed")
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/usr/local/bin/pgembed serve$", text, re.MULTILINE)
    unit = tmp_path / "pgembed-gateway.service"
    unit.write_text(text.replace("/usr/local/bin/pgembed", str(pgembed)))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=120)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pgembed-gateway" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    for setting in ("EnvironmentFile=/etc/pgembed/pgembed.env", "KillSignal=SIGTERM", "NoNewPrivileges=yes",
                    f"RestartPreventExitStatus={EXIT_SCHEMA_MISMATCH}", f"RestartPreventExitStatus={EXIT_USAGE}"):
        assert setting in text


def test_the_example_environment_file_lists_every_gateway_variable():
    import typer.main

    command = typer.main.get_group(app).commands["serve"]
    variables = [str(p.envvar) for p in command.params if str(p.envvar).startswith("PGEMBED_GATEWAY_")]
    assert len(variables) >= 10
    listed = (UNIT.parent / "pgembed.env.example").read_text()
    assert [v for v in [*variables, "PGEMBED_GATEWAY_TOKENS"] if v not in listed] == []
