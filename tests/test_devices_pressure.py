"""Execution-provider fallback on the real onnxruntime, and memory-pressure readings from real-format files.

Providers: the installed onnxruntime decides what is "available"; a made-up name stands for an NPU whose
build or driver is missing, and AzureExecutionProvider (listed by the CPU wheel) stands for a provider that
loads but takes none of the graph. Pressure: PSI and memory.events files are written in the kernel's exact
format to tmp_path, so the tests do not depend on this machine's kernel; the real /proc/pressure/memory is
used where it exists.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmos.arbiter.devices import ProviderFailure, open_session
from llmos.arbiter.pressure import (
    PressureMonitor,
    own_cgroup_events_path,
    read_cgroup_events,
    read_psi,
)
from llmos.engine.llm_engine import LLMEngine
from llmos.engine.sampling import SamplingParams
from llmos.errors import ModelUnavailableError
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf

CPU = "CPUExecutionProvider"
AZURE = "AzureExecutionProvider"
NO_NPU = "NoSuchNPUExecutionProvider"
needs_azure = pytest.mark.skipif(
    AZURE not in ort.get_available_providers(),
    reason="this onnxruntime build does not list AzureExecutionProvider (the listed-but-useless provider)",
)


# -- execution providers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-node Relu graph, written as a file like the real model.onnx."""
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx may write a newer IR than this onnxruntime reads
    path = tmp_path_factory.mktemp("graph") / "relu.onnx"
    onnx.save(model, path)
    return str(path)


def _options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def test_unknown_provider_falls_back_to_cpu_and_says_why(
    graph: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="llmos.devices"):
        session, provider, failures = open_session(graph, _options(), [NO_NPU])
    assert provider == CPU and session.get_providers() == [CPU]  # CPU tried last although not listed
    assert [f.provider for f in failures] == [NO_NPU]
    assert "not available in this onnxruntime build (available: " in failures[0].reason
    assert CPU in failures[0].reason
    assert [r.getMessage() for r in caplog.records if r.name == "llmos.devices"] == [
        f"execution provider {NO_NPU} failed for {graph}: {failures[0].reason}"
    ]


@needs_azure
def test_listed_provider_that_takes_no_nodes_counts_as_failed(graph: str) -> None:
    # Plain onnxruntime: the session "runs on Azure" (first in get_providers()) yet every node is on CPU.
    plain = ort.InferenceSession(graph, _options(), providers=[AZURE])
    assert plain.get_providers()[0] == AZURE
    _, provider, failures = open_session(graph, _options(), [AZURE, CPU])
    assert provider == CPU
    assert failures == [
        ProviderFailure(AZURE, "it took none of the graph's nodes (everything would run on the CPU)")
    ]


@needs_azure
def test_providers_are_tried_in_the_configured_order(graph: str) -> None:
    _, provider, failures = open_session(graph, _options(), [AZURE, NO_NPU, CPU, AZURE])
    assert provider == CPU and [f.provider for f in failures] == [AZURE, NO_NPU]
    _, provider, failures = open_session(graph, _options(), [CPU, AZURE])  # CPU first: the rest never tried
    assert provider == CPU and failures == []


