"""Model import: bad files get named errors and leave nothing behind; good ones import exactly once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from llmos.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from llmos.gguf_file import GGUFFile
from llmos.graph_builder import BUILDER_VERSION
from llmos.manifest import ModelManifest
from llmos.model_store import ModelStore
from llmos.tiny_model import write_random_gguf


def _rewrite(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    drop_key: str | None = None,
    set_fields: dict[str, object] | None = None,
    tensor_hook: Callable[[str, np.ndarray, GGMLQuantizationType], tuple[np.ndarray, GGMLQuantizationType]]
    | None = None,
) -> Path:
    """Copy a GGUF, optionally renaming the architecture, dropping a key or replacing a tensor."""
    reader = GGUFReader(src)
    old_arch = str(reader.fields["general.architecture"].contents())
    new_arch = arch or old_arch
    w = GGUFWriter(dst, arch=new_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key == drop_key:
            continue
        out_key = key.replace(f"{old_arch}.", f"{new_arch}.", 1) if key.startswith(f"{old_arch}.") else key
        value = (set_fields or {}).get(key, field.contents())
        if field.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(out_key, value, field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(out_key, value, field.types[0])
    for t in reader.tensors:
        data, qtype = np.array(t.data), GGMLQuantizationType(t.tensor_type)
        if tensor_hook is not None:
            data, qtype = tensor_hook(t.name, data, qtype)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_random_gguf(tmp_path / "tiny.gguf", weight_type="Q4_1", seed=3)


def _store_is_clean(store: ModelStore) -> bool:
    leftovers = [p.name for p in store.root.iterdir() if p.name != ".lock"] if store.root.exists() else []
    return leftovers == []


def test_import_is_idempotent_and_atomic(tmp_path: Path, tiny: Path) -> None:
    store = ModelStore(tmp_path / "store")
    stages: list[str] = []
    graph: list[tuple[int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        stages.append(stage)
        if stage == "graph":
            graph.append((done, total))

    d = store.import_gguf(tiny, progress=progress)
    assert {"hash", "tokenizer", "graph", "check"} <= set(stages)
    # the graph stage moves tensor by tensor, to every tensor of the file
    n_tensors = len(GGUFFile(tiny).tensor_names())
    assert [t for _, t in graph] == [n_tensors] * len(graph) and graph[-1][0] == n_tensors
    assert len({done for done, _ in graph}) >= n_tensors - 2 and graph == sorted(graph)
    m = ModelManifest.read(d)
    assert (m.precision, m.source_quant, m.exact_weights, m.builder_version) == (
        "int4",
        "Q4_1",
        True,
        BUILDER_VERSION,
    )
    mtime = os.stat(d / "model.onnx").st_mtime_ns
    again: list[str] = []
    assert store.import_gguf(tiny, progress=lambda s, a, b: again.append(s)) == d
    assert "graph" not in again and os.stat(d / "model.onnx").st_mtime_ns == mtime
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", d.name]


def test_a_failed_build_leaves_nothing_and_keeps_the_old_model(tmp_path: Path, tiny: Path) -> None:
    store = ModelStore(tmp_path / "store")
    d = store.import_gguf(tiny, name="Tiny")
    before = (d / "manifest.json").read_bytes()
    # Same name, new content that passes validation and fails half-way through the graph build (after the
    # tokenizer is already written to the temporary directory).
    odd = _rewrite(tiny, tmp_path / "odd.gguf", tensor_hook=_q8_1_down_projection)
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        store.import_gguf(odd, name="Tiny")
    assert (d / "manifest.json").read_bytes() == before  # the complete old model is untouched
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", d.name]  # no temp dir left


def _q8_1_down_projection(name: str, data: np.ndarray, qtype: GGMLQuantizationType):
    """Turn one Q4_1 matrix into a same-shaped Q8_1 one: a type gguf cannot dequantize."""
    if name != "blk.0.ffn_down.weight":
        return data, qtype
    rows = data.shape[0]
    cols = data.size * 32 // 20 // rows  # Q4_1 is 20 bytes per 32 weights; Q8_1 is 40
    return np.zeros((rows, cols // 32 * 40), dtype=np.uint8), GGMLQuantizationType.Q8_1


def test_bad_magic_and_truncation_are_format_errors(tmp_path: Path, tiny: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTGGUF" + b"\0" * 100)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        GGUFFile(junk)
    cut = tmp_path / "cut.gguf"
    data = tiny.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])  # the last tensor loses its tail
    with pytest.raises(ModelFormatError, match=r"truncated|corrupt"):
        GGUFFile(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:40])
    with pytest.raises(ModelFormatError):
        GGUFFile(header_only)
    with pytest.raises(ModelFormatError, match="no such model file"):
        GGUFFile(tmp_path / "missing.gguf")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelFormatError):
        store.import_gguf(cut)
    assert _store_is_clean(store)


def test_unsupported_architecture_is_named(tmp_path: Path, tiny: Path) -> None:
    falcon = _rewrite(tiny, tmp_path / "falcon.gguf", arch="falcon")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(UnsupportedModelError, match="falcon"):
        store.import_gguf(falcon)
    assert _store_is_clean(store)


def test_unsupported_tensor_type_is_named(tmp_path: Path, tiny: Path) -> None:
    odd = _rewrite(tiny, tmp_path / "q8_1.gguf", tensor_hook=_q8_1_down_projection)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        store.import_gguf(odd)
    assert _store_is_clean(store)


def test_missing_required_metadata_is_named(tmp_path: Path, tiny: Path) -> None:
    broken = _rewrite(tiny, tmp_path / "noblocks.gguf", drop_key="llama.block_count")
    with pytest.raises(ModelFormatError, match="block_count"):
        ModelStore(tmp_path / "store").import_gguf(broken)


def test_inconsistent_shape_is_named(tmp_path: Path, tiny: Path) -> None:
    # a 64-wide embedding cannot be split into 5 heads
    broken = _rewrite(tiny, tmp_path / "heads.gguf", set_fields={"llama.attention.head_count": 5})
    with pytest.raises(ModelFormatError, match="inconsistent attention shape"):
        ModelStore(tmp_path / "store").import_gguf(broken)


def test_resolving_models_by_name(tmp_path: Path, tiny: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelNotFoundError, match="model import --default"):
        store.resolve()
    d4 = store.import_gguf(tiny, name="Tiny", make_default=True)
    d32 = store.import_gguf(tiny, name="Tiny", precision="fp32")
    assert store.resolve() == d4
    assert store.resolve("Tiny") == d4  # int4 preferred for a bare name
    assert store.resolve("Tiny--fp32") == d32
    assert store.resolve(str(d32)) == d32
    with pytest.raises(ModelNotFoundError, match="Tiny--int4"):
        store.resolve("Nope")
