"""``python -m simbridge.jobs``: the jobs commands without the rest of the ``simbridge`` CLI."""

from simbridge.jobs.cli import app

app(prog_name="simbridge")
