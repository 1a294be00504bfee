"""llmosd on a real private dbus-daemon, driven by separate app processes and by busctl and gdbus.

The daemon serves a tiny random-weight model (fast, and with a 4096-token context so a stream of
thousands of chunks fits); what is tested is the service, not the model's answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_harness import (
    Daemon,
    PrivateBus,
    app_python,
    busctl,
    client,
    gdbus,
    read_json,
    start_client,
    tiny_store,
    wait_until,
)

from llmos.tiny_model import write_random_gguf
from system_services.client import LLMClient, ServiceError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("svc"), context_length=4096)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    b = PrivateBus(tmp_path_factory.mktemp("bus"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def daemon(bus: PrivateBus, store: Path) -> Iterator[Daemon]:
    d = Daemon(bus.address, store)
    yield d
    assert d.stop() == 0


_started: list[subprocess.Popen[str]] = []  # daemons a test starts itself, killed if the test fails


def own_daemon(address: str, store: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    d = Daemon(address, store, *args, env=env)
    _started.append(d.proc)
    return d


def stop_own(own_bus: PrivateBus) -> None:
    """Kill the daemons a test started itself (if it failed before stopping them), then their bus."""
    for proc in _started:
        if proc.poll() is None:
            proc.kill()
    _started.clear()
    own_bus.stop()


def test_generic_clients_see_and_use_the_api(bus: PrivateBus, daemon: Daemon) -> None:
    intro = busctl(bus.address, "introspect", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1")
    assert intro.returncode == 0, intro.stderr
    for member in ("CountTokens", "CreateSession", "Generate", "GetStatus", "Model", "State", "Version"):
        assert member in intro.stdout
    prop = busctl(bus.address, "get-property", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "State")
    assert prop.stdout.strip() == 's "ready"'
    made = gdbus(
        bus.address,
        "call",
        "--session",
        "-d",
        "org.llmos.LLM1",
        "-o",
        "/org/llmos/LLM1",
        "-m",
        "org.llmos.LLM1.CreateSession",
        "{'system_prompt': <'Be brief.'>}",
    )
    assert made.returncode == 0, made.stderr
    session = made.stdout.split("'")[1]
    assert session.startswith("/org/llmos/LLM1/session/")
    # gdbus has exited, and a session dies with the connection that made it
    gone = busctl(bus.address, "call", "org.llmos.LLM1", session, "org.llmos.Session1", "Close")
    assert gone.returncode != 0
    said = busctl(
        bus.address,
        "call",
        "org.llmos.LLM1",
        "/org/llmos/LLM1",
        "org.llmos.LLM1",
        "Generate",
        "sa{sv}",
        "Hello",
        "2",
        "max_tokens",
        "u",
        "5",
        "ignore_eos",
        "b",
        "true",
    )
    assert said.returncode == 0, said.stderr
    assert '"tokens_out" u 5' in said.stdout
    bad = gdbus(
        bus.address,
        "call",
        "--session",
        "-d",
        "org.llmos.LLM1",
        "-o",
        "/org/llmos/LLM1",
        "-m",
        "org.llmos.LLM1.Generate",
        "hi",
        "{'max_tokens': <'many'>}",
    )
    assert bad.returncode != 0 and "org.llmos.Error.InvalidArgument" in bad.stderr


def test_generate_returns_text_and_stats(bus: PrivateBus, daemon: Daemon) -> None:
    on = {"max_tokens": 12, "ignore_eos": True, "speculative": True}
    out = client(bus.address, "generate", "Hello there", json.dumps(on))
    assert out["stats"]["tokens_out"] == 12 and out["stats"]["finish_reason"] == "length"
    assert out["stats"]["tokens_in"] > 3 and out["stats"]["ttft_ms"] > 0 and out["stats"]["tokens_per_s"] > 0
    assert isinstance(out["text"], str)
    assert out["stats"]["draft_tokens"] >= out["stats"]["accepted_tokens"] >= 0
    assert out["stats"]["forced_tokens"] == 0
    off = client(bus.address, "generate", "Hello there", json.dumps({"max_tokens": 12}))  # off by default
    assert off["stats"]["draft_tokens"] == 0 and off["stats"]["accepted_tokens"] == 0


@pytest.mark.parametrize(
    "opts, error",
    [
        ({"bogus": 1}, "InvalidArgument"),
        ({"max_tokens": "many"}, "InvalidArgument"),
        ({"speculative": "no"}, "InvalidArgument"),
        ({"max_tokens": 0}, "InvalidArgument"),
        ({"max_tokens": 10**6}, "InvalidArgument"),
        ({"temperature": -1.0}, "InvalidArgument"),
        ({"top_p": 0.0}, "InvalidArgument"),
        ({"priority": "urgent"}, "InvalidArgument"),
    ],
)
def test_bad_options_are_named_errors(bus: PrivateBus, daemon: Daemon, opts: dict, error: str) -> None:
    out = client(bus.address, "generate", "Hello", json.dumps(opts))
    assert out["error"] == f"org.llmos.Error.{error}", out
    assert out["message"]


def test_bad_prompts_are_named_errors_and_the_daemon_keeps_serving(bus: PrivateBus, daemon: Daemon) -> None:
    assert client(bus.address, "generate", "   ")["error"] == "org.llmos.Error.InvalidArgument"
    huge = "word " * 6000  # more tokens than the 4096-token context
    out = client(bus.address, "generate", huge)
    assert out["error"] == "org.llmos.Error.ContextOverflow", out
    assert "4096" in out["message"]
    assert client(bus.address, "status")["state"] == "ready"
    assert daemon.proc.poll() is None


def test_a_session_keeps_the_conversation_and_clone_copies_it(bus: PrivateBus, daemon: Daemon) -> None:
    out = client(bus.address, "turns", "First question", "Second question", "Third question")
    tokens_in = [t["stats"]["tokens_in"] for t in out["turns"]]
    assert tokens_in[0] < tokens_in[1] < tokens_in[2]  # each turn carries the ones before it
    assert out["clone"] != out["session"]
    assert out["clone_turn"]["tokens_in"] > tokens_in[2]  # the clone continues the same history
    # and neither recomputes what it already holds: each turn reuses the KV of the turns before it
    assert [t["stats"]["kv_source"] for t in out["turns"][1:]] == ["memory", "memory"]
    assert out["clone_turn"]["kv_source"] == "memory"
    # (all of it up to where re-tokenizing the answer text differs from the sampled tokens)
    assert out["clone_turn"]["tokens_cached"] > tokens_in[1]


def test_another_connection_cannot_touch_a_session(bus: PrivateBus, daemon: Daemon) -> None:
    owner = start_client(bus.address, "hold-session")
    try:
        session = read_json(owner)["session"]
        out = client(bus.address, "poke", session)
        denied = ("Prompt", "PromptStream", "Clone", "Close", "Get TokensUsed")
        assert {m: out[m] for m in denied} == {m: "org.llmos.Error.AccessDenied" for m in denied}
        assert out["GetManagedObjects"] == []  # nobody can list other connections' sessions
        for parent in ("/org/llmos/LLM1", "/org/llmos/LLM1/session"):
            xml = busctl(bus.address, "introspect", "--xml-interface", "org.llmos.LLM1", parent).stdout
            assert "<node name=" not in xml.replace('<node name="' + parent + '"', "")  # no child listed
    finally:
        owner.communicate("", timeout=30)  # closing stdin ends the owner; its session goes with it
    assert wait_until(lambda: client(bus.address, "status")["sessions"] == 0)


def test_a_stream_reaches_only_its_caller(bus: PrivateBus, daemon: Daemon) -> None:
    watcher = start_client(bus.address, "watch", "6")
    assert read_json(watcher)["watching"]
    out = client(bus.address, "stream", "tok_a", json.dumps({"max_tokens": 40, "ignore_eos": True}))
    assert out["code"] == 0 and out["chunks"] >= 1
    assert out["joined"] == out["results"]["text"]  # the chunks are exactly the answer
    assert out["results"]["tokens_out"] == 40
    assert out["request"].endswith("/tok_a")  # the path the caller chose before the call
    assert read_json(watcher)["seen"] == 0  # a match rule on another connection sees none of it
    watcher.wait(timeout=30)


def test_a_burst_of_3000_chunks_survives_a_frozen_bus(bus: PrivateBus, daemon: Daemon) -> None:
    """The bus daemon is frozen (SIGSTOP) for 2 s while llmosd streams: llmosd's socket buffer fills and
    its sends hit EAGAIN, which unguarded dbus-fast treats as fatal (DESIGN §4b). Every chunk must still
    arrive, in order, and the daemon must keep serving."""
    streamer = start_client(
        bus.address, "stream", "burst", json.dumps({"max_tokens": 3000, "ignore_eos": True})
    )
    assert "started" in read_json(streamer)
    bus.proc.send_signal(signal.SIGSTOP)
    time.sleep(2)
    bus.proc.send_signal(signal.SIGCONT)
    out = read_json(streamer, timeout=300)
    assert out["code"] == 0, out
    assert out["results"]["tokens_out"] == 3000
    assert out["chunks"] == out["results"]["chunks"] >= 2900  # a chunk per token, save multi-byte holds
    assert out["joined"] == out["results"]["text"]
    assert client(bus.address, "status")["state"] == "ready"


def test_an_owner_vanishing_mid_stream_cancels_its_work_and_frees_memory(
    bus: PrivateBus, daemon: Daemon
) -> None:
    def idle() -> bool:
        st = client(bus.address, "status")
        return st["sessions"] == 0 and st["active_requests"] == 0 and st["kv_bytes"] == 0

    # warm up the paths once, then take the baseline
    client(bus.address, "stream", "w", json.dumps({"max_tokens": 2000, "ignore_eos": True}), "0", "3")
    assert wait_until(idle)
    baseline = daemon.rss_kb()
    for i in range(200):
        out = client(
            bus.address, "stream", f"c{i}", json.dumps({"max_tokens": 2000, "ignore_eos": True}), "0", "3"
        )
        assert out["died_after"] == 3
    assert wait_until(idle), client(bus.address, "status")
    grown_mb = (daemon.rss_kb() - baseline) / 1024
    assert grown_mb < 16, f"RSS grew {grown_mb:.1f} MB over 200 abandoned streams"


def test_a_second_daemon_refuses_to_start_when_the_name_is_taken(
    bus: PrivateBus, daemon: Daemon, store: Path
) -> None:
    with pytest.raises(RuntimeError, match="already owned"):
        Daemon(bus.address, store)
    assert client(bus.address, "status")["state"] == "ready"  # the first one is undisturbed


def test_sigterm_cancels_requests_in_flight_and_exits_cleanly(tmp_path: Path, store: Path) -> None:
    own_bus = PrivateBus(tmp_path)
    try:
        d = own_daemon(own_bus.address, store)
        caller = start_client(
            own_bus.address, "generate", "Go on", json.dumps({"max_tokens": 4000, "ignore_eos": True})
        )
        assert wait_until(lambda: client(own_bus.address, "status")["active_requests"] == 1)
        d.proc.send_signal(signal.SIGTERM)
        out = read_json(caller)
        assert out["error"] == "org.llmos.Error.Cancelled", out
        assert d.proc.wait(timeout=30) == 0
        assert any("stopping" in line for line in d.log)
    finally:
        stop_own(own_bus)


def _llmosctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "system_services.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


def test_llmosctl_status_generate_and_chat_go_through_the_service(bus: PrivateBus, daemon: Daemon) -> None:
    st = _llmosctl("status", "--address", bus.address, "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["state"] == "ready"
    gen = _llmosctl("generate", "--address", bus.address, "--max-tokens", "6", "Hello")
    assert gen.returncode == 0, gen.stderr
    assert "completion 6 tokens" in gen.stderr or "finish stop" in gen.stderr
    assert "via llmosd" in gen.stderr
    chat = _llmosctl("chat", "--address", bus.address, "--max-tokens", "4", stdin="First\nSecond\n")
    assert chat.returncode == 0, chat.stderr
    prompts = [
        int(line.split("prompt ")[1].split()[0]) for line in chat.stderr.splitlines() if "via llmosd" in line
    ]
    assert len(prompts) == 2 and prompts[1] > prompts[0]  # the second turn carries the first
    down = _llmosctl("status", "--address", "unix:path=/nonexistent/bus")
    assert down.returncode == 1 and down.stderr.startswith("llmosctl: error: cannot connect")
    assert "Traceback" not in down.stderr


def _interrupt_after_first_output(proc: subprocess.Popen[str]) -> None:
    """Wait for the answer to start streaming, then press Ctrl-C (SIGINT), as a user would."""
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    assert first, "no answer started streaming"
    proc.send_signal(signal.SIGINT)


def test_llmosctl_ctrl_c_stops_the_answer_in_one_line_and_chat_goes_on(
    bus: PrivateBus, daemon: Daemon
) -> None:
    cmd = [sys.executable, "-m", "system_services.cli"]
    root = Path(__file__).parent.parent
    gen = subprocess.Popen(
        [*cmd, "generate", "--address", bus.address, "--max-tokens", "3500", "Tell me a long story"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    _interrupt_after_first_output(gen)
    _, err = gen.communicate(timeout=60)
    assert gen.returncode == 130 and err == "llmosctl: error: interrupted\n", err

    chat = subprocess.Popen(
        [*cmd, "chat", "--address", bus.address, "--max-tokens", "3500"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    assert chat.stdin is not None
    chat.stdin.write("Tell me a long story\n")
    chat.stdin.flush()
    _interrupt_after_first_output(chat)
    time.sleep(0.5)
    _, err = chat.communicate("/reset\nSay hi\n", timeout=120)
    assert chat.returncode == 0, err
    assert "(answer interrupted)" in err and "Traceback" not in err and "RuntimeError" not in err, err
    assert sum("via llmosd" in line for line in err.splitlines()) == 1  # the next question was answered
    with LLMClient.connect(address=bus.address) as llm:
        assert llm.status()["active_requests"] == 0  # the interrupted answers were cancelled


def test_llmosctl_refuses_options_that_mean_nothing_through_the_daemon(
    bus: PrivateBus, daemon: Daemon
) -> None:
    other = _llmosctl("generate", "--address", bus.address, "-m", "NoSuchModel", "Hi")
    assert other.returncode == 2 and "llmosd serves" in other.stderr and "NoSuchModel" in other.stderr
    raw = _llmosctl("generate", "--raw", "--address", bus.address, "Hi")
    assert raw.returncode == 2 and "--raw runs the model in this process" in raw.stderr
    assert "usage: llmosctl generate" in _llmosctl("generate", "--bogus", "Hi").stderr
    local = _llmosctl("status", "--local")
    assert local.returncode == 2 and "unrecognized arguments: --local" in local.stderr
    version = _llmosctl("--version")
    assert version.returncode == 0 and version.stdout.startswith("llmosctl ")
    status = _llmosctl("status", "--address", bus.address)
    assert status.returncode == 0 and "{" not in status.stdout and "[" not in status.stdout, status.stdout


def test_breaking_out_of_a_stream_cancels_it_and_frees_the_session(bus: PrivateBus, daemon: Daemon) -> None:
    with LLMClient.connect(address=bus.address) as llm:
        chat = llm.create_session()
        for _ in chat.stream("Tell me a long story", max_tokens=3000, ignore_eos=True):
            break
        assert chat.last_stats["error_name"] == "org.llmos.Error.Cancelled"  # Cancel reached llmosd
        assert chat.prompt("Hi", max_tokens=3).stats["tokens_out"] <= 3  # not Busy
        assert llm.status()["active_requests"] == 0


def test_the_client_library_blocking_api(bus: PrivateBus, daemon: Daemon) -> None:
    with LLMClient.connect(address=bus.address) as llm:
        assert llm.status()["state"] == "ready"
        assert llm.count_tokens("hello world") >= 2
        answer = llm.generate("Hi", max_tokens=5, ignore_eos=True)
        assert answer.stats["tokens_out"] == 5
        chat = llm.create_session(system_prompt="Be brief.")
        pieces = list(chat.stream("Tell me something", max_tokens=12, ignore_eos=True))
        assert "".join(pieces) and chat.last_stats["tokens_out"] == 12
        twin = chat.clone()
        assert twin.prompt("And more?", max_tokens=3).stats["tokens_in"] > chat.last_stats["tokens_in"]
        with pytest.raises(ServiceError) as bad:
            llm.generate("Hi", max_tokens=10**6)
        assert bad.value.name == "org.llmos.Error.InvalidArgument"
        chat.close()
        with pytest.raises(ServiceError):
            chat.prompt("gone?")


def test_systemd_notify_ready_watchdog_during_generation_and_stopping(tmp_path: Path, store: Path) -> None:
    """A real notify socket (what systemd gives a Type=dbus/notify service): READY=1 once the name is
    owned, WATCHDOG=1 at half of WATCHDOG_USEC even while the engine is busy generating, STOPPING=1."""
    own_bus = PrivateBus(tmp_path)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(10)
    received: list[tuple[float, str]] = []

    def listen() -> None:
        with contextlib.suppress(OSError):
            while True:
                received.append((time.monotonic(), sock.recv(4096).decode()))

    threading.Thread(target=listen, daemon=True).start()
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
    try:
        d = own_daemon(own_bus.address, store, env=env)
        assert wait_until(lambda: any(m == "READY=1" for _, m in received), 10)
        busy_from = time.monotonic()
        out = client(own_bus.address, "generate", "Go", json.dumps({"max_tokens": 4000, "ignore_eos": True}))
        busy_to = time.monotonic()
        assert out["stats"]["tokens_out"] == 4000
        pings = [t for t, m in received if m == "WATCHDOG=1" and busy_from <= t <= busy_to]
        assert busy_to - busy_from > 0.3 and len(pings) >= (busy_to - busy_from) / 0.1 * 0.5, pings
        assert max(b - a for a, b in zip([busy_from, *pings], [*pings, busy_to], strict=True)) < 0.5
        assert d.stop() == 0
        assert wait_until(lambda: any(m == "STOPPING=1" for _, m in received), 10)
    finally:
        stop_own(own_bus)
        sock.close()


def test_configuration_file_is_validated_and_applied(tmp_path: Path, store: Path) -> None:
    own_bus = PrivateBus(tmp_path)
    try:
        bad = tmp_path / "bad.toml"
        bad.write_text("[limits]\nmax_tokens = -3\nsurprise = 1\n")
        with pytest.raises(RuntimeError) as failed:
            Daemon(own_bus.address, store, "--config", str(bad))
        log = str(failed.value)
        assert "invalid configuration" in log and "max_tokens" in log and "surprise" in log
        assert "Traceback" not in log
        good = tmp_path / "good.toml"
        good.write_text("[limits]\nmax_tokens = 50\ndefault_max_tokens = 7\n")
        d = own_daemon(own_bus.address, store, "--config", str(good))
        over = client(own_bus.address, "generate", "Hi", json.dumps({"max_tokens": 51}))
        assert over["error"] == "org.llmos.Error.InvalidArgument" and "limit of 50" in over["message"]
        default = client(own_bus.address, "generate", "Hi", json.dumps({"ignore_eos": True}))
        assert default["stats"]["tokens_out"] == 7
        assert d.stop() == 0
    finally:
        stop_own(own_bus)


def test_a_caller_leaving_mid_generate_cancels_its_work(bus: PrivateBus, daemon: Daemon) -> None:
    caller = start_client(bus.address, "generate", "Go", json.dumps({"max_tokens": 4000, "ignore_eos": True}))
    assert wait_until(lambda: client(bus.address, "status")["active_requests"] >= 1)
    caller.kill()
    caller.wait()
    assert wait_until(lambda: client(bus.address, "status")["active_requests"] == 0, 10)
    assert client(bus.address, "status")["kv_bytes"] == 0


def test_closing_a_session_mid_stream_ends_its_request_with_a_cancelled_response(
    bus: PrivateBus, daemon: Daemon
) -> None:
    out = client(
        bus.address, "stream", "closing", json.dumps({"max_tokens": 4000, "ignore_eos": True}), "0", "0", "3"
    )
    assert out["code"] == 1, out
    assert out["results"]["error_name"] == "org.llmos.Error.Cancelled"
    assert wait_until(lambda: client(bus.address, "status")["active_requests"] == 0, 10)


def test_sessions_are_attributed_to_the_calling_app(bus: PrivateBus, daemon: Daemon) -> None:
    """The daemon asks the bus for the caller's credentials and names its app (here, not sandboxed, after
    the script its interpreter runs), so status can say which app holds what."""
    owner = start_client(bus.address, "hold-session")
    try:
        read_json(owner)
        by_app = client(bus.address, "status")["sessions_by_app"]
        exe = "bus_client.py"  # a Python program is named after its script, not "python3.11"
        assert by_app == {exe: 1}, by_app
        listed = _llmosctl("sessions", "--address", bus.address)
        assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("1 session(s)")
        assert listed.stdout.splitlines()[1].split() == [exe, "1"]
    finally:
        owner.communicate("", timeout=30)
    assert any("session for" in line and "uid" in line for line in daemon.log)


def test_a_daemon_the_bus_will_not_let_own_the_name_says_so_and_exits(tmp_path: Path, store: Path) -> None:
    strict = PrivateBus(tmp_path, allow_own=False)
    try:
        with pytest.raises(RuntimeError) as failed:
            Daemon(strict.address, store)
        assert "not allowed to own org.llmos.LLM1" in str(failed.value)
        assert "Traceback" not in str(failed.value)
    finally:
        strict.stop()


def test_admin_reload_config_applies_limits_and_reports_engine_changes(tmp_path: Path, store: Path) -> None:
    own_bus = PrivateBus(tmp_path)
    conf = tmp_path / "llmosd.toml"
    conf.write_text("[limits]\nmax_tokens = 50\n")
    try:
        own_daemon(own_bus.address, store, "--config", str(conf))
        assert client(own_bus.address, "generate", "Hi", json.dumps({"max_tokens": 40}))["stats"]
        conf.write_text(
            "[limits]\nmax_tokens = 30\n[engine]\nthreads = 1\n[arbiter]\nkv_budget_mib = 5\n"
            '[apps."org.example.Reloaded"]\ntokens_per_minute = 1\n'
        )
        done = busctl(
            own_bus.address, "call", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "ReloadConfig"
        )
        assert done.returncode == 0, done.stderr
        assert '"reloaded" b true' in done.stdout and '"engine.threads"' in done.stdout
        assert '"arbiter.kv_budget_mib"' in done.stdout
        app = app_python(tmp_path, "org.example.Reloaded")  # per-app policy applies at once
        assert "stats" in client(own_bus.address, "generate", "Hi", json.dumps({"max_tokens": 3}), app=app)
        over_quota = client(own_bus.address, "generate", "Hi", json.dumps({"max_tokens": 3}), app=app)
        assert over_quota["error"] == "org.llmos.Error.QuotaExceeded"
        over = client(own_bus.address, "generate", "Hi", json.dumps({"max_tokens": 40}))
        assert over["error"] == "org.llmos.Error.InvalidArgument" and "limit of 30" in over["message"]
        conf.write_text("[limits]\nmax_tokens = 'lots'\n")
        bad = busctl(
            own_bus.address, "call", "org.llmos.LLM1", "/org/llmos/LLM1", "org.llmos.LLM1", "ReloadConfig"
        )
        assert bad.returncode != 0 and "invalid configuration" in bad.stderr
        still = client(own_bus.address, "generate", "Hi", json.dumps({"max_tokens": 40}))
        assert "limit of 30" in still["message"]  # a bad file leaves the working configuration in place
    finally:
        stop_own(own_bus)


def test_admin_import_model_into_the_daemons_store(
    bus: PrivateBus, daemon: Daemon, tmp_path: Path, store: Path
) -> None:
    gguf = write_random_gguf(tmp_path / "other.gguf", weight_type="Q8_0", seed=9)
    done = busctl(
        bus.address,
        "call",
        "org.llmos.LLM1",
        "/org/llmos/LLM1",
        "org.llmos.LLM1",
        "ImportModel",
        "sa{sv}",
        str(gguf),
        "2",
        "name",
        "s",
        "other",
        "precision",
        "s",
        "int8",
    )
    assert done.returncode == 0, done.stderr
    model_dir = Path(done.stdout.split('"')[1])
    assert model_dir == store / "other--int8" and (model_dir / "manifest.json").is_file()
    for args, message in (
        (["relative.gguf", "0"], "absolute"),
        ([str(tmp_path / "missing.gguf"), "0"], "no such model file"),
        ([str(gguf), "1", "colour", "s", "blue"], "ImportModel takes"),
    ):
        bad = busctl(
            bus.address,
            "call",
            "org.llmos.LLM1",
            "/org/llmos/LLM1",
            "org.llmos.LLM1",
            "ImportModel",
            "sa{sv}",
            *args,
        )
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr


def test_admin_methods_refuse_an_unprivileged_caller(store: Path) -> None:
    """nobody has neither root nor a polkit grant: AccessDenied, naming the polkit action."""
    if os.getuid() != 0:
        pytest.skip("running a caller as another user (setpriv) needs root")
    shared = Path(tempfile.mkdtemp(prefix="llmos-admin-"))
    shared.chmod(0o755)  # the unprivileged caller must reach the bus socket
    own_bus = PrivateBus(shared)

    def as_nobody(*call: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "busctl",
                f"--address={own_bus.address}",
                "call",
                "org.llmos.LLM1",
                "/org/llmos/LLM1",
                "org.llmos.LLM1",
                *call,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        own_daemon(own_bus.address, store)
        for call, action in (
            (["ReloadConfig"], "org.llmos.config-reload"),
            (["ImportModel", "sa{sv}", "/tmp/x.gguf", "0"], "org.llmos.model-import"),
        ):
            out = as_nobody(*call)
            assert out.returncode != 0 and action in out.stderr, out.stderr
        # the same caller may still use the model: only admin methods are guarded
        out = as_nobody("CountTokens", "s", "hello")
        assert out.returncode == 0 and out.stdout.startswith("u "), out.stderr
    finally:
        stop_own(own_bus)
        shutil.rmtree(shared, ignore_errors=True)
