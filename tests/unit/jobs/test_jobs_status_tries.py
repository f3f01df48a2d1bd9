"""`status` counts a COMPLETED beam's simulation launches: it ran at least once, never "0 tries"."""

from __future__ import annotations

from pathlib import Path

from simbridge.jobs.control import snapshot
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store


def _launch(store: Store, beam_id: int, expected: BeamState, token: str, tmp_path: Path) -> int:
    attempt = store.open_attempt(
        beam_id,
        expected=expected,
        target=BeamState.RUNNING,
        token=token,
        executor="local",
        work_dir=str(tmp_path),
        deadline=1e12,
    )
    return attempt.id


def test_a_completed_beam_shows_its_simulation_launches(tmp_path: Path) -> None:
    with Store(url=f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        store.add_case(
            key="c", name="c", source="src", root="root", beams_=[("b", "b", str(tmp_path)), ("d", "d", "x")]
        )
        beam, _ = store.beams()
        for here, there in [
            (BeamState.PENDING, BeamState.PREPARING),
            (BeamState.PREPARING, BeamState.UPLOADING),
            (BeamState.UPLOADING, BeamState.QUEUED),
        ]:
            store.transition(beam.id, here, there, reason="test")
        first = _launch(store, beam.id, BeamState.QUEUED, "t1", tmp_path)
        store.transition(
            beam.id, BeamState.RUNNING, BeamState.QUEUED, reason="transient", step_tries=1,
            close=(first, "transient", 75),
        )  # fmt: skip
        # A launch that never started (the watcher closes it and gives the try back) is no try.
        never = _launch(store, beam.id, BeamState.QUEUED, "t2", tmp_path)
        store.close_attempt(never, outcome="unlaunched", exit_code=None)
        store.forget_try(beam.id)
        store.transition(beam.id, BeamState.RUNNING, BeamState.QUEUED, reason="relaunch")
        second = _launch(store, beam.id, BeamState.QUEUED, "t3", tmp_path)
        for here, there, close in [
            (BeamState.RUNNING, BeamState.COLLECTING, (second, "ok", 0)),
            (BeamState.COLLECTING, BeamState.POSTPROCESSING, None),
            (BeamState.POSTPROCESSING, BeamState.COMPLETED, None),
        ]:
            store.transition(beam.id, here, there, reason="test", close=close)
        (view,) = snapshot(store)
        done, pending = view.beams
        assert (done.state, done.tries) == ("COMPLETED", 2)
        assert (pending.state, pending.tries) == ("PENDING", 0)
        (one,) = snapshot(store, "c")
        assert one.beams[0].tries == 2
