"""GPUs of plain SSH hosts assigned by the store (SQLite and PostgreSQL): never two beams on one GPU,
first come first served, released with the attempt, nothing held forever after a crash, and two
store connections racing for the last GPU."""

from __future__ import annotations

import threading
import time

import pytest

from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = pytest.mark.integration

HOST = "gpu-host"


def _queued_beams(store: Store, count: int, case: str = "c") -> list[int]:
    store.add_case(
        key=case,
        name=case,
        source="src",
        root="root",
        beams_=[(f"b{i}", f"b{i}", "/x") for i in range(count)],
    )
    ids = [b.id for b in store.beams() if store.case(b.case_id).key == case]
    for beam_id in ids:
        store.path(
            beam_id,
            [
                (BeamState.PENDING, BeamState.PREPARING, "started"),
                (BeamState.PREPARING, BeamState.UPLOADING, "no prepare step"),
                (BeamState.UPLOADING, BeamState.QUEUED, "uploaded"),
            ],
        )
    return ids


def _launch(store: Store, beam_id: int, gpus: tuple[str, ...]) -> int:
    attempt = store.open_attempt(
        beam_id,
        expected=BeamState.QUEUED,
        target=BeamState.RUNNING,
        token=f"sb-{beam_id}-{time.monotonic_ns()}",
        executor=HOST,
        work_dir="/r",
        deadline=time.time() + 60,
        gpu_id=",".join(gpus),
    )
    return attempt.id


def _holders(store: Store) -> dict[str, int | None]:
    return {row.gpu: row.beam_id for row in store.host_gpus(HOST)}


def test_n_gpus_n_plus_two_beams_fifo_and_released_with_the_attempt(db_url: str) -> None:
    with Store(url=db_url) as store:
        store.set_host_gpus(HOST, [("0", "GPU-a"), ("1", "GPU-b"), ("2", None)])
        store.set_host_gpus(HOST, [("0", "GPU-a"), ("1", "GPU-b"), ("2", None)])  # idempotent
        beams = _queued_beams(store, 5)
        got = [store.acquire_host_gpus(HOST, beam_id=b, count=1) for b in beams]
        assert got[:3] == [("0",), ("1",), ("2",)] and got[3:] == [None, None]
        assert store.host_gpu_waiters(HOST) == beams[3:]
        # Asking again changes nothing: the holder gets the same GPU, a waiter keeps its place.
        assert store.acquire_host_gpus(HOST, beam_id=beams[0], count=1) == ("0",)
        attempts = {b: _launch(store, b, g) for b, g in zip(beams[:3], got[:3], strict=True) if g}
        # GPU 1 ends first; the last beam asks before the one ahead of it: no overtaking.
        store.transition(
            beams[1],
            BeamState.RUNNING,
            BeamState.COLLECTING,
            reason="exited 0",
            close=(attempts[beams[1]], "ok", 0),
        )
        assert _holders(store)["1"] is None
        assert store.acquire_host_gpus(HOST, beam_id=beams[4], count=1) is None
        assert store.acquire_host_gpus(HOST, beam_id=beams[3], count=1) == ("1",)
        assert store.host_gpu_waiters(HOST) == [beams[4]]
        assert store.close_attempt(attempts[beams[0]], outcome="failed", exit_code=1)
        assert store.acquire_host_gpus(HOST, beam_id=beams[4], count=1) == ("0",)
        holders = [h for h in _holders(store).values() if h is not None]
        assert len(holders) == len(set(holders)) == 3
        with pytest.raises(ValueError, match="has 3 GPU"):
            store.acquire_host_gpus(HOST, beam_id=beams[4], count=4)


def test_a_holder_that_left_without_an_attempt_holds_nothing(db_url: str) -> None:
    with Store(url=db_url) as store:
        store.set_host_gpus(HOST, [("0", None)])
        first, second = _queued_beams(store, 2)
        assert store.acquire_host_gpus(HOST, beam_id=first, count=1) == ("0",)
        assert store.acquire_host_gpus(HOST, beam_id=second, count=1) is None
        # The orchestrator died between the grant and the launch; recovery then cancelled the
        # beam (or a person did): the GPU is swept back at the next grant.
        store.transition(first, BeamState.QUEUED, BeamState.CANCELLED, reason="cancelled")
        assert store.acquire_host_gpus(HOST, beam_id=second, count=1) == ("0",)
        # Recovery closing the attempt of a crashed run gives its GPU back in that transaction.
        attempt = _launch(store, second, ("0",))
        assert store.close_attempt(attempt, outcome="lost", exit_code=None)
        assert _holders(store) == {"0": None}
        # A GPU gone from the host's list disappears once free; a waiter that left is purged.
        store.set_host_gpus(HOST, [("1", None)])
        assert set(_holders(store)) == {"1"}


def test_two_connections_race_for_the_last_gpu(db_url: str) -> None:
    with Store(url=db_url) as setup:
        setup.set_host_gpus(HOST, [("0", None)])
    rounds = 4
    with Store(url=db_url) as one, Store(url=db_url) as two:
        for n in range(rounds):
            beams = _queued_beams(one, 2, case=f"race{n}")
            barrier = threading.Barrier(2, timeout=30)
            results: dict[int, tuple[str, ...] | None] = {}

            def ask(
                store: Store,
                beam_id: int,
                barrier: threading.Barrier = barrier,
                results: dict[int, tuple[str, ...] | None] = results,
            ) -> None:
                barrier.wait()
                results[beam_id] = store.acquire_host_gpus(HOST, beam_id=beam_id, count=1)

            threads = [
                threading.Thread(target=ask, args=(store, beam))
                for store, beam in zip((one, two), beams, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
                assert not thread.is_alive(), "an acquire never returned"
            granted = [b for b, g in results.items() if g is not None]
            assert len(granted) == 1, f"round {n}: {results}"
            assert _holders(one) == {"0": granted[0]}
            # Free it for the next round: the winner ends, the loser leaves the queue.
            for beam in beams:
                one.transition(beam, BeamState.QUEUED, BeamState.CANCELLED, reason="round over")
