"""``python -m simbridge.jobs``: the jobs commands without the rest of the ``simbridge`` CLI."""

from simbridge.entry import entry_app
from simbridge.jobs.cli import register
from simbridge.jobs.clusters_cli import app as clusters_app

app = entry_app(help="The durable case/beam pipeline: serve, submit, status, retry, cancel.")
register(app)
app.add_typer(clusters_app, name="clusters", help="Remote hosts and Slurm clusters: list, check.")
app(prog_name="simbridge")
