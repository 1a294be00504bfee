"""Small GGUF files for tests: metadata-only files, and edited copies of a real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from llmos.gguf_file import GGUFFile


def write_metadata_gguf(path: Path, kv: dict[str, Any]) -> GGUFFile:
    """A GGUF with only the given metadata (bool, int as uint32, str, or list) and no tensors."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)
