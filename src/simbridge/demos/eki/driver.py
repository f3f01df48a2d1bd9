"""The coupled loop: Python EKI on one side of simbridge Blocks, the C forward model on the other.

``run_inversion`` starts the model, follows the protocol of ``protocol.py`` and times every iteration
(EKI compute, waiting, communication on both sides, forward model as the model reports it).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from simbridge.demos.eki import protocol
from simbridge.demos.eki.build import build_model
from simbridge.demos.eki.eki import (
    Array,
    NoiseModel,
    data_misfit,
    eki_update,
    prior_ensemble,
    relative_error,
    true_emissions,
)
from simbridge.demos.eki.errors import ModelLayoutMismatch
from simbridge.demos.eki.model import ModelProcess, describe_exit
from simbridge.logs import get_logger
from simbridge.shm import (
    Block,
    BlockNotFound,
    LayoutMismatch,
    PeerGone,
    Snapshot,
    Timeout,
    block_info,
    remove,
)

log = get_logger("simbridge.demos.eki")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What one inversion does; every field has the demo's default."""

    members: int = 100
    iterations: int = 10
    noise: float = 0.05
    seed: int = 0
    # Stop early once the data misfit improved by less than this fraction twice in a row; None never
    # stops early (benchmarks and tests that need a fixed number of forward runs).
    tolerance: float | None = 1e-3
    prior_mean: float = 15.0
    prior_spread: float = 0.8
    non_negative: bool = True
    output_dir: Path = Path("eki-output")
    record: Path | None = None
    model: Path | None = None  # a prebuilt forward model; None compiles the packaged source
    # The longest wait for any one message, either way. A dead peer is noticed within a second, so this
    # only bounds a hung one; generous, because 10,000 members take about a minute per side here.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.members < 2:
            raise ValueError(f"EKI needs at least 2 ensemble members, got {self.members}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


@dataclass(frozen=True, kw_only=True)
class IterationStats:
    """One iteration's figures, in seconds, as the original coupling reported them."""

    iteration: int
    members: int
    eki_s: float  # the EKI update in numpy (0 for the last forward run)
    wait_s: float  # Python idle, waiting for the model's answer
    forward_s: float  # the model running every member, as the model measured it
    python_publish_s: float
    python_read_s: float
    model_read_s: float
    model_publish_s: float
    total_s: float
    misfit: float
    spread: float  # mean standard deviation of the ensemble's emissions (g/s)

    @property
    def communication_s(self) -> float:
        return self.python_publish_s + self.python_read_s + self.model_read_s + self.model_publish_s

    @property
    def overhead_pct(self) -> float:
        return 100.0 * self.communication_s / self.total_s if self.total_s > 0 else 0.0


@dataclass(kw_only=True)
class EkiResult:
    """The inversion's outcome: truth, estimate, ensemble, data, fit and the per-iteration history."""

    truth: Array
    prior: Array  # (params, members)
    ensemble: Array  # (params, members): the last ensemble the model ran
    clean: Array  # (receptors, steps) noise-free observations of the truth
    observed: Array  # (receptors, steps) with noise
    sigma: Array  # (receptors, steps)
    fitted: Array  # (receptors, steps) the ensemble mean of the model's observations
    history: list[IterationStats] = field(default_factory=list)
    stopped: str = ""
    log_path: Path = Path()
    model_status: str = ""

    @property
    def estimate(self) -> Array:
        return np.asarray(self.ensemble.mean(axis=1))

    @property
    def relative_error(self) -> float:
        return relative_error(self.estimate, self.truth)

    @property
    def prior_relative_error(self) -> float:
        return relative_error(self.prior.mean(axis=1), self.truth)

    def save(self, directory: Path) -> Path:
        """Write ``result.npz`` and ``history.json`` into ``directory``; return the JSON's path."""
        directory.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            directory / "result.npz",
            truth=self.truth,
            prior=self.prior,
            ensemble=self.ensemble,
            clean=self.clean,
            observed=self.observed,
            sigma=self.sigma,
            fitted=self.fitted,
        )
        summary: dict[str, Any] = {
            "relative_error": self.relative_error,
            "prior_relative_error": self.prior_relative_error,
            "stopped": self.stopped,
            "model_status": self.model_status,
            "log": str(self.log_path),
            "iterations": [
                asdict(s) | {"communication_s": s.communication_s, "overhead_pct": s.overhead_pct}
                for s in self.history
            ],
        }
        path = directory / "history.json"
        path.write_text(json.dumps(summary, indent=2))
        return path


