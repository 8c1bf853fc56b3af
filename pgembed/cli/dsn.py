"""`pgembed dsn`: the connection string of the database the other commands use, so that
psql and scripts reach the same one: `psql "$(pgembed dsn)"`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from psycopg.conninfo import make_conninfo

from pgembed.cli.common import DsnOption, EmbeddedOption, connect, err, friendly

# Parameters of pgembed's own sessions, not of the database: psql should not inherit them.
# sslcertmode=allow is libpq's default, reported as set by libpq builds without it compiled in.
_SESSION_ONLY = {("application_name", None), ("options", None), ("sslcertmode", "allow")}


def _kept(name: str, value: str) -> bool:
    return (name, None) not in _SESSION_ONLY and (name, value) not in _SESSION_ONLY


ShowPassword = Annotated[bool, typer.Option(
    "--show-password", help="Include the password (by default it is left out: libpq finds it in "
                            "PGPASSWORD or ~/.pgpass, psql asks for it).")]


@friendly
def dsn(show_password: ShowPassword = False, dsn: DsnOption = None, embedded: EmbeddedOption = False) -> None:
    """Print the DSN of the database the commands use, for psql and scripts.

    As libpq connected to it; the embedded server is started if that is the one.

    Example: psql "$(pgembed dsn)"
    """
    with connect(dsn, embedded) as conn:
        params = {k: v for k, v in conn.info.get_parameters().items() if _kept(k, v)}
        password = conn.info.password
    if password and show_password:
        params["password"] = password
    sys.stdout.write(make_conninfo(**params) + "\n")
    if password and not show_password:
        err.print("the password is left out; --show-password prints it", highlight=False)
