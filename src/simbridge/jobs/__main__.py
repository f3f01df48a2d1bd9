"""``python -m simbridge.jobs``: the jobs commands without the rest of the ``simbridge`` CLI."""

from simbridge.entry import entry_app
from simbridge.jobs.cli import register

app = entry_app(help="The durable case/beam pipeline: serve, submit, status, retry, cancel.")
register(app)
app(prog_name="simbridge")
