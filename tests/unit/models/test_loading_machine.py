"""A hypothesis state machine over load, cancel, timeout, get, release and unload of one model,
with loaders held on events the test controls: at no point do two loaders of the model run at
once (or two built copies exist), and every caller's wait ends within its own timeout even while
loaders hang."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from simbridge.config import ModelSettings
from simbridge.models import LoadContext, ModelError, ModelManager

# Fail-safes against a hang, never measurements: a correct run ends each wait in milliseconds.
HANG_S = 20.0
# A loader the test forgets to release still returns after this, so no thread outlives the run.
LOADER_GIVES_UP_S = 60.0
SHORT_LOAD_S = 0.02
LONG_LOAD_S = 30.0


@dataclass
class Call:
    """One loader call, held until the test releases it (or, if cooperative, cancels it)."""

    cooperative: bool
    release: threading.Event = field(default_factory=threading.Event)
    fail: bool = False


class Builds:
    """The model's loader and unloader: counts loaders running and copies alive, keeps peaks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        # Hung loaders that ignore ctx.cancelled are the hard case; cooperative ones come later.
        self.cooperative = False
        self.running = self.peak_running = 0
        self.alive = self.peak_alive = 0
        self.released_all = False

    def load(self, ctx: LoadContext) -> object:
        with self.lock:
            call = Call(cooperative=self.cooperative)
            if self.released_all:
                call.release.set()
            self.calls.append(call)
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
        try:
            if call.cooperative:
                # As a real loader does between steps: look at the cancel flag now and then.
                for _ in range(int(LOADER_GIVES_UP_S / 0.005)):
                    if call.release.wait(0.005):
                        break
                    ctx.raise_if_cancelled()
            else:
                call.release.wait(LOADER_GIVES_UP_S)
            if call.fail:
                raise RuntimeError("weights file is corrupt")
            with self.lock:
                self.alive += 1
                self.peak_alive = max(self.peak_alive, self.alive)
            return object()
        finally:
            with self.lock:
                self.running -= 1

    def unload(self, model: object) -> None:
        with self.lock:
            self.alive -= 1

    def pending(self) -> list[Call]:
        with self.lock:
            return [call for call in self.calls if not call.release.is_set()]

    def release_all(self) -> None:
        with self.lock:
            self.released_all = True
            for call in self.calls:
                call.release.set()


class LoadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.builds = Builds()
        self.manager = ModelManager(
            settings=ModelSettings(max_concurrent=2, wait_timeout_s=LONG_LOAD_S, load_timeout_s=SHORT_LOAD_S),
            cuda_available=lambda: False,
        )
        self.manager.register("m", self.builds.load, device="cpu", unloader=self.builds.unload)
        self.pool = ThreadPoolExecutor(32)
        # Callers blocked in load(): (future, their wait timeout).
        self.callers: list[tuple[Future[Any], float]] = []
        self.held: list[AbstractContextManager[Any]] = []

    @rule(wait=st.sampled_from([0.0, SHORT_LOAD_S, LONG_LOAD_S]), cooperative=st.booleans())
    def load(self, wait: float, cooperative: bool) -> None:
        # `cooperative`: whether the loader this may start polls ctx.cancelled.
        self.builds.cooperative = cooperative
        self.callers.append((self.pool.submit(self._load, wait), wait))

    def _load(self, wait: float) -> None:
        # Timeouts, cancels and load errors are outcomes here, not failures.
        with suppress(ModelError):
            self.manager.load("m", timeout=wait)

    @rule()
    def cancel(self) -> None:
        self.manager.cancel_loading("m")

    @rule(seconds=st.sampled_from([SHORT_LOAD_S, LONG_LOAD_S]))
    def set_load_timeout(self, seconds: float) -> None:
        # Loads started from now on time out after `seconds` (enforced by waiters and the
        # housekeeper): the "timeout" of the machine, racing the test's own rules.
        self.manager.update("m", load_timeout=seconds)

    # No precondition on pending calls: whether a loader has started yet depends on threads, and
    # hypothesis needs preconditions that replay alike.
    @rule(index=st.integers(min_value=0, max_value=7), fail=st.booleans())
    def finish_a_loader(self, index: int, fail: bool) -> None:
        pending = self.builds.pending()
        if pending:
            call = pending[index % len(pending)]
            call.fail = fail
            call.release.set()

    @rule()
    def get(self) -> None:
        use = self.manager.use("m", wait_timeout=0, access_timeout=0)
        try:
            use.__enter__()
        except ModelError:
            return
        self.held.append(use)

    @rule()
    def release(self) -> None:
        # No precondition: whether get() succeeded depends on threads (see finish_a_loader).
        if self.held:
            self.held.pop().__exit__(None, None, None)

    @rule()
    def unload(self) -> None:
        self.manager.unload("m")

    @rule()
    def time_passes(self) -> None:
        # The timeout of the machine: short load deadlines pass (a wait on purpose, not a
        # synchronisation: what happens meanwhile is up to the manager's threads). No loader is
        # released meanwhile, yet every caller with a short wait must have had its answer.
        threading.Event().wait(3 * SHORT_LOAD_S)
        short = [future for future, wait in self.callers if wait <= SHORT_LOAD_S]
        _, stuck = wait_all(short, timeout=HANG_S)
        assert not stuck, f"{len(stuck)} callers with a {SHORT_LOAD_S} s wait are still waiting"

    @invariant()
    def never_two_loaders_or_copies(self) -> None:
        assert self.builds.peak_running <= 1, "two loaders of one model ran at once"
        assert self.builds.peak_alive <= 1, "two copies of one model existed at once"

    def teardown(self) -> None:
        try:
            self.builds.release_all()
            while self.held:
                self.held.pop().__exit__(None, None, None)
            _, stuck = wait_all([future for future, _ in self.callers], timeout=HANG_S)
            assert not stuck, f"{len(stuck)} callers never returned once every loader was released"
            self.manager.shutdown(timeout=HANG_S)
            self.never_two_loaders_or_copies()
        finally:
            self.builds.release_all()
            self.pool.shutdown(wait=False, cancel_futures=True)


LoadMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLoadMachine = LoadMachine.TestCase