class _Peer:
    """The driver's view of the model: its blocks are opened and read so that its death is named."""

    def __init__(self, model: ModelProcess, *, record: Path | None, timeout_s: float) -> None:
        self.model = model
        self.record = record
        self.timeout_s = timeout_s

    def open(self, name: str, shape: tuple[int, ...], dtype: DTypeLike) -> Block:
        what = f"the model to create block {name!r}"
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.model.check("the model to create its output blocks", name)
            try:
                return Block.open(name, timeout=0.05, shape=shape, dtype=dtype, record=self.record)
            except BlockNotFound:
                if time.monotonic() >= deadline:
                    raise Timeout(
                        f"waited {self.timeout_s:g} s for {what}; the model (pid {self.model.pid}) runs "
                        f"but did not create it. Its log is {self.model.log_path}",
                        name=name,
                        waited_for=what,
                        timeout=self.timeout_s,
                    ) from None
            except LayoutMismatch as exc:
                raise ModelLayoutMismatch(
                    f"{exc}. The forward model (pid {self.model.pid}) was built with other sizes than "
                    f"the driver's; its log is {self.model.log_path}"
                ) from exc

    def read(
        self, block: Block, *, after: int, what: str, out: NDArray[Any] | None = None
    ) -> tuple[Snapshot, float, float]:
        """Read iteration > ``after``; return it with the seconds spent waiting and copying."""
        t0 = time.time()
        try:
            snap = block.read(after=after, timeout=self.timeout_s, out=out)
        except PeerGone as exc:  # WriterClosed included: the model must not close before we are done
            raise self.model.died(what, block.name) from exc
        t1 = time.time()
        # Both sides stamp CLOCK_REALTIME: time before the publish committed was waiting, after it copying.
        start = min(max(t0, snap.published_at), t1)
        return snap, start - t0, t1 - start


