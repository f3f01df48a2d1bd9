"""Write a simbridge config that runs the MQI example on a cluster entry (used by `make run-cluster`).

Usage: python examples/mqi/cluster_config.py CLUSTERS_YAML WORK_DIR OUT_YAML [NAME]

CLUSTERS_YAML holds ``clusters: {NAME: {...}}`` (e.g. from ``python -m tests.testbed yaml DIR``).
The example's own config (simbridge.yaml beside this file) is taken as is, with ``jobs.executor``
set to the cluster, its folders moved under WORK_DIR, and ``{config_dir}`` resolved to this folder
(the generated file lives elsewhere). The simulate command runs on the cluster's host: over the
loopback testbed that is this machine, so the same Python and scripts are there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def cluster_config(clusters: dict[str, Any], work: Path, name: str | None = None) -> dict[str, Any]:
    """The example config, pointed at cluster ``name`` (default: the only one) and ``work``."""
    base = yaml.safe_load((HERE / "simbridge.yaml").read_text())
    entries = clusters["clusters"]
    name = name or next(iter(entries))
    jobs = base["jobs"]
    jobs.update(
        executor=name,
        inbox=str(work / "inbox"),
        results=str(work / "results"),
        work_root=str(work / "jobs"),
    )
    steps = jobs["steps"]
    for key, value in list(steps.items()):
        if isinstance(value, str):
            steps[key] = value.replace("{config_dir}", str(HERE))
    base["clusters"] = entries
    return dict(base)


def main(argv: list[str]) -> int:
    if len(argv) not in {3, 4}:
        sys.stderr.write(__doc__ or "")
        return 2
    clusters = yaml.safe_load(Path(argv[0]).read_text())
    config = cluster_config(clusters, Path(argv[1]).resolve(), argv[3] if len(argv) == 4 else None)
    Path(argv[2]).write_text(yaml.safe_dump(config, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
