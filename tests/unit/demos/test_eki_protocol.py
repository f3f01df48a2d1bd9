"""The protocol constants both sides hard-code agree, names are valid, the header is found."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from simbridge.demos.eki import protocol
from simbridge.demos.eki.build import SOURCE, get_include
from simbridge.demos.eki.driver import IterationStats, RunOptions
from simbridge.demos.eki.errors import BuildFailed, ForwardModelDied, ModelLayoutMismatch
from simbridge.demos.eki.model import describe_exit, log_tail
from simbridge.errors import SimbridgeError
from simbridge.shm import LayoutMismatch, PeerGone, validate_name

C_SOURCE = SOURCE.read_text()


def c_define(name: str) -> float:
    match = re.search(rf"^#define {name} ([0-9.e+-]+)", C_SOURCE, re.MULTILINE)
    assert match, f"{name} not defined in forward_model.c"
    return float(match.group(1))


def test_constants_match_the_c_model() -> None:
    assert c_define("EKI_PROTOCOL_VERSION") == protocol.PROTOCOL_VERSION
    assert c_define("EKI_CONFIG_LEN") == protocol.CONFIG_LEN
    assert c_define("EKI_TIMING_LEN") == protocol.TIMING_LEN
    assert c_define("EKI_NPARAM") == protocol.N_PARAMS
    assert c_define("EKI_NREC") == protocol.N_RECEPTORS
    assert c_define("EKI_NSTEP") == protocol.N_STEPS
    assert c_define("STEP_S") == protocol.STEP_SECONDS


def test_exit_codes_match_the_c_model() -> None:
    enum = re.search(r"enum \{([^}]*EXIT_OK[^}]*)\}", C_SOURCE)
    assert enum
    in_c = {k: int(v) for k, v in re.findall(r"EXIT_(\w+) = (\d+)", enum.group(1))}
    assert in_c == {e.name: e.value for e in protocol.ModelExit}


def test_names_are_valid_block_names_and_fresh_ones_differ() -> None:
    a, b = protocol.Names.fresh(), protocol.Names.fresh()
    assert a.prefix != b.prefix
    for n in (a.config, a.truth, a.states, a.obs0, a.ens_obs, a.timing):
        assert validate_name(n) == n
    assert len({a.config, a.truth, a.states, a.obs0, a.ens_obs, a.timing}) == 6


def test_config_encodes_sizes_in_the_documented_order() -> None:
    cfg = protocol.encode_config(protocol.Sizes(members=37), iterations=5)
    assert cfg.dtype == np.int64
    assert cfg.shape == (protocol.CONFIG_LEN,)
    assert cfg[:7].tolist() == [protocol.PROTOCOL_VERSION, 24, 16, 216, 37, 5, os.getpid()]


def test_timing_decodes_the_models_fields() -> None:
    t = protocol.ModelTiming.decode(np.array([1.5, 0.01, 0.2, 0.02, 100, 3, 0, 0], dtype=np.float64))
    assert (t.forward_s, t.read_copy_s, t.wait_s, t.publish_s, t.members, t.iteration) == (
        1.5,
        0.01,
        0.2,
        0.02,
        100,
        3,
    )


def test_sizes_shapes_follow_the_issue() -> None:
    s = protocol.Sizes(members=100)
    assert s.states_shape == (24, 100)
    assert s.obs_shape == (16, 216)
    assert s.ens_obs_shape == (100, 16, 216)


def test_get_include_finds_the_one_header(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    include = get_include()
    assert (include / "simbridge" / "shm.h").is_file()
    monkeypatch.setenv("SIMBRIDGE_INCLUDE", str(tmp_path))
    assert get_include() == include  # an override without the header is passed over
    (tmp_path / "simbridge").mkdir()
    (tmp_path / "simbridge" / "shm.h").write_text("/* elsewhere */\n")
    assert get_include() == tmp_path


def test_errors_belong_to_the_tree_and_refine_the_shm_errors() -> None:
    died = ForwardModelDied("x", name="b", pid=1, returncode=-9, log_path="/l")
    assert (
        isinstance(died, PeerGone) and isinstance(died, SimbridgeError) and isinstance(died, ConnectionError)
    )
    assert isinstance(ModelLayoutMismatch("x"), LayoutMismatch)
    assert isinstance(BuildFailed("x"), RuntimeError)


def test_exit_descriptions_name_the_signal_or_status() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit status 3 (LAYOUT)"
    assert describe_exit(99) == "exit status 99"
    assert describe_exit(None) == "still running"


def test_log_tail_keeps_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "model.log"
    path.write_text("".join(f"line {i}\n" for i in range(20)))
    assert log_tail(path, 3) == "line 17\nline 18\nline 19"
    assert log_tail(tmp_path / "missing.log") == ""


def test_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        RunOptions(members=1)
    with pytest.raises(ValueError, match="iterations"):
        RunOptions(iterations=-1)
    with pytest.raises(ValueError, match="noise"):
        RunOptions(noise=float("nan"))


def test_overhead_is_communication_over_total() -> None:
    s = IterationStats(
        iteration=1,
        members=10,
        eki_s=0.1,
        wait_s=0.5,
        forward_s=0.45,
        python_publish_s=0.001,
        python_read_s=0.002,
        model_read_s=0.003,
        model_publish_s=0.004,
        total_s=1.0,
        misfit=1.0,
        spread=0.1,
    )
    assert s.communication_s == pytest.approx(0.01)
    assert s.overhead_pct == pytest.approx(1.0)