def run_inversion(
    options: RunOptions,
    *,
    on_iteration: Callable[[IterationStats], None] | None = None,
    names: protocol.Names | None = None,
) -> EkiResult:
    """Run the coupled loop to the end and return the result (nothing is plotted here).

    Raises :class:`ForwardModelDied` (a :class:`PeerGone`) when the model dies,
    :class:`ModelLayoutMismatch` (a :class:`LayoutMismatch`) when it was built with other sizes.
    """
    rng = np.random.default_rng(options.seed)
    sizes = protocol.Sizes(members=options.members)
    binary = options.model if options.model is not None else build_model()
    names = names or protocol.Names.fresh()
    log_path = options.output_dir / "forward_model.log"
    truth = true_emissions(sizes.params)
    record = options.record
    model = ModelProcess(binary=binary, prefix=names.prefix, log_path=log_path, timeout_s=options.timeout_s)
    # The model is entered first so it is stopped last: our blocks close first, which is the model's
    # signal to exit cleanly; the model's __exit__ then only has to wait for it.
    with model, contextlib.ExitStack() as blocks:
        blocks.callback(_remove_stale, [names.obs0, names.ens_obs, names.timing])
        peer = _Peer(model, record=record, timeout_s=options.timeout_s)
        config = blocks.enter_context(
            Block.create(names.config, protocol.CONFIG_LEN, np.int64, record=record)
        )
        truth_out = blocks.enter_context(
            Block.create(names.truth, sizes.params, protocol.STATE_DTYPE, record=record)
        )
        states = blocks.enter_context(
            Block.create(names.states, sizes.states_shape, protocol.STATE_DTYPE, record=record)
        )
        config.publish(protocol.encode_config(sizes, iterations=options.iterations), iteration=1)
        truth_out.publish(truth.astype(protocol.STATE_DTYPE), iteration=1)
        obs0 = blocks.enter_context(peer.open(names.obs0, sizes.obs_shape, protocol.OBS_DTYPE))
        ens_obs = blocks.enter_context(peer.open(names.ens_obs, sizes.ens_obs_shape, protocol.OBS_DTYPE))
        timing = blocks.enter_context(peer.open(names.timing, (protocol.TIMING_LEN,), np.float64))

        snap, _, _ = peer.read(obs0, after=0, what="the observations of the true emissions")
        clean = snap.array.astype(np.float64)
        observed, sigma = NoiseModel(level=options.noise).observe(clean, rng)
        y, sig = observed.ravel(), sigma.ravel()
        u = prior_ensemble(
            params=sizes.params,
            members=sizes.members,
            mean=options.prior_mean,
            spread=options.prior_spread,
            rng=rng,
        )
        result = EkiResult(
            truth=truth,
            prior=u.copy(),
            ensemble=u,
            clean=clean,
            observed=observed,
            sigma=sigma,
            fitted=np.zeros_like(clean),
            log_path=log_path,
        )
        received = np.empty(sizes.ens_obs_shape, protocol.OBS_DTYPE)
        best, stale = math.inf, 0
        for k in range(1, options.iterations + 2):
            t_start = time.perf_counter()
            payload = u.astype(protocol.STATE_DTYPE)  # the conversion is the EKI's business, not transport
            t0 = time.perf_counter()
            states.publish(payload, iteration=k)
            publish_s = time.perf_counter() - t0
            what = f"the ensemble observations of iteration {k}"
            _, wait_s, read_s = peer.read(ens_obs, after=k - 1, what=what, out=received)
            tsnap, wait2_s, read2_s = peer.read(timing, after=k - 1, what=f"the timings of iteration {k}")
            reported = protocol.ModelTiming.decode(tsnap.array)
            g = received.reshape(sizes.members, -1).T.astype(np.float64)  # (d, members)
            g_mean = g.mean(axis=1)
            misfit = data_misfit(y, g_mean, sig)
            result.ensemble, result.fitted = u, g_mean.reshape(sizes.obs_shape)
            improved = misfit < best * (1.0 - (options.tolerance or 0.0))
            best, stale = (misfit, 0) if improved else (min(best, misfit), stale + 1)
            stop = ""
            if k > options.iterations:
                stop = f"ran the {options.iterations} iterations asked for"
            elif options.tolerance is not None and stale >= 2:
                stop = f"the data misfit improved by less than {options.tolerance:g} twice in a row"
            eki_s = 0.0
            if not stop:
                t0 = time.perf_counter()
                u = eki_update(u, g, y, sig, rng, non_negative=options.non_negative)
                eki_s = time.perf_counter() - t0
            stats = IterationStats(
                iteration=k,
                members=sizes.members,
                eki_s=eki_s,
                wait_s=wait_s + wait2_s,
                forward_s=reported.forward_s,
                python_publish_s=publish_s,
                python_read_s=read_s + read2_s,
                model_read_s=reported.read_copy_s,
                model_publish_s=reported.publish_s,
                total_s=time.perf_counter() - t_start,
                misfit=misfit,
                spread=float(result.ensemble.std(axis=1).mean()),
            )
            result.history.append(stats)
            log.info(
                "eki iteration",
                iteration=k,
                misfit=round(misfit, 4),
                communication_s=round(stats.communication_s, 5),
                overhead_pct=round(stats.overhead_pct, 2),
            )
            if on_iteration is not None:
                on_iteration(stats)
            if stop:
                result.stopped = stop
                break
    result.model_status = _model_status(model)
    return result


def _model_status(model: ModelProcess) -> str:
    code = model.returncode
    if code != protocol.ModelExit.OK:
        log.warning(
            "forward model ended badly after the run", status=describe_exit(code), log=str(model.log_path)
        )
    return describe_exit(code)


def _remove_stale(names: list[str]) -> None:
    # A killed model cannot unlink what it created; its reader is the one left to tidy /dev/shm.
    for name in names:
        info = block_info(name)
        if info is not None and info.stale:
            with contextlib.suppress(BlockNotFound):
                remove(name)
                log.info("removed a dead model's block", name=name, owner_pid=info.owner_pid)
