"""Where each beam's files live (staging, logs, results, its folder on the executor's side) and the
fields its step templates are filled with: derived from the stored rows alone, cached per beam.

The base of the pipeline (attempts.py, then pipeline.py build on it), kept apart so the paths a
crash-recovery must find again are written down in one place.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from simbridge.config import JobsSettings, config_file
from simbridge.jobs.executors import JobRef
from simbridge.jobs.names import child_path
from simbridge.jobs.store import AttemptRow, BeamRow, CaseRow, Store
from simbridge.jobs.transport import Transport


@dataclass(frozen=True)
class BeamPaths:
    """Where one beam's files live (all keys are safe path components)."""

    staging: Path
    logs: Path
    results: Path


def render(template: str, fields: Mapping[str, str]) -> tuple[str, ...]:
    """Split a template into words, then fill each word: an argv list no shell ever parses."""
    return tuple(word.format_map(fields) for word in shlex.split(template))


def logs_dir(work_root: Path, case_key: str, beam_key: str) -> Path:
    """Where a beam's attempt logs and exit markers live, under the (resolved) work root."""
    return child_path(child_path(work_root / "logs", case_key), beam_key)


def attempt_ref(logs: Path, attempt: AttemptRow) -> JobRef:
    """How to find an attempt's process and marker again, given its beam's logs folder."""
    return JobRef(
        token=attempt.token,
        log_prefix=logs / f"{attempt.step.lower()}-{attempt.number}",
        job_id=attempt.job_id,
        pid=attempt.pid,
        pid_start=attempt.pid_start,
    )


class BeamLayout:
    """The paths and template fields of every beam of one store, under one work and results root."""

    def __init__(self, *, settings: JobsSettings, store: Store, transport: Transport) -> None:
        self.settings = settings
        self.store = store
        self.transport = transport
        self.work_root = settings.work_root.resolve()
        self.results_root = settings.results.resolve()
        self._cases: dict[int, CaseRow] = {}
        self._paths: dict[int, BeamPaths] = {}
        self._remote: dict[int, PurePosixPath] = {}
        where = config_file()
        self.config_dir = (where.parent if where is not None else Path.cwd()).resolve()

    def case_of(self, beam: BeamRow) -> CaseRow:
        """The beam's case (cached: cases never change once stored)."""
        case = self._cases.get(beam.case_id)
        if case is None:
            case = self._cases[beam.case_id] = self.store.case(beam.case_id)
        return case

    def paths(self, beam: BeamRow) -> BeamPaths:
        """Staging, log and results folders of a beam (cached: they never change)."""
        found = self._paths.get(beam.id)
        if found is not None:
            return found
        case = self.case_of(beam)
        found = self._paths[beam.id] = BeamPaths(
            staging=child_path(child_path(self.work_root / "staging", case.key), beam.key),
            logs=logs_dir(self.work_root, case.key, beam.key),
            results=child_path(child_path(self.results_root, case.key), beam.key),
        )
        return found

    def remote_dir(self, beam: BeamRow) -> PurePosixPath:
        """The beam's folder on the executor's side (cached: it never changes)."""
        found = self._remote.get(beam.id)
        if found is None:
            found = self._remote[beam.id] = self.transport.beam_dir(self.case_of(beam).key, beam.key)
        return found

    def fields(self, beam: BeamRow, work_dir: PurePath | str) -> dict[str, str]:
        """The named fields a step template may use."""
        case = self.case_of(beam)
        return {
            "case_id": case.key,
            "beam_id": beam.key,
            "beam_dir": beam.path,
            "work_dir": str(work_dir),
            "results_dir": str(self.paths(beam).results),
            "python": sys.executable,
            "config_dir": str(self.config_dir),
        }

    def ref(self, attempt: AttemptRow, beam: BeamRow | None = None) -> JobRef:
        """How to find an attempt's process and marker again.

        A remote attempt's ref carries the same local log prefix: its executor derives the remote
        files from it (runscript.attempt_files: ``{remote_root}/CASE/BEAM/.simbridge/STEP-N``).
        """
        beam = beam or self.store.beam(attempt.beam_id)
        return attempt_ref(self.paths(beam).logs, attempt)