def test_options_survive_failed_attempts(graph: str) -> None:
    """The same SessionOptions object is used for every attempt: a failed one must leave it intact."""
    so = _options()
    # onnxruntime itself, its CPU retry switched off: a Python warning, then the session fails
    with (
        pytest.warns(UserWarning, match="not in available provider names"),
        pytest.raises(RuntimeError, match="Unknown Provider Type"),
    ):
        ort.InferenceSession(graph, so, providers=[NO_NPU], enable_fallback=0)
    with pytest.raises(Exception, match="INVALID_PROTOBUF"):
        ort.InferenceSession(b"not a graph", so, providers=[CPU], enable_fallback=0)
    session, provider, _ = open_session(graph, so, [AZURE, NO_NPU])
    assert provider == CPU
    used = session.get_session_options()
    assert used.intra_op_num_threads == 1 and used.log_severity_level == 3
    assert used.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_every_provider_failing_is_model_unavailable(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07garbage, not a protobuf graph")
    with pytest.raises(ModelUnavailableError) as err:
        open_session(str(broken), _options(), [NO_NPU, CPU])
    message = str(err.value)
    assert message.startswith(f"onnxruntime could not load {broken} on any execution provider: ")
    assert f"{NO_NPU}: not available" in message
    assert f"{CPU}: [ONNXRuntimeError]" in message and "\n" not in message


@pytest.mark.parametrize("providers", [[], "CPUExecutionProvider", [CPU, 3], [""]])
def test_malformed_provider_list_is_a_value_error(graph: str, providers: object) -> None:
    with pytest.raises(ValueError, match="provider"):
        open_session(graph, _options(), providers)  # type: ignore[arg-type]


def test_engine_on_a_missing_npu_generates_on_cpu(tmp_path: Path) -> None:
    gguf = write_random_gguf(
        tmp_path / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, seed=3
    )
    model_dir = ModelStore(tmp_path / "store").import_gguf(gguf)
    engine = LLMEngine(model_dir, threads=1, providers=(NO_NPU, CPU))  # with warmup: real runs
    assert engine.runner.provider == CPU
    assert [f.provider for f in engine.runner.provider_failures] == [NO_NPU]
    out = engine.generate([1, 40, 77, 120], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


# -- memory pressure --------------------------------------------------------------------------------------
def _psi(some: float, full: float = 0.0) -> str:
    return (
        f"some avg10={some:.2f} avg60=1.50 avg300=0.42 total=123456\n"
        f"full avg10={full:.2f} avg60=0.00 avg300=0.00 total=789\n"
    )


def _events(high: int = 0, max_: int = 0, oom: int = 0, low: int = 0) -> str:
    return f"low {low}\nhigh {high}\nmax {max_}\noom {oom}\noom_kill {oom}\noom_group_kill 0\n"


def test_read_psi_parses_the_kernel_format(tmp_path: Path) -> None:
    f = tmp_path / "memory"
    f.write_text(_psi(12.5, 3.25))
    assert read_psi(f) == (12.5, 3.25)


def test_read_psi_missing_or_unreadable_is_none(tmp_path: Path) -> None:
    assert read_psi(tmp_path / "absent") is None
    assert read_psi(tmp_path) is None  # a directory: EISDIR, like EOPNOTSUPP on a psi=0 kernel


@pytest.mark.parametrize(
    "text",
    [
        "",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",  # no full line
        "some avg10=abc avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00\n",
        "some avg10=250.00\nfull avg10=0.00\n",
        "some avg10=nan\nfull avg10=0.00\n",
        "partial avg10=1.00\nfull avg10=0.00\n",
        "\x00\x01binary",
    ],
)
def test_malformed_psi_is_none_with_one_warning(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "memory"
    f.write_text(text)
    with caplog.at_level(logging.WARNING, logger="llmos.pressure"):
        assert read_psi(f) is None
        assert read_psi(f) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmos.pressure"]
    assert len(warnings) == 1 and warnings[0].startswith(f"ignoring {f}: malformed PSI file: ")


def test_real_psi_file_if_this_kernel_has_one() -> None:
    if not os.path.exists("/proc/pressure/memory"):
        pytest.skip("this kernel has no PSI (/proc/pressure/memory missing: CONFIG_PSI off or kernel < 4.20)")
    reading = read_psi()
    if reading is None:
        pytest.skip("/proc/pressure/memory exists but cannot be read (kernel booted with psi=0)")
    assert all(0.0 <= v <= 100.0 for v in reading)
    monitor = PressureMonitor(0)
    assert monitor.available and monitor.check()  # threshold 0: always under pressure
    assert monitor.last is not None and monitor.last.some_avg10 is not None
    assert "/proc/pressure/memory" in monitor.last.source


def test_read_cgroup_events(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "memory.events"
    f.write_text(_events(high=4, max_=1, oom=2, low=9))
    assert read_cgroup_events(f) == {
        "low": 9,
        "high": 4,
        "max": 1,
        "oom": 2,
        "oom_kill": 2,
        "oom_group_kill": 0,
    }
    assert read_cgroup_events(tmp_path / "absent") is None
    f.write_text("high four\n")
    with caplog.at_level(logging.WARNING, logger="llmos.pressure"):
        assert read_cgroup_events(f) is None
    assert any("malformed memory.events" in r.getMessage() for r in caplog.records)


def test_own_cgroup_events_path(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys-fs-cgroup"
    (root / "system.slice" / "llmosd.service").mkdir(parents=True)
    (root / "system.slice" / "llmosd.service" / "memory.events").write_text(_events())
    proc.write_text("0::/system.slice/llmosd.service\n")  # pure cgroup v2
    assert own_cgroup_events_path(proc, root) == root / "system.slice" / "llmosd.service" / "memory.events"
    (root / "unified" / "user.slice").mkdir(parents=True)  # systemd hybrid layout, memory on v2
    (root / "unified" / "user.slice" / "memory.events").write_text(_events())
    proc.write_text("4:memory:/user.slice\n1:name=systemd:/user.slice\n0::/user.slice\n")
    assert own_cgroup_events_path(proc, root) == root / "unified" / "user.slice" / "memory.events"
    proc.write_text("4:memory:/elsewhere\n0::/elsewhere\n")  # memory controller on v1 only
    assert own_cgroup_events_path(proc, root) is None
    assert own_cgroup_events_path(tmp_path / "absent", root) is None
    found = own_cgroup_events_path()  # this machine: whatever it is, a real file or None
    assert found is None or found.is_file()


def test_monitor_psi_threshold(tmp_path: Path) -> None:
    psi = tmp_path / "memory"
    psi.write_text(_psi(5.0))
    monitor = PressureMonitor(10, psi_path=psi, cgroup_events_path=None)
    assert monitor.available and monitor.last is None
    assert not monitor.check()
    assert monitor.last is not None and monitor.last.some_avg10 == 5.0 and monitor.last.source == str(psi)
    psi.write_text(_psi(10.0, 2.0))
    assert monitor.check()
    assert monitor.last.full_avg10 == 2.0 and monitor.last.cgroup_high_events is None


def test_monitor_cgroup_counters_increasing(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text(_events(high=3))
    monitor = PressureMonitor(50, psi_path=tmp_path / "no-psi", cgroup_events_path=events)
    assert monitor.available
    assert not monitor.check()  # the counters as found at start are history, not pressure
    events.write_text(_events(high=3, low=8))
    assert not monitor.check()  # memory.low being broken into is not our limit
    events.write_text(_events(high=4))
    assert monitor.check()
    assert monitor.last is not None and monitor.last.cgroup_high_events == 4
    assert monitor.last.some_avg10 is None and monitor.last.source == str(events)
    assert not monitor.check()  # no new events since the previous check
    events.write_text(_events(high=4, max_=1))
    assert monitor.check()
    events.write_text(_events(high=4, max_=1, oom=1))
    assert monitor.check() and monitor.last.cgroup_oom_events == 1
    events.write_text(_events())  # cgroup recreated: counters restart, new baseline
    assert not monitor.check()


def test_monitor_counts_events_since_construction(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text(_events())
    monitor = PressureMonitor(50, psi_path=tmp_path / "no-psi", cgroup_events_path=events)
    events.write_text(_events(oom=1))
    assert monitor.check()


def test_monitor_without_sources(tmp_path: Path) -> None:
    monitor = PressureMonitor(10, psi_path=tmp_path / "no-psi", cgroup_events_path=None)
    assert not monitor.available and not monitor.check()
    assert monitor.last is not None and monitor.last.source == "none"
    forced = PressureMonitor(0, psi_path=tmp_path / "no-psi", cgroup_events_path=tmp_path / "no-events")
    assert not forced.available and forced.check()  # threshold 0 forces pressure even with nothing to read


@pytest.mark.parametrize("threshold", [-1, -0.01, 100.5, float("nan"), float("inf"), True, "10"])
def test_monitor_rejects_bad_thresholds(threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold_pct"):
        PressureMonitor(threshold)  # type: ignore[arg-type]
