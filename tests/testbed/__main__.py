"""`python -m tests.testbed up DIR | down DIR | env DIR | yaml DIR [NAME]`: the loopback testbed from a
shell (for `make run-cluster` and for people). `up` leaves the daemons running; `down` stops them by
their pidfiles (DIR is kept: logs, remote files)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from tests.testbed._proc import TestbedError
from tests.testbed.core import Testbed


def _yaml(testbed: Testbed, name: str, scheduler: str) -> str:
    entry = testbed.cluster_settings(name, scheduler="none" if scheduler == "none" else "slurm")
    return yaml.safe_dump({"clusters": {name: entry}}, sort_keys=False)


def _simbridge_exports(testbed: Testbed, name: str, scheduler: str) -> str:
    # The whole clusters section as one JSON variable (simbridge.config reads a section so), plus the
    # executor: `simbridge serve` then runs every beam on this testbed with no config file edited.
    entry = testbed.cluster_settings(name, scheduler="none" if scheduler == "none" else "slurm")
    clusters = json.dumps({name: entry}, separators=(",", ":"))
    return (
        f"export SIMBRIDGE_CLUSTERS={shlex.quote(clusters)}\n"
        f"export SIMBRIDGE_JOBS__EXECUTOR={shlex.quote(name)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start munge, slurmctld, slurmd and sshd under DIR")
    up.add_argument("dir", type=Path)
    up.add_argument("--gpus", type=int, default=8, help="fake GPUs as Slurm gres (0: none)")
    up.add_argument("--cpus", type=int, default=64, help="CPUs the node offers Slurm")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds each daemon may take to start")
    down = sub.add_parser("down", help="stop what `up DIR` started")
    down.add_argument("dir", type=Path)
    env = sub.add_parser("env", help="print shell exports (SLURM_CONF, PATH) for this cluster")
    env.add_argument("dir", type=Path)
    env.add_argument(
        "--simbridge",
        metavar="NAME",
        help="also export SIMBRIDGE_CLUSTERS (this testbed as NAME) and SIMBRIDGE_JOBS__EXECUTOR=NAME",
    )
    env.add_argument("--scheduler", choices=("slurm", "none"), default="slurm")
    snippet = sub.add_parser("yaml", help="print a simbridge config snippet: clusters: {NAME: ...}")
    snippet.add_argument("dir", type=Path)
    snippet.add_argument("name", nargs="?", default="testbed")
    snippet.add_argument("--scheduler", choices=("slurm", "none"), default="slurm")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            started = Testbed.up(args.dir, gpus=args.gpus, cpus=args.cpus, timeout_s=args.timeout)
            print(
                f"testbed up in {started.root}: sshd 127.0.0.1:{started.port}, "
                f"slurmctld :{started.ports.slurmctld}, node {started.node} "
                f"({started.gpus} fake GPUs); stop with: python -m tests.testbed down {args.dir}"
            )
        elif args.action == "down":
            Testbed.attach(args.dir).down()
        elif args.action == "env":
            attached = Testbed.attach(args.dir)
            sys.stdout.write(attached.shell_exports())
            if args.simbridge:
                sys.stdout.write(_simbridge_exports(attached, args.simbridge, args.scheduler))
        else:
            sys.stdout.write(_yaml(Testbed.attach(args.dir), args.name, args.scheduler))
    except TestbedError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
