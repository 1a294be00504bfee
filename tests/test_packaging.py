"""The files in packaging/, checked by the real tools an administrator's system uses, no mocks.

- llmosd.service: `systemd-analyze verify` without a single warning and `systemd-analyze security`
  exposure at most 2.0; onnxruntime still runs a model with W^X enforced (MemoryDenyWriteExecute=).
- dbus/org.llmos.LLM1.conf and .service: a real dbus-daemon, configured like the system bus (the stock
  system.conf minus the parts that need the real machine) and loading a verbatim copy of packaging/dbus/,
  with clients running as the users `llmos` and `nobody` (setpriv) proving who may own the name, call
  the service and be called back.
- polkit/org.llmos.policy: parsed, and when polkitd is installed, loaded by a real polkitd (in a
  private mount namespace, so the host's /usr/share/polkit-1/actions is left alone) and asked by
  pkaction and pkcheck.
- llmos.sysusers.conf and llmos.tmpfiles.conf: systemd-sysusers and systemd-tmpfiles on a temp root.

The bus tests need the `llmos` user; they create it exactly as a package would (`systemd-sysusers` with
the packaged file, idempotent), so they run as root (CI does) and are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "llmosd.service"
BUS_POLICY = PACKAGING / "dbus" / "org.llmos.LLM1.conf"
ACTIVATION = PACKAGING / "dbus" / "org.llmos.LLM1.service"
SYSUSERS = PACKAGING / "llmos.sysusers.conf"
TMPFILES = PACKAGING / "llmos.tmpfiles.conf"
POLKIT = PACKAGING / "polkit" / "org.llmos.policy"
EXEC_START = "ExecStart=/usr/bin/llmosd --system"
NAME = "org.llmos.LLM1"
# The interfaces every user may call on the service (the bus policy's default context).
PUBLIC_INTERFACES = (
    "org.llmos.LLM1",
    "org.llmos.Session1",
    "org.llmos.Request1",
    "org.llmos.Agent1",
)
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)  # type: ignore[call-overload]


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/lib/polkit-1/{name}" if name == "polkitd" else None)
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` → values, in order (systemd allows a key more than once), comments dropped."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


# ---------------------------------------------------------------------------------------------------------
# The systemd unit
# ---------------------------------------------------------------------------------------------------------


def unit_with_stand_in(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names an executable that exists; every other line identical.

    /usr/bin/llmosd is not installed on a build machine, and `systemd-analyze verify` rightly reports
    that; the stand-in (a copy of `true`, named llmosd) lets it check everything else.
    """
    stand_in = tmp_path / "bin" / "llmosd"
    stand_in.parent.mkdir()
    shutil.copy(tool("true"), stand_in)
    original = UNIT.read_text().splitlines(keepends=True)
    assert sum(line.rstrip("\n") == EXEC_START for line in original) == 1, "exactly one ExecStart line"
    copy = [
        f"ExecStart={stand_in} --system\n" if line.rstrip("\n") == EXEC_START else line for line in original
    ]
    changed = [(a, b) for a, b in zip(original, copy, strict=True) if a != b]
    assert changed == [(EXEC_START + "\n", f"ExecStart={stand_in} --system\n")]
    unit_dir = tmp_path / "unit"
    unit_dir.mkdir()
    (unit_dir / UNIT.name).write_text("".join(copy))
    return unit_dir / UNIT.name


def test_unit_verifies_without_a_single_warning(tmp_path: Path) -> None:
    sa = tool("systemd-analyze")
    r = run([sa, "verify", "--man=no", str(unit_with_stand_in(tmp_path))])
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    if not Path("/usr/bin/llmosd").exists():
        # The packaged unit itself: its only complaint is the binary this machine has not installed.
        r = run([sa, "verify", "--man=no", str(UNIT)])
        lines = r.stderr.splitlines()
        assert lines, "systemd-analyze verify should notice that /usr/bin/llmosd is missing"
        assert all("/usr/bin/llmosd" in line for line in lines), r.stderr


