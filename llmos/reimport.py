"""The command that rebuilds a model directory, for messages about a damaged or incomplete one.

A message that says a model is broken must also say what to type. Import keys a directory by
`<name>--<precision>` in its store, and a plain re-import of the same source rebuilds a directory that
fails its check (`ModelStore._is_current`), so the command is the original import: `--default` for the
default model, else the GGUF file under the same name, with `--precision` and `--store` when they are not
the defaults. Only the GGUF's file name is known (the manifest keeps no path), so the message shows that.
For the system store, the administrator runs it as the `llmos` user (packaging/README.md).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.default_model import DEFAULT_MODEL_NAME, GGUF_SHA256
from llmos.paths import model_store_dir

if TYPE_CHECKING:
    from llmos.manifest import ModelManifest

PROG = "llmosctl"
DEFAULT_PRECISION = "int4"


def reimport_command(directory: str | Path, manifest: ModelManifest | None = None) -> str:
    """`llmosctl model import ...` that rebuilds `directory`; from its manifest, else from its name."""
    d = Path(directory)
    if manifest is not None:
        name, precision = manifest.name, manifest.precision
        default = name == DEFAULT_MODEL_NAME and manifest.source_sha256 == GGUF_SHA256
        source = manifest.source_file
    else:
        name, _, precision = d.name.rpartition("--")
        if not name:  # not a store directory name: nothing better to say than the name itself
            name, precision = d.name, DEFAULT_PRECISION
        default = name == DEFAULT_MODEL_NAME
        source = "PATH.gguf"
    args = [PROG, "model", "import"]
    args += ["--default"] if default else [source, "--name", name]
    if precision != DEFAULT_PRECISION:
        args += ["--precision", precision]
    # --store unless it is the plain per-user default: the daemon's environment (the system service sets
    # LLMOS_MODEL_DIR) is not the shell of the administrator who reads the message
    if os.environ.get("LLMOS_MODEL_DIR") or _resolved(d.parent) != _resolved(model_store_dir()):
        args += ["--store", str(d.parent)]
    return shlex.join(args)


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()
