"""Agent plugins: discovery under `llmos.agents`, the built-in agents, and a plugin installed as its own
distribution (the example package, built and installed by pip) running through the real service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_harness import REPO, Daemon, PrivateBus, client

from agents.builtin.summarizer import split_text, summary_of
from agents.catalog import AgentCatalog
from agents.tools import argument_problems
from llmos.gguf_file import GGUFFile
from llmos.model_store import ModelStore
from llmos.tokenizer import Tokenizer

EXAMPLE = REPO / "examples" / "llmos-agent-todo"
ADD_TASK = {
    "name": "add_task",
    "description": "Add a task to the user's to-do list.",
    "parameters": {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 120}, "due": {"type": "string"}},
        "required": ["title"],
        "additionalProperties": False,
    },
}


def install(source: Path, target: Path) -> None:
    """pip-install a distribution into `target` (a site directory the daemon gets on PYTHONPATH)."""
    build = target.parent / f"src-{source.name}"
    shutil.copytree(source, build)  # pip builds in the source tree: keep the repository clean
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*pip, "--target", str(target), str(build)],
        check=True,
        capture_output=True,
        timeout=300,
    )


def write_dist(site: Path, name: str, entry_points: str, module: str, code: str) -> None:
    """A minimal installed distribution: dist-info with METADATA and entry_points.txt, and its module."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[llmos.agents]\n{entry_points}\n")
    (site / f"{module}.py").write_text(textwrap.dedent(code))


# -- in process --------------------------------------------------------------------------------------------
def test_the_built_in_agents_are_listed_with_what_they_need() -> None:
    listed = {a["name"]: a for a in AgentCatalog.discover().describe()["agents"]}
    assert listed["assistant"]["tools"] is None and not listed["assistant"]["custom_steps"]
    assert listed["summarizer"]["tools"] == [] and listed["summarizer"]["custom_steps"]
    assert {a["source"] for a in listed.values() if a["name"] in ("assistant", "summarizer")} == {"built-in"}


def test_broken_plugins_are_reported_by_name_and_the_rest_still_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    write_dist(
        site, "crashes", "crash = crashing_plugin:AGENT", "crashing_plugin", "raise RuntimeError('boom')\n"
    )
    write_dist(site, "not-agent", "notagent = not_agent:AGENT", "not_agent", "AGENT = 42")
    write_dist(
        site,
        "renamed",
        "renamed = renamed_plugin:AGENT",
        "renamed_plugin",
        """
        from agents.plugin import AgentPlugin
        AGENT = AgentPlugin(name="other", description="calls itself otherwise")
        """,
    )
    write_dist(
        site,
        "squatter",
        "summarizer = squatter:AGENT",
        "squatter",
        """
        from agents.plugin import AgentPlugin
        AGENT = AgentPlugin(name="summarizer", description="takes a built-in's name")
        """,
    )
    write_dist(
        site,
        "good",
        "greeter = good_plugin:Greeter",
        "good_plugin",
        """
        from agents.plugin import AgentPlugin
        class Greeter(AgentPlugin):
            name = "greeter"
            description = "Says hello."
            tools = ()
        """,
    )
    monkeypatch.syspath_prepend(str(site))
    catalog = AgentCatalog.discover()
    problems = {p.source: p.error for p in catalog.problems}
    assert "RuntimeError: boom" in problems["crashes 1.0"]
    assert "not an agents.plugin.AgentPlugin" in problems["not-agent 1.0"]
    assert "calls itself 'other'" in problems["renamed 1.0"]
    assert "already taken" in problems["squatter 1.0"]
    assert catalog.entries["greeter"].source == "good 1.0"  # a class is instantiated
    assert catalog.entries["summarizer"].source == "built-in"  # the built-in kept its name
    with pytest.raises(Exception, match="no agent named 'crash'"):
        catalog.get("crash")