def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    sa = tool("systemd-analyze")
    unit = unit_with_stand_in(tmp_path)
    r = run([sa, "security", "--offline=yes", str(unit)])
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for llmosd\.service: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout
    open_items = "\n".join(line for line in r.stdout.splitlines() if line.startswith("✗"))
    assert float(m.group(1)) <= 2.0, open_items

    r = run([sa, "security", "--offline=yes", "--json=short", str(unit)])
    checks = {c["name"]: c["set"] for c in json.loads(r.stdout)}
    # What systemd itself parsed as in force (names as systemd-analyze security reports them).
    required = [
        "User=/DynamicUser=",
        "NoNewPrivileges=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "ProtectKernelTunables=",
        "ProtectKernelModules=",
        "ProtectKernelLogs=",
        "ProtectControlGroups=",
        "PrivateNetwork=",
        "IPAddressDeny=",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "RestrictNamespaces=~user",
        "LockPersonality=",
        "MemoryDenyWriteExecute=",
        "SystemCallArchitectures=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "UMask=",
        "ProtectHostname=",
        "ProtectClock=",
        "RestrictRealtime=",
        "RestrictSUIDSGID=",
        "RemoveIPC=",
        "NotifyAccess=",
    ]
    assert [name for name in required if not checks.get(name)] == []
    # Deliberately open: hiding /proc would break identifying the calling app, and onnxruntime's CPU
    # detection (see the comments in the unit).
    assert not checks["ProtectProc="]
    assert not checks["ProcSubset="]


