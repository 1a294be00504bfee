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


def copy_with_metadata(src: Path, dst: Path, fields: dict[str, str | float]) -> Path:
    """A copy of a GGUF with some metadata set (str or float values; existing keys keep their type)."""
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in fields:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_float32(key, float(value))
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
