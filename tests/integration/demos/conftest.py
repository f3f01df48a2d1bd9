"""Builds the EKI forward model with the machine's real compiler: the shipped sizes, and other sizes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import require_cc

from simbridge.demos.eki.build import build_model
from simbridge.shm import registry


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_cc()
    return tmp_path_factory.mktemp("eki-model")


@pytest.fixture(scope="session")
def model_binary(model_cache: Path) -> Path:
    return build_model(cache_dir=model_cache)


@pytest.fixture(scope="session")
def narrow_model(model_cache: Path) -> Path:
    """A model built for 8 receptors: what a user gets after changing a size on one side only."""
    return build_model(cache_dir=model_cache, defines={"EKI_NREC": 8})


@pytest.fixture
def leftover_blocks() -> Iterator[list[str]]:
    """Names a test expects to be gone at its end; any left (e.g. a killed driver's) are removed."""
    names: list[str] = []
    yield names
    for name in names:
        if registry.block_info(name) is not None:
            registry.remove(name, force=True)
