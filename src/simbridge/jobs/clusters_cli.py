"""`simbridge clusters list` and `simbridge clusters check [NAME]`: what is configured, and whether each
cluster answers as the pipeline needs (host key, login, a writable remote_root with room, the scheduler
or the GPUs). The checks live in :func:`check_cluster` (silent, returns rows); this module prints.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from simbridge.config import CONFIG_ENV, ClusterSettings, Settings, load_settings
from simbridge.errors import SimbridgeError
from simbridge.jobs.clusters import LOCAL, open_connection
from simbridge.jobs.errors import (
    AuthError,
    HostKeyError,
    HostUnreachableError,
    JobsConfigError,
    RemoteError,
)
from simbridge.jobs.transport import CommandRunner

app = typer.Typer(
    name="clusters",
    help="Remote hosts and Slurm clusters: list them, check them.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

LOW_SPACE_BYTES = 1 << 30  # less free than this under remote_root is worth a warning

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (else $SIMBRIDGE_CONFIG or ./simbridge.yaml)."),
]


@dataclass(frozen=True)
class Check:
    """One line of the check table: ``ok`` is True, False (wrong) or None (a warning)."""

    cluster: str
    check: str
    ok: bool | None
    result: str
    fix: str = ""


def _fix_for(name: str, cfg: ClusterSettings, exc: BaseException) -> str:
    where = f"{cfg.user + '@' if cfg.user else ''}{cfg.host}"
    known = str(cfg.known_hosts or "~/.ssh/known_hosts")
    if isinstance(exc, HostKeyError):
        return (
            f"compare the fingerprint with the host's own (ssh-keygen -lf on it), then "
            f"`ssh-keyscan -p {cfg.port} {cfg.host} >> {known}`, or set clusters.{name}.accept_new_host_keys"
        )
    if isinstance(exc, AuthError):
        key = f" -i {cfg.identity_file}" if cfg.identity_file else ""
        return (
            f"check clusters.{name}.user and identity_file: `ssh{key} -p {cfg.port} {where} true` must work"
        )
    if isinstance(exc, HostUnreachableError):
        return f"check clusters.{name}.host/port/proxy_jump and that sshd runs there"
    return "see the error; `simbridge -v clusters check` logs more"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _run(runner: CommandRunner, cfg: ClusterSettings, command: str) -> tuple[int | None, str, str]:
    result = runner.run(command, timeout_s=cfg.command_timeout_s)
    return (
        result.exit_status,
        result.stdout.decode("utf-8", "replace").strip(),
        result.stderr.decode("utf-8", "replace").strip(),
    )


def check_cluster(
    name: str, cfg: ClusterSettings, *, connect: Callable[[str, ClusterSettings], Any] = open_connection
) -> list[Check]:
    """Connect to one cluster and check what the pipeline needs; one row per check."""
    rows: list[Check] = []
    try:
        conn = connect(name, cfg)
    except SimbridgeError as exc:
        return [Check(name, "connect", False, _one_line(exc), _fix_for(name, cfg, exc))]
    closer = getattr(conn, "close", None)
    try:
        try:
            _run(conn, cfg, "true")
        except RemoteError as exc:
            return [Check(name, "connect", False, _one_line(exc), _fix_for(name, cfg, exc))]
        rows.append(Check(name, "connect", True, f"{cfg.host}:{cfg.port}, host key verified"))
        rows.extend(_check_root(name, cfg, conn))
        rows.append(_check_tools(name, cfg, conn))
        rows.append(_check_scheduler(name, cfg, conn))
    except RemoteError as exc:
        rows.append(Check(name, "connection", False, _one_line(exc), _fix_for(name, cfg, exc)))
    finally:
        if callable(closer):
            with contextlib.suppress(Exception):  # a failing close must not hide the table
                closer()
    return rows


def _check_root(name: str, cfg: ClusterSettings, conn: CommandRunner) -> list[Check]:
    root = shlex.quote(str(cfg.remote_root))
    status, _, stderr = _run(
        conn, cfg, f'mkdir -p -- {root} && t=$(mktemp -p {root} .simbridge-check.XXXXXX) && rm -f -- "$t"'
    )
    if status != 0:
        return [
            Check(
                name,
                "remote_root writable",
                False,
                f"{cfg.remote_root}: {stderr.splitlines()[-1] if stderr else f'exit {status}'}",
                f"create {cfg.remote_root} and make it writable by the SSH user, or change "
                f"clusters.{name}.remote_root",
            )
        ]
    rows = [Check(name, "remote_root writable", True, str(cfg.remote_root))]
    status, stdout, stderr = _run(conn, cfg, f"df -Pk -- {root}")
    free = _df_free(stdout) if status == 0 else None
    if free is None:
        rows.append(
            Check(
                name, "free space", None, f"df failed: {stderr or stdout or status}", "check `df` on the host"
            )
        )
    elif free < LOW_SPACE_BYTES:
        rows.append(
            Check(
                name,
                "free space",
                False,
                f"{_size(free)} free under {cfg.remote_root}",
                "free space there (or point remote_root at a larger file system)",
            )
        )
    else:
        rows.append(Check(name, "free space", True, f"{_size(free)} free"))
    return rows


# What the remote side runs besides the scheduler: the submit claim and the start lock (flock,
# setsid), run.sh (bash), job arrays (tar), the transfer checks (sha256sum, xargs), the streamed
# transfers of large files (cat, dd), the plain host's start (nohup).
TOOLS = ("bash", "flock", "setsid", "tar", "sha256sum", "xargs", "cat", "dd")
PLAIN_HOST_TOOLS = ("nohup",)


def _check_tools(name: str, cfg: ClusterSettings, conn: CommandRunner) -> Check:
    tools = TOOLS + (PLAIN_HOST_TOOLS if cfg.scheduler == "none" else ())
    probe = f'for t in {" ".join(tools)}; do command -v "$t" >/dev/null 2>&1 || echo "$t"; done'
    status, stdout, stderr = _run(conn, cfg, probe)
    missing = stdout.split()
    if status == 0 and not missing:
        return Check(name, "host tools", True, " ".join(tools))
    return Check(
        name,
        "host tools",
        False,
        f"missing: {' '.join(missing)}" if missing else (stderr or f"exit {status}"),
        "install them on the host (flock and setsid come with util-linux, sha256sum with coreutils)",
    )


def _df_free(text: str) -> int | None:
    """Available bytes from ``df -Pk`` output (None if it is not what df prints)."""
    lines = text.splitlines()
    if len(lines) < 2:
        return None
    words = lines[-1].split()
    if len(words) < 4 or not words[3].isdigit():
        return None
    return int(words[3]) * 1024


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _check_scheduler(name: str, cfg: ClusterSettings, conn: CommandRunner) -> Check:
    if cfg.scheduler == "slurm":
        status, stdout, stderr = _run(conn, cfg, "sinfo -h -o '%P %a %D %t'")
        if status != 0 or not stdout:
            return Check(
                name,
                "slurm (sinfo)",
                False,
                (stderr or stdout or f"exit {status}").splitlines()[-1],
                "sinfo must work in a non-interactive shell of the SSH user (PATH, SLURM_CONF, munge)",
            )
        parts = [line.split() for line in stdout.splitlines() if line.strip()]
        summary = ", ".join(f"{p[0]} {p[1]} {p[2]} node(s) {p[3]}" for p in parts if len(p) >= 4)
        wanted = cfg.slurm.partition
        if wanted and not any(p and p[0].rstrip("*") == wanted for p in parts):
            return Check(
                name,
                "slurm (sinfo)",
                False,
                f"no partition {wanted!r} ({summary})",
                f"fix clusters.{name}.slurm.partition",
            )
        return Check(name, "slurm (sinfo)", True, summary[:200] or "ok")
    status, stdout, stderr = _run(conn, cfg, "nvidia-smi --query-gpu=index,name --format=csv,noheader")
    if status == 0 and stdout:
        gpus = [line for line in stdout.splitlines() if line.strip()]
        return Check(
            name, "gpus (nvidia-smi)", True, f"{len(gpus)} GPU(s): {gpus[0]}{' ...' if len(gpus) > 1 else ''}"
        )
    why = (stderr or stdout or f"exit {status}").splitlines()[-1]
    if cfg.gpus == "discover":
        return Check(
            name,
            "gpus (nvidia-smi)",
            False,
            why,
            f"install the NVIDIA driver there, or set clusters.{name}.gpus to a count",
        )
    return Check(
        name,
        "gpus (nvidia-smi)",
        None,
        f"{why}; using the configured count {cfg.gpus}",
        "" if cfg.gpus else f"set clusters.{name}.gpus",
    )


def _settings(config: Path | None) -> Settings:
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    return load_settings()


def list_clusters(config: ConfigOpt = None) -> None:
    """The configured clusters (the one jobs.executor uses is marked)."""
    try:
        settings = _settings(config)
    except SimbridgeError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    table = Table(title="clusters", title_justify="left")
    for col in ("cluster", "host", "user", "scheduler", "remote_root", "used"):
        table.add_column(col)
    for name, cfg in sorted(settings.clusters.items()):
        used = "jobs.executor" if settings.jobs.executor == name else ""
        table.add_row(
            Text(name),
            Text(f"{cfg.host}:{cfg.port}"),
            Text(cfg.user or "(local user)"),
            cfg.scheduler,
            Text(str(cfg.remote_root)),
            used,
        )
    out.print(table)
    if settings.jobs.executor == LOCAL:
        out.print("jobs.executor: local (simulations run on this machine)")


def check(
    name: Annotated[str | None, typer.Argument(help="A cluster name (default: every cluster).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Connect to each cluster and check the host key, login, remote_root, free space, the scheduler."""
    try:
        settings = _settings(config)
        names = [name] if name is not None else sorted(settings.clusters)
        if name is not None and name not in settings.clusters:
            known = ", ".join(sorted(settings.clusters)) or "none configured"
            raise JobsConfigError(f"no cluster {name!r} in the clusters section ({known})")
        if not names:
            raise JobsConfigError("no clusters configured: add a clusters: section to the config")
    except SimbridgeError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    rows: list[Check] = []
    for cname in names:
        rows.extend(check_cluster(cname, settings.clusters[cname]))
    table = Table(title="cluster checks", title_justify="left")
    for col in ("cluster", "check", "result", "how to fix"):
        table.add_column(col)
    for row in rows:
        mark = {True: ("ok", "green"), False: ("FAIL", "bold red"), None: ("warn", "yellow")}[row.ok]
        table.add_row(
            Text(row.cluster),
            Text(f"{mark[0]} ", style=mark[1]).append(row.check, style=""),
            Text(row.result),
            Text(row.fix),
        )
    out.print(table)
    bad = [r for r in rows if r.ok is False]
    if bad:
        err.print(
            Text(
                f"error: {len(bad)} check(s) failed: "
                + "; ".join(f"{r.cluster} {r.check}: {r.result}" for r in bad)
            ),
            soft_wrap=True,
        )
        raise typer.Exit(1)


app.command("list")(list_clusters)
app.command("check")(check)