def test_a_long_text_is_cut_into_parts_that_fit_and_lose_nothing() -> None:
    words = lambda s: len(s.split())  # noqa: E731 - a token counter simple enough to check by eye
    text = "\n\n".join(" ".join(f"w{p}_{i}." for i in range(70)) for p in range(9)) + " " + "x" * 50
    parts = split_text(text, 100, words)
    assert len(parts) > 1 and all(words(p) <= 100 for p in parts)
    assert " ".join(parts).split() == text.split()  # every word, in order
    assert split_text("  ", 100, words) == []


@pytest.mark.parametrize("kind", ["paragraphs", "sentences", "words"])
def test_parts_fit_the_budget_in_the_models_own_tokens(kind: str, default_gguf: Path) -> None:
    tokenizer = Tokenizer.from_gguf(GGUFFile(default_gguf))
    count = lambda s: len(tokenizer.encode(s, parse_special=False))  # noqa: E731
    text = {
        "paragraphs": "\n\n".join(f"Paragraph {i} is short. It ends here." for i in range(2000)),
        "sentences": " ".join(f"Sentence {i} is here." for i in range(4000)),
        "words": " ".join(f"word{i}" for i in range(8000)),
    }[kind]
    parts = split_text(text, 1024, count)
    assert all(count(p) <= 1024 for p in parts)
    assert " ".join(parts).split() == text.split()


def test_a_summary_cut_by_the_token_limit_says_so() -> None:
    assert summary_of('{"summary": "The library opens in spring."}') == "The library opens in spring."
    assert summary_of('{"summary": "The library opens in spr') == "The library opens in spr …"
    assert summary_of('{"summary": "A tab\\') == "A tab …"  # a half-written escape is dropped
    assert summary_of("Free text, unconstrained.") == "Free text, unconstrained."
    assert summary_of('{"summary": "abcdefgh"}', limit=8) == "abcdefgh …"  # closed at its length limit


def test_arguments_an_agent_makes_up_are_checked_before_any_app_sees_them() -> None:
    schema = ADD_TASK["parameters"]
    assert argument_problems(schema, {"title": "Buy milk"}) == []
    assert argument_problems(schema, {"due": "today"}) == ["'title' is missing"]
    assert argument_problems(schema, {"title": 3}) == ["'title' must be string"]
    assert argument_problems(schema, {"title": "x" * 121}) == ["'title' is over 120 characters"]
    assert argument_problems(schema, {"title": "a", "owner": "root"}) == ["'owner' is not a parameter"]
    assert argument_problems(schema, ["title"]) == ["the arguments are not a JSON object"]


