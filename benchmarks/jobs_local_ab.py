"""jobs_local, two source trees interleaved (before and after in alternating order), medians per tree.

Each run is a fresh interpreter with ``PYTHONPATH`` at one tree's ``src`` running this tree's
``jobs_local.run_simbridge`` (the same beams, config and no-op for both), so only the simbridge
code differs. Rounds alternate the order (before, after, after, before, ...) to spread a shared
machine's swings and the run-after-clean-up effect over both trees; the load average before each
run is printed with it.

Usage: python benchmarks/jobs_local_ab.py --before /tmp/before/src [--after src] [--rounds 5]
                                          [--beams 1000] [--postgres] [--noop /bin/true]
(the before tree: e.g. ``git worktree add /tmp/before 2826274`` and build its extension there.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One run, in the child: wall, our CPU and our reaped children's CPU per beam, as JSON.
CHILD = """
import json, logging, os, sys
import structlog
sys.path.insert(0, {here!r})
# Trees before the logging rework used structlog's default (print everything): quiet as ours.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
import contextlib, jobs_local
beams, postgres, noop = {beams}, {postgres}, {noop!r}
load = os.getloadavg()[0]
with (jobs_local.postgres() if postgres else contextlib.nullcontext(None)) as url:
    take_s, run_s, cpu_s, kids_s = jobs_local.run_simbridge(beams, url, noop)
print(json.dumps({{"load": load, "wall": run_s / beams * 1e3, "cpu": cpu_s / beams * 1e3,
                  "child": kids_s / beams * 1e3}}))
"""


def run_once(src: Path, *, beams: int, postgres: bool, noop: str) -> dict[str, float]:
    code = CHILD.format(here=str(HERE), beams=beams, postgres=postgres, noop=noop)
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd="/tmp", check=True, capture_output=True, text=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the before tree's src folder")
    ap.add_argument("--after", type=Path, default=HERE.parent / "src")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--beams", type=int, default=1000)
    ap.add_argument("--postgres", action="store_true")
    ap.add_argument("--noop", default="/bin/true")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    db = "PostgreSQL" if args.postgres else "SQLite"
    print(f"jobs_local A/B: {args.beams} beams, {db}, no-op `{args.noop}`, {args.rounds} rounds")
    for i in range(args.rounds):
        # ABBA: the second run of a round follows the first's clean-up (thousands of inodes just
        # freed, which makes the file creations of the next run dearer), so the order alternates.
        order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
        for name, src in order:
            r = run_once(src, beams=args.beams, postgres=args.postgres, noop=args.noop)
            runs[name].append(r)
            print(
                f"round {i + 1} {name:6} load {r['load']:4.1f}  wall {r['wall']:6.2f}  "
                f"cpu {r['cpu']:5.2f}  child cpu {r['child']:5.2f}  ms/beam",
                flush=True,
            )
    print("medians (ms/beam):")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "child")}
        loads = [r["load"] for r in rs]
        print(
            f"  {name:6} wall {med['wall']:6.2f}  cpu {med['cpu']:5.2f}  child cpu {med['child']:5.2f}"
            f"  (load {min(loads):.1f}-{max(loads):.1f})"
        )
    ratio = statistics.median(r["wall"] for r in runs["after"]) / statistics.median(
        r["wall"] for r in runs["before"]
    )
    print(f"after / before, wall medians: {ratio:.2f}x")


if __name__ == "__main__":
    main()
