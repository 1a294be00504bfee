"""llmosctl's bash completion and the man pages: generated from the parsers, current, and working.

scripts/gen_cli_docs.py writes packaging/completions/llmosctl and packaging/man/*.{1,8} from the argparse
parsers; a new option that is not in them fails here. The completion runs in a real bash, as a user
pressing Tab would; the pages render with groff without a warning.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPLETION = REPO / "packaging" / "completions" / "llmosctl"


def test_the_checked_in_files_are_what_the_parsers_give() -> None:
    r = subprocess.run(
        [sys.executable, "scripts/gen_cli_docs.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr + "\n(run: .venv/bin/python scripts/gen_cli_docs.py)"


@pytest.mark.parametrize("page", ["llmosctl.1", "llmosd.8"])
def test_the_man_pages_render_without_warnings(page: str) -> None:
    r = subprocess.run(
        ["groff", "-man", "-Tutf8", "-P-cbou", "-ww", str(REPO / "packaging" / "man" / page)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stderr == "" and "OPTIONS" in r.stdout and "SEE ALSO" in r.stdout


def complete(line: str) -> list[str]:
    """What Tab offers after `line` (the cursor at its end), from the completion script in bash."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    script = (
        f"source {shlex.quote(str(COMPLETION))}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_llmosctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    return r.stdout.split()


def test_tab_completes_commands_options_and_values() -> None:
    assert complete("llmosctl ge") == ["generate"]
    assert {"status", "model", "chat", "run", "jobs"} <= set(complete("llmosctl "))
    assert complete("llmosctl model im") == ["import"]
    assert "--max-tokens" in complete("llmosctl generate --") and "--local" in complete("llmosctl chat --")
    assert "--local" not in complete("llmosctl status --")  # only where it means something
    assert complete("llmosctl model import --precision ") == ["int4", "int8", "fp32"]
    assert "pyproject.toml" in complete("llmosctl model import pyproj")  # a GGUF path: files
    assert complete("llmosctl generate --max-tokens ") == []  # a number: nothing to offer