# -- through the service -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[PrivateBus]:
    """The real service on the default model, with the example plugin pip-installed as its own
    distribution in a site directory the daemon imports from (as `pip install` next to llmos would)."""
    tmp = tmp_path_factory.mktemp("plugins")
    store = tmp / "store"
    ModelStore(store).import_gguf(default_gguf, make_default=True)
    install(EXAMPLE, tmp / "site")
    write_dist(  # a plugin with a bug: its answer is not text
        tmp / "site",
        "buggy",
        "buggy = buggy_plugin:Buggy",
        "buggy_plugin",
        """
        from agents.plugin import AgentPlugin, Step

        class Buggy(AgentPlugin):
            name = "buggy"
            description = "Answers with a number, which an answer is not."
            tools = ()

            async def steps(self, ctx):
                yield Step(1, answer=42)
        """,
    )
    b = PrivateBus(tmp)
    config = tmp / "llmosd.toml"
    config.write_text(f'state_dir = "{tmp / "state"}"\n[apps.default]\nsystem_tools = []\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp / 'site'}:{REPO}"}
    d = Daemon(b.address, store, "--config", str(config), "--threads", "2", env=env)
    yield b
    d.stop_cleanly()
    b.stop()


def run(bus: PrivateBus, tmp: Path, **setup: object) -> dict:
    path = tmp / f"setup-{len(list(tmp.glob('setup-*')))}.json"
    path.write_text(json.dumps(setup))
    return client(bus.address, "agent-run", str(path), timeout=300)


@pytest.mark.model
def test_a_plugin_installed_as_its_own_distribution_is_listed(bus: PrivateBus) -> None:
    listed = client(bus.address, "list-agents")
    todo = next(a for a in listed["agents"] if a["name"] == "todo")
    assert todo["source"] == "llmos-agent-todo 0.1.0"
    assert todo["tools"] == ["add_task"] and todo["custom_steps"]
    assert listed["problems"] == []


@pytest.mark.model
def test_the_plugin_runs_its_own_steps_and_calls_the_apps_tool(bus: PrivateBus, tmp_path: Path) -> None:
    notes = (
        "Meeting notes, Monday. Anna will send the budget to finance by Friday. "
        "Ben has to book the room for the workshop. Everyone should read the new plan before Tuesday."
    )
    out = run(
        bus,
        tmp_path,
        manifest={"tools": [ADD_TASK]},
        results={"add_task": {"added": True}},
        goal=notes,
        options={"agent": "todo", "temperature": 0.0, "max_tokens": 300},
    )
    assert out["code"] == 0, out
    found, *calls, last = out["steps"]
    assert found["text"].startswith("found ")
    assert len(calls) == len(out["calls"])  # each add_task step reached the app, with checked arguments
    for step, received in zip(calls, out["calls"], strict=True):
        assert step["tool"] == "add_task" and received["arguments"] == step["arguments"]
        assert argument_problems(ADD_TASK["parameters"], step["arguments"]) == []
    assert last["answer"] == out["result"]["answer"]
    assert last["answer"].startswith(f"Added {len(calls)} of {len(calls)}") or not calls


@pytest.mark.model
def test_an_agent_needing_a_tool_the_caller_lacks_is_refused_by_name(bus: PrivateBus, tmp_path: Path) -> None:
    out = run(bus, tmp_path, register=False, goal="Buy milk.", options={"agent": "todo"})
    assert out["error"] == "org.llmos.Error.NotFound"
    assert "add_task" in out["message"]
    out = run(bus, tmp_path, register=False, goal="Hi.", options={"agent": "nope"})
    assert out["error"] == "org.llmos.Error.NotFound" and "summarizer" in out["message"]


@pytest.mark.model
def test_the_summarizer_works_through_a_long_text_in_parts(bus: PrivateBus, tmp_path: Path) -> None:
    paragraph = (
        "The town council met on Tuesday to discuss the new library. The library will open in "
        "spring, with a reading room, a children's corner and a small cafe. Funding comes from the "
        "region and from a local foundation. "
    )
    text = "\n\n".join(f"Part {i}. {paragraph * 6}" for i in range(12))  # several thousand tokens
    out = run(
        bus,
        tmp_path,
        register=False,
        goal=text,
        options={"agent": "summarizer", "temperature": 0.0, "max_tokens": 200},
    )
    assert out["code"] == 0, out
    parts = [s for s in out["steps"] if "text" in s]
    assert len(parts) >= 2 and all(s["text"].strip() for s in parts)  # shown part by part
    answer = out["result"]["answer"]
    assert answer.strip() and len(answer) < len(text) // 10
    assert "library" in answer.lower() or "council" in answer.lower(), answer


@pytest.mark.model
def test_a_plugins_bug_ends_its_run_with_a_named_error(bus: PrivateBus, tmp_path: Path) -> None:
    out = run(bus, tmp_path, register=False, goal="Hi", options={"agent": "buggy"})
    assert out["code"] == 2 and out["result"]["error_name"] == "org.llmos.Error.InvalidArgument", out
    assert "not a string" in out["result"]["error_message"]
    again = run(bus, tmp_path, register=False, goal="Hi", options={"agent": "buggy"})
    assert again["code"] == 2  # the same handle_token works again: the first task object went away
