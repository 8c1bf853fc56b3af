"""`pgembed …`: the command line. Every command takes --dsn (or PGEMBED_DSN, or libpq's
PG* variables); with nothing configured, or --embedded, it uses the embedded PostgreSQL and
says so (the worker refuses to, unless given --embedded). Errors are one sentence, never a traceback.

This module only assembles the app: each command lives in the module named after what it
does, and every table they print is built in tables.py."""

from __future__ import annotations

import typer

from pgembed.cli import costs, dsn, failures, health, quickstart, schema, search, serve, sync_now, worker
from pgembed.cli.alias import alias_app
from pgembed.cli.batch import batch_app
from pgembed.cli.common import out
from pgembed.cli.eval import eval_app
from pgembed.cli.migrate import migrate_app
from pgembed.cli.pipeline import pipeline_app
from pgembed.cli.ratelimit import ratelimit_app

__all__ = ["app", "out"]  # out: the console every command prints to (tests widen it)

# no locals in a traceback: they would show the DSN and its password
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Keep pgvector embeddings of PostgreSQL rows correct, cheap and fresh.")
for command in (schema.init, worker.worker, search.search, quickstart.quickstart, costs.costs,
                failures.failures, health.status, health.audit, dsn.dsn, serve.serve, sync_now.sync_now):
    app.command()(command)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(ratelimit_app, name="ratelimit")
app.add_typer(alias_app, name="alias")
app.add_typer(eval_app, name="eval")
app.add_typer(migrate_app, name="migrate")
app.add_typer(batch_app, name="batch")
