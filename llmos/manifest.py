"""manifest.json: what a model directory holds, written last so its presence means "complete"."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from llmos.errors import ModelFormatError
from llmos.reimport import reimport_command

MANIFEST_FILE = "manifest.json"


class TensorLocation(BaseModel):
    """Where an initializer's bytes sit in the weight file, so the engine can map them without onnx."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    offset: int
    length: int
    dtype: str  # numpy dtype name
    shape: list[int]


class FileDigest(BaseModel):
    """What import wrote to one file of the model directory, checked at every load (model_integrity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    sha256: str


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    format_version: int = 1
    builder_version: int
    name: str
    architecture: str
    precision: str
    exact_weights: bool  # False when weights were re-rounded from floats (never for Q4_0/Q4_1/Q8_0)
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    context_length: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    chat_template: str | None
    source_file: str
    source_sha256: str
    source_quant: str  # the GGUF's dominant tensor type, e.g. Q4_1
    graph_file: str = "model.onnx"
    weights_file: str = "model.onnx.data"
    tokenizer_file: str = "tokenizer.json"
    # token embedding table: "x16" (the GGUF's rows regrouped for a native op, llmos/gguf_layouts.py),
    # "qweight"/"scales"/"correction" (8-bit rows) or "weight" (fp32)
    embedding: dict[str, TensorLocation] = {}
    embedding_type: str = ""  # the GGUF type name of an "x16" table (e.g. Q8_0): how its rows decode
    # custom op domains the graph uses, whose libraries must load with it: ["llmos.gguf"] when matrices
    # were imported for llmos's native ops (engine/native_ops.py), empty for onnxruntime's own ops
    custom_op_domains: list[str] = []
    native_ops: list[str] = []  # the llmos.gguf ops the graph uses (the library must hold each)
    # every other file of the directory, by name relative to it; empty in manifests written before
    # digests were recorded (loaded with a warning, see llmos/model_integrity.py)
    files: dict[str, FileDigest] = {}

    def write(self, directory: Path) -> None:
        tmp = directory / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, directory / MANIFEST_FILE)

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> ModelManifest:
        path = Path(directory) / MANIFEST_FILE
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ModelFormatError(missing_manifest_message(directory)) from None
        except ValidationError as e:
            raise ModelFormatError(
                f"{path} is invalid ({e.errors()[0]['msg']}); re-import it: {reimport_command(directory)}"
            ) from None


def missing_manifest_message(directory: str | os.PathLike[str]) -> str:
    """Import writes manifest.json last, so a directory without one is not a model, or an import that
    did not finish (or a manifest deleted since): say which file is missing and what rebuilds it."""
    d = Path(directory)
    if not d.is_dir():
        return f"{d} is not a model directory (no such directory)"
    if "--" not in d.name:  # not named like a store's model directory (<name>--<precision>)
        return f"{d} is not a model directory (no {MANIFEST_FILE})"
    return (
        f"{d} has no {MANIFEST_FILE} (an incomplete or damaged import); re-import it: {reimport_command(d)}"
    )
