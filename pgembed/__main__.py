"""`python -m pgembed` is the `pgembed` command."""

from pgembed.cli import app

app(prog_name="pgembed")