def test_unit_runs_the_service_as_the_bus_name_owner() -> None:
    d = unit_directives(UNIT.read_text())
    assert d["Service.ExecStart"] == ["/usr/bin/llmosd --system"]
    assert d["Service.Type"] == ["dbus"]
    assert d["Service.BusName"] == [NAME]
    # A static user: the bus policy grants the name to "llmos" by name; DynamicUser= could not own it.
    assert d["Service.User"] == d["Service.Group"] == ["llmos"]
    assert "Service.DynamicUser" not in d
    assert d["Service.WatchdogSec"] == ["30s"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.Restart"] == ["on-failure"]
    assert d["Service.StateDirectory"] == d["Service.CacheDirectory"] == ["llmos"]
    assert d["Service.ConfigurationDirectory"] == ["llmos"]
    for key in ("Service.ProtectProc", "Service.ProcSubset", "Service.PrivateUsers"):
        assert key not in d, f"{key} hides callers' /proc entries or CPU details from the daemon"


MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, json, mmap, sys
    from pathlib import Path

    if sys.argv[2] == "mdwe":
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            print(json.dumps({"unsupported": ctypes.get_errno()}))
            sys.exit(0)
    try:  # proves W^X is in force: writable+executable memory is refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        wx_refused = False
    except OSError:
        wx_refused = True

    from llmos.engine.llm_engine import LLMEngine
    from llmos.engine.sampling import SamplingParams
    from llmos.model_store import ModelStore
    from llmos.tiny_model import write_random_gguf

    tmp = Path(sys.argv[1])
    tokens = {}
    for weight_type, precision in (("Q4_1", "int4"), ("F32", "fp32")):
        gguf = write_random_gguf(tmp / f"{weight_type}.gguf", arch="llama", weight_type=weight_type,
                                 n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, seed=7)
        model = ModelStore(tmp / "store").import_gguf(gguf, precision=precision)
        engine = LLMEngine(model, threads=2)
        out = engine.generate([1, 40, 77, 120, 9], SamplingParams(max_tokens=12, ignore_eos=True))
        tokens[precision] = out.token_ids
    print(json.dumps({"wx_refused": wx_refused, "tokens": tokens}))
    """
)


def test_onnxruntime_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes must not break inference: same tokens with W^X enforced by the kernel."""
    results = {}
    for mode in ("plain", "mdwe"):
        work = tmp_path / mode
        work.mkdir()
        r = run([sys.executable, "-c", MDWE_PROBE, str(work), mode], cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        results[mode] = json.loads(r.stdout.splitlines()[-1])
    if "unsupported" in results["mdwe"]:
        pytest.skip("this kernel has no prctl(PR_SET_MDWE) (Linux 6.3+), so W^X cannot be enforced here")
    assert results["mdwe"]["wx_refused"], "PR_SET_MDWE did not refuse a writable+executable mapping"
    assert not results["plain"]["wx_refused"]
    assert results["mdwe"]["tokens"] == results["plain"]["tokens"]


# ---------------------------------------------------------------------------------------------------------
# The D-Bus policy and activation file, on a real dbus-daemon configured like the system bus
# ---------------------------------------------------------------------------------------------------------

# One dbus-fast client for every role. argv: own NAME | calls JSON | serve NAME|- PATH IFACE...
# Prints one JSON line per result; `serve` prints {"unique": ...} when ready and runs until stdin closes.
CLIENT = """
import asyncio, json, os, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

ADDRESS = os.environ["LLMOS_TEST_BUS"]


class Echo(ServiceInterface):
    @method()
    def Echo(self, text: "s") -> "s":
        return f"{self.name}:{text}"

    @method()
    def Call(self, tool: "s", args_json: "s") -> "s":
        return json.dumps({"interface": self.name, "tool": tool, "args": json.loads(args_json)})

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "u":
        return 1


def result(reply):
    if reply.message_type == MessageType.ERROR:
        return {"error": reply.error_name, "message": reply.body[0] if reply.body else ""}
    return {"body": reply.body}


def variant(v):  # json.dumps default: a Variant (Properties.Get) as its signature and value
    return {"signature": v.signature, "value": v.value}


async def request_name(bus, name):
    return result(await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="RequestName", signature="su",
        body=[name, 4])))  # 4 = DBUS_NAME_FLAG_DO_NOT_QUEUE


async def main(cmd, *args):
    bus = await MessageBus(bus_address=ADDRESS).connect()
    if cmd == "own":
        print(json.dumps(await request_name(bus, args[0]), default=variant))
    elif cmd == "calls":
        for dest, path, iface, member, sig, body in json.loads(args[0]):
            reply = await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                                           signature=sig, body=body))
            print(json.dumps(result(reply), default=variant), flush=True)
    elif cmd == "serve":
        name, path, *ifaces = args
        for iface in ifaces:
            bus.export(path, Echo(iface))
        owned = await request_name(bus, name) if name != "-" else None
        print(json.dumps({"unique": bus.unique_name, "owned": owned}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    bus.disconnect()


asyncio.run(main(*sys.argv[1:]))
"""


@dataclass
class Bus:
    address: str
    dir: Path  # world-readable: the socket, the client, the copies of packaging/dbus/
    stderr: Path
    python: str
    env: dict[str, str]

    def argv(self, user: str, argv: list[str]) -> list[str]:
        """`argv` run as `user` (setpriv, with no supplementary groups); root runs it directly."""
        if user == "root":
            return argv
        pw = pwd.getpwnam(user)
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv]

    def client(self, user: str, *args: str) -> list[dict[str, object]]:
        r = run(self.argv(user, [self.python, str(self.dir / "client.py"), *args]), env=self.env, cwd="/")
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    def calls(
        self, user: str, *calls: tuple[str, str, str, str, str, list[object]]
    ) -> list[dict[str, object]]:
        return self.client(user, "calls", json.dumps(calls))


@pytest.fixture(scope="module")
def llmos_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("creating the llmos system user needs root")
    r = run([tool("systemd-sysusers"), str(SYSUSERS)])  # what the package's postinst does; idempotent
    assert r.returncode == 0, r.stderr
    return pwd.getpwnam("llmos")


@pytest.fixture(scope="module")
def world_dir() -> Iterator[Path]:
    """A directory the users llmos and nobody can reach (pytest's tmp_path is inside root's 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="llmos-packaging-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def system_like_config(dbus_dir: Path, socket: Path) -> str:
    """The stock system.conf minus what needs the real machine, with packaging/dbus/ as policy and services.

    Dropped: <user> (it stays the user running the tests instead of switching to messagebus), <fork/>,
    <syslog/> (errors go to stderr, which the tests read), <servicehelper> and <pidfile>, the host's
    <listen>, service dirs, includes and include dirs (only the packaged files, plus polkitd's own
    policy, shall be loaded).
    """
    root = ET.parse("/usr/share/dbus-1/system.conf").getroot()
    assert root.findtext("type") == "system"
    dropped = (
        "user",
        "fork",
        "syslog",
        "servicehelper",
        "pidfile",
        "listen",
        "standard_system_servicedirs",
        "servicedir",
        "include",
        "includedir",
    )
    for tag in dropped:
        for el in root.findall(tag):
            root.remove(el)
    for tag, text, attrs in (
        ("listen", f"unix:path={socket}", {}),
        ("servicedir", str(dbus_dir), {}),
        ("include", "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf", {"ignore_missing": "yes"}),
        ("includedir", str(dbus_dir), {}),  # last, like system.d in the stock file: it punches the holes
    ):
        ET.SubElement(root, tag, attrs).text = text
    return (
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        + ET.tostring(root, encoding="unicode")
    )


def client_python(env: dict[str, str]) -> str:
    """An interpreter that the user nobody can run and that imports dbus_fast (from this venv).

    This venv's interpreter may live under root's 0700 home; the system python3 with the venv's
    site-packages on PYTHONPATH (dbus-fast falls back to pure Python if its compiled parts do not fit)
    is the second choice.
    """
    nobody = pwd.getpwnam("nobody")
    tried = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        setpriv = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        r = run([*setpriv, python, "-c", "import dbus_fast"], env=env, cwd="/")
        if r.returncode == 0:
            return python
        tried.append(f"{python}: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    pytest.skip(f"no Python interpreter that uid nobody can run imports dbus_fast: {tried}")


@pytest.fixture(scope="module")
def bus(llmos_user: pwd.struct_passwd, world_dir: Path) -> Iterator[Bus]:
    dbus_daemon = tool("dbus-daemon")
    tool("setpriv")
    dbus_dir = world_dir / "dbus"
    shutil.copytree(PACKAGING / "dbus", dbus_dir)
    for f in (BUS_POLICY, ACTIVATION):
        assert (dbus_dir / f.name).read_bytes() == f.read_bytes()
    config = world_dir / "system-like.conf"
    config.write_text(system_like_config(dbus_dir, world_dir / "bus"))
    (world_dir / "client.py").write_text(CLIENT)
    (world_dir / "client.py").chmod(0o644)
    stderr = world_dir / "dbus-daemon.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [dbus_daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        address = proc.stdout.readline().strip() if proc.stdout else ""  # first line: it is listening
        assert address.startswith("unix:path="), stderr.read_text()
        import dbus_fast

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/",
            "LLMOS_TEST_BUS": address,
            "DBUS_SYSTEM_BUS_ADDRESS": address,
            "PYTHONPATH": str(Path(dbus_fast.__file__).parent.parent),
        }
        yield Bus(address, world_dir, stderr, client_python(env), env)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def service(bus: Bus) -> Iterator[dict[str, object]]:
    """A stand-in llmosd: runs as llmos, owns org.llmos.LLM1, exports the public interfaces and one that
    the policy does not open (org.llmos.Internal1) at /org/llmos/LLM1."""
    with serving(bus, "llmos", NAME, "/org/llmos/LLM1", *PUBLIC_INTERFACES, "org.llmos.Internal1") as ready:
        assert ready["owned"] == {"body": [1]}, ready  # 1 = DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
        yield ready


class serving:
    """Context manager: `client.py serve` as `user` until the block ends."""

    def __init__(self, bus: Bus, user: str, name: str, path: str, *ifaces: str) -> None:
        argv = bus.argv(user, [bus.python, str(bus.dir / "client.py"), "serve", name, path, *ifaces])
        self.proc = subprocess.Popen(
            argv,
            env=bus.env,
            cwd="/",
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def __enter__(self) -> dict[str, object]:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(self.proc.stderr.read() if self.proc.stderr else "serve exited")
        return json.loads(line)

    def __exit__(self, *exc: object) -> None:
        try:
            self.proc.communicate(timeout=10)  # closes stdin: the server disconnects and exits
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_bus_loads_the_packaged_policy_and_activation_file_without_errors(bus: Bus) -> None:
    # dbus-daemon does not refuse to start over a bad file in an <includedir>: it logs "Encountered
    # error ... while parsing" and ignores the file. So its stderr is the place to look.
    log = bus.stderr.read_text()
    assert "Encountered error" not in log, log
    assert str(bus.dir / "dbus") not in log, log
    method = "--method=org.freedesktop.DBus.ListActivatableNames"
    gdbus = [tool("gdbus"), "call", f"--address={bus.address}", "--dest=org.freedesktop.DBus"]
    r = run(bus.argv("nobody", [*gdbus, "--object-path=/org/freedesktop/DBus", method]), cwd="/")
    assert r.returncode == 0, r.stderr
    assert f"'{NAME}'" in r.stdout, r.stdout


@pytest.mark.parametrize(("user", "may_own"), [("llmos", True), ("nobody", False), ("root", False)])
def test_only_the_llmos_user_may_own_the_name(bus: Bus, user: str, may_own: bool) -> None:
    [got] = bus.client(user, "own", NAME)
    if may_own:
        assert got == {"body": [1]}  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
    else:  # not even root may pose as llmosd
        assert got["error"] == ACCESS_DENIED, got


def test_any_user_may_call_the_service_on_its_interfaces_only(bus: Bus, service: dict[str, object]) -> None:
    path = "/org/llmos/LLM1"
    calls = [(NAME, path, iface, "Echo", "s", ["hi"]) for iface in PUBLIC_INTERFACES]
    calls += [
        (NAME, path, "org.freedesktop.DBus.Properties", "Get", "ss", ["org.llmos.LLM1", "Version"]),
        (NAME, path, "org.freedesktop.DBus.Peer", "Ping", "", []),
        (NAME, path, "org.llmos.Internal1", "Echo", "s", ["hi"]),
    ]
    got = bus.calls("nobody", *calls)
    assert got[: len(PUBLIC_INTERFACES)] == [{"body": [f"{iface}:hi"]} for iface in PUBLIC_INTERFACES]
    assert got[len(PUBLIC_INTERFACES)] == {"body": [{"signature": "u", "value": 1}]}  # Version property
    assert got[-2] == {"body": []}
    assert got[-1]["error"] == ACCESS_DENIED, got[-1]  # an interface the policy does not open

    # A generic client an administrator would use, as nobody: busctl, including introspection.
    busctl = [tool("busctl"), f"--address={bus.address}"]
    echo = [*busctl, "call", NAME, path, "org.llmos.LLM1", "Echo", "s", "from busctl"]
    r = run(bus.argv("nobody", echo), cwd="/")
    assert (r.returncode, r.stdout.strip()) == (0, 's "org.llmos.LLM1:from busctl"'), r.stderr
    r = run(bus.argv("nobody", [*busctl, "introspect", NAME, path]), cwd="/")
    assert r.returncode == 0, r.stderr
    assert "org.llmos.Session1" in r.stdout


def test_the_service_user_may_call_back_tool_providers_in_apps(bus: Bus, service: dict[str, object]) -> None:
    # An app (uid nobody, no well-known name) that implements org.llmos.ToolProvider1 and another interface.
    with serving(
        bus, "nobody", "-", "/app/tools", "org.llmos.ToolProvider1", "org.example.AppPrivate1"
    ) as app:
        unique = str(app["unique"])
        call = (unique, "/app/tools", "org.llmos.ToolProvider1", "Call", "ss", ["clock", '{"tz": "UTC"}'])
        private = (unique, "/app/tools", "org.example.AppPrivate1", "Echo", "s", ["hi"])
        as_llmos = bus.calls("llmos", call, private)
        assert json.loads(str(as_llmos[0]["body"][0])) == {  # type: ignore[index]
            "interface": "org.llmos.ToolProvider1",
            "tool": "clock",
            "args": {"tz": "UTC"},
        }
        assert as_llmos[1]["error"] == ACCESS_DENIED  # the daemon may call back tool providers, nothing else
        as_other_app = bus.calls("nobody", call)  # the hole is for the service user only
        assert as_other_app[0]["error"] == ACCESS_DENIED


def test_a_call_while_llmosd_is_not_running_asks_for_activation(bus: Bus) -> None:
    # On a system with systemd the bus starts llmosd.service (SystemdService=); this bus has no systemd,
    # so it runs the fallback Exec=/bin/false, which fails at once instead of leaving the caller hanging.
    t0 = time.monotonic()
    [got] = bus.calls("nobody", (NAME, "/org/llmos/LLM1", "org.freedesktop.DBus.Peer", "Ping", "", []))
    assert got["error"] == "org.freedesktop.DBus.Error.Spawn.ChildExited", got
    assert time.monotonic() - t0 < 10
    assert f"Activating service name='{NAME}'" in bus.stderr.read_text()


def test_activation_file_starts_the_packaged_unit() -> None:
    lines = [line for line in ACTIVATION.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "[D-BUS Service]"
    entries = dict(line.split("=", 1) for line in lines[1:])
    assert entries == {"Name": NAME, "Exec": "/bin/false", "User": "llmos", "SystemdService": UNIT.name}
    assert ACTIVATION.name == f"{NAME}.service"  # the system bus only accepts a file named after the name
    d = unit_directives(UNIT.read_text())
    assert d["Service.BusName"] == [entries["Name"]] and d["Service.User"] == [entries["User"]]


# ---------------------------------------------------------------------------------------------------------
# polkit
# ---------------------------------------------------------------------------------------------------------

ACTIONS = ("org.llmos.model-import", "org.llmos.config-reload")


def test_polkit_actions_are_admin_only_and_owned_by_the_service_user() -> None:
    text = POLKIT.read_text()
    assert "-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN" in text
    root = ET.fromstring(text)
    assert root.tag == "policyconfig"
    actions = {a.get("id"): a for a in root.findall("action")}
    assert sorted(actions) == sorted(ACTIONS)
    for action in actions.values():
        assert action.findtext("description") and action.findtext("message")
        defaults = {d.tag: d.text for d in action.findall("defaults/*")}
        assert defaults == {
            "allow_any": "auth_admin",
            "allow_inactive": "auth_admin",
            "allow_active": "auth_admin_keep",
        }
        owner = {a.get("key"): a.text for a in action.findall("annotate")}
        assert owner == {"org.freedesktop.policykit.owner": "unix-user:llmos"}


def test_polkitd_loads_the_actions_and_answers_the_service_user(bus: Bus) -> None:
    polkitd, pkaction, pkcheck = tool("polkitd"), tool("pkaction"), tool("pkcheck")
    unshare = tool("unshare")
    actions = bus.dir / "polkit-actions"
    actions.mkdir()
    shutil.copy(POLKIT, actions / POLKIT.name)
    # Control: the same actions under other ids WITHOUT the owner annotation.
    control = re.sub(
        r"\s*<annotate key=\"org.freedesktop.policykit.owner\">[^<]*</annotate>", "", POLKIT.read_text()
    ).replace('id="org.llmos.', 'id="org.llmos.unowned.')
    (actions / "org.llmos.unowned.policy").write_text(control)
    for f in (actions, *actions.iterdir()):
        f.chmod(0o755 if f.is_dir() else 0o644)
    # polkitd reads /usr/share/polkit-1/actions only: give it ours in a private mount namespace.
    script = 'mount --bind "$1" /usr/share/polkit-1/actions && exec "$2" --no-debug'
    proc = subprocess.Popen(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(actions), polkitd],
        env=bus.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    subjects: list[subprocess.Popen[str]] = []
    try:
        deadline = time.monotonic() + 15
        while True:  # until polkitd owns its name and answers
            r = run([pkaction], env=bus.env)
            if r.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.2)
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            if "mount" in err or "unshare" in err:
                pytest.skip(f"no private mount namespace for polkitd here: {err.strip()}")
            raise AssertionError(f"polkitd exited: {err}")
        unowned = [a.replace("llmos.", "llmos.unowned.") for a in ACTIONS]
        assert sorted(r.stdout.split()) == sorted([*ACTIONS, *unowned]), r.stderr
        for action in ACTIONS:
            r = run([pkaction, "--action-id", action, "--verbose"], env=bus.env)
            assert r.returncode == 0, r.stderr
            assert re.search(r"implicit any:\s+auth_admin\n", r.stdout)
            assert re.search(r"implicit inactive:\s+auth_admin\n", r.stdout)
            assert re.search(r"implicit active:\s+auth_admin_keep\n", r.stdout)
            assert "org.freedesktop.policykit.owner -> unix-user:llmos" in r.stdout

        # A user's process (an app asking to import a model), and the daemon (uid llmos) asking about it.
        app = subprocess.Popen(bus.argv("nobody", ["sleep", "60"]))
        daemon = subprocess.Popen(bus.argv("llmos", ["sleep", "60"]))
        subjects += [app, daemon]
        time.sleep(0.2)
        for action in ACTIONS:
            r = run(
                bus.argv("llmos", [pkcheck, "--action-id", action, "--process", str(app.pid)]), env=bus.env
            )
            # 2: not authorized yet, an administrator's password would do (auth_admin). A real answer.
            assert r.returncode == 2, r.stderr
            assert "requires authentication" in r.stderr
            unowned = action.replace("llmos.", "llmos.unowned.")
            r = run(
                bus.argv("llmos", [pkcheck, "--action-id", unowned, "--process", str(app.pid)]), env=bus.env
            )
            assert r.returncode == 127 and "Only trusted callers" in r.stderr, r.stderr
            # And an ordinary user may not ask about the daemon's (or anyone else's) processes.
            r = run(
                bus.argv("nobody", [pkcheck, "--action-id", action, "--process", str(daemon.pid)]),
                env=bus.env,
            )
            assert r.returncode == 127 and "Only trusted callers" in r.stderr, r.stderr
    finally:
        for p in (*subjects, proc):
            p.terminate()
            p.wait(timeout=10)


# ---------------------------------------------------------------------------------------------------------
# sysusers.d and tmpfiles.d
# ---------------------------------------------------------------------------------------------------------


def test_sysusers_creates_a_system_user_without_login(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    r = run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])
    assert r.returncode == 0, r.stderr
    passwd = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()]
    group = [line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()]
    [(name, _, uid, gid, _gecos, home, shell)] = passwd
    assert (name, home, shell) == ("llmos", "/", "/usr/sbin/nologin")
    assert 0 < int(uid) < 1000, "a system user"
    assert group == [["llmos", "x", gid, ""]]

    def contents() -> dict[str, bytes]:  # the shadow files are mode 0000: only root reads them
        return {p.name: p.read_bytes() for p in (tmp_path / "etc").iterdir() if os.access(p, os.R_OK)}

    before = contents()
    r = run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])  # a package upgrade runs it again
    assert r.returncode == 0, r.stderr
    assert contents() == before


def test_tmpfiles_creates_the_service_directories_with_the_units_modes(tmp_path: Path) -> None:
    tmpfiles, sysusers = tool("systemd-tmpfiles"), tool("systemd-sysusers")
    if os.geteuid() != 0:
        pytest.skip("giving the directories to the llmos user (chown) needs root")
    (tmp_path / "etc").mkdir()
    # Order matters in a package's postinst: the user first, else tmpfiles cannot resolve "llmos".
    r = run([tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert r.returncode != 0 and "Failed to resolve user 'llmos'" in r.stderr, r.stderr
    assert run([sysusers, f"--root={tmp_path}", str(SYSUSERS)]).returncode == 0
    r = run([tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    uid = gid = next(int(line.split(":")[2]) for line in (tmp_path / "etc/passwd").read_text().splitlines())

    d = unit_directives(UNIT.read_text())
    mode = {
        key: int(d[f"Service.{key}Mode"][0], 8)
        for key in ("StateDirectory", "CacheDirectory", "ConfigurationDirectory")
    }
    want = {
        "etc/llmos": (mode["ConfigurationDirectory"], 0, 0),
        "var/lib/llmos": (mode["StateDirectory"], uid, gid),
        "var/lib/llmos/models": (0o700, uid, gid),
        "var/lib/llmos/jobs": (0o700, uid, gid),
        "var/lib/llmos/swap": (0o700, uid, gid),
        "var/cache/llmos": (mode["CacheDirectory"], uid, gid),
    }
    for rel, expected in want.items():
        st = (tmp_path / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == expected, rel
    # The model store the service is pointed at is one of them.
    env = dict(e.split("=", 1) for e in " ".join(d["Service.Environment"]).split())
    assert (tmp_path / env["LLMOS_MODEL_DIR"].lstrip("/")).is_dir()
    assert (tmp_path / env["LLMOS_CACHE_DIR"].lstrip("/")).is_dir()


def test_readme_says_where_every_packaged_file_installs() -> None:
    readme = (PACKAGING / "README.md").read_text()
    files = [p for p in PACKAGING.rglob("*") if p.is_file() and p.name != "README.md"]
    assert files
    for f in files:
        assert str(f.relative_to(PACKAGING)) in readme, f


def test_http_socket_unit_verifies_and_is_loopback_only(tmp_path: Path) -> None:
    sa = tool("systemd-analyze")
    unit = unit_with_stand_in(tmp_path)
    sock = unit.parent / "llmosd.socket"
    sock.write_text((PACKAGING / "llmosd.socket").read_text())
    r = run([sa, "verify", "--man=no", str(sock)])
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    d = unit_directives(sock.read_text())
    assert all(a.startswith(("127.", "[::1]")) for a in d["Socket.ListenStream"])
    assert d["Socket.IPAddressDeny"] == ["any"] and d["Socket.IPAddressAllow"] == ["localhost"]
    assert unit_directives(UNIT.read_text())["Service.PrivateNetwork"] == ["yes"]
