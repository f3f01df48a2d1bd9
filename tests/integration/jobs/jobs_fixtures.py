"""Helpers and fixtures of the jobs integration tests: a private work area, a real PostgreSQL
server started here (Debian's postgresql package, run as the postgres user, socket and data in a
temp dir), and helpers to write a config file and run ``simbridge`` commands as subprocesses."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support import REPO, require, wait_for  # noqa: F401 - wait_for: the jobs tests import it from here

from simbridge.config import Settings, load_settings
from simbridge.jobs.dispatcher import Dispatcher

EXAMPLE = REPO / "examples" / "mqi"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A PostgreSQL server owned by the test session."""

    port: int
    root: Path

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def psql(self, sql: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", self.bin("psql"), "-h", "127.0.0.1", "-p",
             str(self.port), "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

    def bin(self, name: str) -> str:
        return str(Path(_pg_bindir()) / name)

    def start(self) -> None:
        """Start the server (again): same data, socket and port."""
        opts = (
            f"-k {self.root / 'sock'} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        subprocess.run(
            ["runuser", "-u", "postgres", "--", self.bin("pg_ctl"), "-D", str(self.root / "data"),
             "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect every client, as an administrator would)."""
        subprocess.run(
            ["runuser", "-u", "postgres", "--", self.bin("pg_ctl"), "-D", str(self.root / "data"),
             "-m", mode, "-w", "-t", "60", "stop"],
            check=False, capture_output=True, timeout=120,
        )  # fmt: skip


def _pg_bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(found[-1]).parent) if found else ""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bindir()
    require(bool(bindir), "PostgreSQL server binaries (Debian package postgresql)")
    require(shutil.which("runuser") is not None, "runuser (util-linux)")
    require(os.getuid() == 0, "root (to run PostgreSQL as the postgres user)")
    # Not under pytest's tmp dir: that is private to root, and postgres refuses to run as root.
    root = Path(tempfile.mkdtemp(prefix="simbridge-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(sock, "postgres")
    port = _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_pg, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres",
         "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    server = PgServer(port=port, root=root)
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class JobsEnv:
    """A private inbox/results/work area, a GPU lock folder and a config file for one test."""

    root: Path
    db_url: str
    slots: int = 4
    jobs: dict[str, Any] = field(default_factory=dict)

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def config_path(self) -> Path:
        return self.root / "simbridge.yaml"

    def configure(self, **jobs: Any) -> Settings:
        """Write the config file (jobs keys merged over the defaults here) and load it."""
        merged = {
            "inbox": str(self.inbox),
            "results": str(self.results),
            "work_root": str(self.work),
            "database_url": self.db_url,
            "poll_s": 0.05,
            "stable_s": 0.5,
            **self.jobs,
            **jobs,
        }
        self.jobs = merged
        doc = {
            "gpus": {
                "discovery": "slots",
                "slots": self.slots,
                "lock_dir": str(self.root / "gpus"),
            },
            "jobs": merged,
        }
        self.config_path.write_text(yaml.safe_dump(doc))
        os.environ["SIMBRIDGE_CONFIG"] = str(self.config_path)
        return load_settings()

    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``simbridge <args>`` (the jobs commands) as a real subprocess."""
        env = {**os.environ, "SIMBRIDGE_CONFIG": str(self.config_path), "COLUMNS": "200"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", "simbridge.jobs", *args],
            check=False, capture_output=True, text=True, timeout=timeout, env=env,
            cwd=self.root,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"simbridge {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def status(self) -> list[dict[str, Any]]:
        """`simbridge status --json`, parsed."""
        result: list[dict[str, Any]] = json.loads(self.cli("status", "--json").stdout)
        return result

    def drop_example(self, name: str = "case-1", *, ready: bool = True) -> Path:
        """Copy the example case (3 beams) into the inbox, complete at once if ``ready``."""
        staging = self.root / f".{name}.tmp"
        shutil.copytree(EXAMPLE / "case", staging)
        target = self.inbox / name
        self.inbox.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
        if ready:
            (target / "READY").touch()
        return target

    def make_case(self, name: str, beams: dict[str, dict[str, str]], *, ready: bool = True) -> Path:
        """A case folder in the inbox: ``beams`` maps beam folder -> {file: content}."""
        staging = self.root / f".{uuid.uuid4().hex}.tmp"
        staging.mkdir(parents=True)
        for beam, files in beams.items():
            (staging / beam).mkdir()
            for fname, content in files.items():
                (staging / beam / fname).write_text(content)
        self.inbox.mkdir(parents=True, exist_ok=True)
        target = self.inbox / name
        staging.rename(target)
        if ready:
            (target / "READY").touch()
        return target


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'work' / 'simbridge.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'work' / 'simbridge.db'}"


@pytest.fixture
def env(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> JobsEnv:
    # setenv first, so monkeypatch restores "unset" at teardown: JobsEnv.configure sets the variable
    # for the in-process store, and it must not leak into later tests.
    monkeypatch.setenv("SIMBRIDGE_CONFIG", "")
    monkeypatch.delenv("SIMBRIDGE_CONFIG")
    return JobsEnv(root=tmp_path, db_url=db_url)


@pytest.fixture
def sqlite_env(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> JobsEnv:
    # setenv first, so monkeypatch restores "unset" at teardown: JobsEnv.configure sets the variable
    # for the in-process store, and it must not leak into later tests.
    monkeypatch.setenv("SIMBRIDGE_CONFIG", "")
    monkeypatch.delenv("SIMBRIDGE_CONFIG")
    return JobsEnv(root=tmp_path, db_url=sqlite_url)


@contextmanager
def serving(settings: Settings) -> Iterator[Dispatcher]:
    """A Dispatcher running in a thread (as `serve` does), stopped and joined on exit."""
    with Dispatcher(settings=settings) as dispatcher:
        thread = threading.Thread(target=dispatcher.run, kwargs={"max_s": 300}, daemon=True)
        thread.start()
        try:
            yield dispatcher
        finally:
            dispatcher.stop()
            thread.join(timeout=60)


EXAMPLE_STEPS = {
    "prepare": f"{{python}} {EXAMPLE}/preprocess.py {{beam_dir}} {{work_dir}}",
    "simulate": f"{{python}} {EXAMPLE}/dose_sim.py",
    "postprocess": f"{{python}} {EXAMPLE}/postprocess.py {{results_dir}}",
    "outputs": ["raw", "raw.json"],
}
