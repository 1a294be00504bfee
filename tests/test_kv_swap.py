"""KV swap: int8 compression keeps attention inputs close, and a bad swap file is always a SwapFileError.

A swapped-out session must come back almost unchanged (or the conversation drifts), and any damaged,
foreign or half-written file must make the caller recompute rather than crash or load garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmos.arbiter.kv_codec import CHUNK, compress, decompress
from llmos.arbiter.swap_store import MAGIC, SwapStore
from llmos.errors import SwapFileError

MODEL = "sha256:abc123/q4_1"


def make_kv(length: int, n_layer: int = 2, n_kv: int = 3, head_dim: int = 64, seed: int = 0) -> np.ndarray:
    """Random KV whose keys have two outlier channels 50x larger than the rest, like real models."""
    kv = np.random.default_rng(seed).standard_normal((n_layer, 2, n_kv, length, head_dim), dtype=np.float32)
    kv[:, 0, :, :, [1, head_dim - 3]] *= 50
    return kv


def test_outlier_key_channels_do_not_swamp_the_others() -> None:
    kv = make_kv(100)
    out = decompress(compress(kv))
    assert out.shape == kv.shape and out.dtype == np.float32
    err = np.abs(out - kv)
    # Keys: every channel keeps its own error within half a quantisation step of its own range.
    k_rel = err[:, 0].max(axis=2) / np.abs(kv[:, 0]).max(axis=2)  # [layer, head, channel]
    assert k_rel.max() < 0.5 / 127 * 1.01
    # Values: the same per token, over head_dim.
    v_rel = err[:, 1].max(axis=-1) / np.abs(kv[:, 1]).max(axis=-1)
    assert v_rel.max() < 0.5 / 127 * 1.01
    # Overall relative error (what attention sees) stays well under 1 %.
    assert np.linalg.norm(out - kv) / np.linalg.norm(kv) < 0.01


@pytest.mark.parametrize("length", [1, 15, 16, 17, 37, 64])
def test_lengths_not_a_multiple_of_the_chunk(length: int) -> None:
    kv = make_kv(length, seed=length)
    c = compress(kv)
    assert c.k_q.shape == (2, 3, length, 64)  # padding to a whole chunk is not stored
    assert c.k_scale.shape == (2, 3, -(-length // CHUNK), 64) and c.v_scale.shape == (2, 3, length)
    out = decompress(c)
    assert out.shape == kv.shape
    assert (np.abs(out - kv) <= np.abs(kv).max() / 127).all()


def test_all_zero_and_tiny_kv_without_division_warnings() -> None:
    zeros = np.zeros((2, 2, 3, 20, 64), np.float32)
    tiny = make_kv(20) * np.float32(1e-40)  # subnormal floats
    with np.errstate(divide="raise", over="raise", invalid="raise"):  # underflow to 0 is the point
        assert np.array_equal(decompress(compress(zeros)), zeros)
        out = decompress(compress(tiny))
    assert np.isfinite(out).all() and np.abs(out - tiny).max() < 1e-30


def test_compression_ratio_for_a_smollm2_sized_cache() -> None:
    kv = make_kv(256, n_layer=30, n_kv=3, head_dim=64)
    c = compress(kv)
    assert kv.nbytes / c.nbytes() > 3.6
    assert c.k_scale.dtype == np.float16  # ordinary ranges get the smaller scales


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 3, 4, 64), np.float32),  # 4-D
        np.zeros((2, 3, 3, 4, 64), np.float32),  # axis 1 is not keys/values
        np.zeros((2, 2, 3, 4, 64), np.float64),
        np.zeros((2, 2, 3, 0, 64), np.float32),
        np.full((1, 2, 1, 3, 8), np.nan, np.float32),
        np.array([np.inf] + [0.0] * 47, np.float32).reshape(1, 2, 1, 3, 8),
    ],
)
def test_compress_rejects_what_is_not_engine_kv(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="KV"):
        compress(bad)


def test_file_round_trip_is_bit_exact(tmp_path: Path) -> None:
    store = SwapStore(tmp_path / "swap", MODEL)
    kv = make_kv(37)
    c = compress(kv)
    size = store.write("session-17", c, {"tokens": [1, 2, 3], "app": "x"})
    assert size == store.size("session-17") == store.total_bytes()
    back, meta = store.read("session-17")
    assert meta == {"tokens": [1, 2, 3], "app": "x"}
    assert np.array_equal(decompress(back), decompress(c))
    assert store.keys() == ["session-17"] and store.exists("session-17")
    store.write("session-17", compress(make_kv(5)))  # replaces, meta defaults to {}
    assert store.read("session-17")[0].length == 5 and store.read("session-17")[1] == {}
    store.delete("session-17")
    store.delete("session-17")  # missing is fine
    assert not store.exists("session-17") and store.keys() == [] and store.total_bytes() == 0


def small_swap_file(tmp_path: Path) -> tuple[SwapStore, Path]:
    store = SwapStore(tmp_path, MODEL)
    store.write("s", compress(make_kv(3, n_layer=1, n_kv=1, head_dim=8)), {"turn": 4})
    return store, tmp_path / "s.kv"


def assert_rejected(store: SwapStore, match: str | None = None) -> None:
    with pytest.raises(SwapFileError, match=match):
        store.read("s")


def test_every_single_flipped_byte_is_detected(tmp_path: Path) -> None:
    store, path = small_swap_file(tmp_path)
    good = path.read_bytes()
    for i in range(len(good)):
        path.write_bytes(good[:i] + bytes([good[i] ^ 0x40]) + good[i + 1 :])
        assert_rejected(store)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[:-1], "payload is"),
        (lambda b: b[:30], "truncated"),
        (lambda b: b[:60], "truncated inside the JSON"),
        (lambda b: b"", "truncated"),
        (lambda b: b + b"\0", "payload is"),
        (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
        (lambda b: os.urandom(len(b)), "bad magic"),
        (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "format version 2"),
        (lambda b: b[:-5] + b"\xff" * 5, "payload checksum"),
    ],
)
def test_damaged_files_are_swap_errors_and_still_deletable(
    tmp_path: Path, damage: Callable[[bytes], bytes], match: str
) -> None:
    store, path = small_swap_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    assert_rejected(store, match)
    store.delete("s")
    assert not path.exists()
    assert_rejected(store, "missing")


def rewrite_header(path: Path, edit: bytes | Callable[[dict[str, Any]], Any]) -> None:
    """Re-sign a changed JSON header, as a buggy or hostile writer would: checksums alone can't catch it."""
    data = path.read_bytes()
    (json_len,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[48 : 48 + json_len])
    new = edit(header) if callable(edit) else edit
    blob = new if isinstance(new, bytes) else json.dumps(new).encode()
    fixed = struct.pack("<8sII32s", MAGIC, 1, len(blob), hashlib.sha256(blob).digest())
    path.write_bytes(fixed + blob + data[48 + json_len :])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (b"\xff not json", "unreadable JSON"),
        (b"[1, 2]", "not an object"),
        (lambda h: {**h, "length": 4}, "shape mismatch"),
        (lambda h: {**h, "n_kv": -1}, "invalid sizes"),
        (lambda h: {**h, "dtypes": {**h["dtypes"], "k_q": "object"}}, "unexpected dtypes"),
        (lambda h: {**h, "dtypes": {**h["dtypes"], "k_q": "float16", "k_scale": "int8"}}, "shape mismatch"),
        (lambda h: {**h, "meta": [1]}, "meta is a list"),
        (lambda h: {k: v for k, v in h.items() if k != "payload_crc32"}, "not an object with"),
        (b"[" * 100_000 + b"]" * 100_000, "unreadable JSON"),
    ],
)
def test_well_signed_but_inconsistent_headers_are_rejected(
    tmp_path: Path, edit: bytes | Callable[[dict[str, Any]], Any], match: str
) -> None:
    store, path = small_swap_file(tmp_path)
    rewrite_header(path, edit)
    assert_rejected(store, match)


def test_a_file_written_for_another_model_is_rejected(tmp_path: Path) -> None:
    small_swap_file(tmp_path)
    with pytest.raises(SwapFileError, match="written for model 'sha256:abc123/q4_1'"):
        SwapStore(tmp_path, "sha256:other/f16").read("s")


def test_leftover_temp_files_are_never_read_and_are_cleared(tmp_path: Path) -> None:
    store, path = small_swap_file(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.kv"]  # a finished write leaves no temp file
    # A crash between writing and renaming leaves a complete-looking `.tmp-` file behind.
    (tmp_path / ".tmp-abc123").write_bytes(path.read_bytes())
    (tmp_path / ".tmp-def.kv").write_bytes(b"half")
    assert store.keys() == ["s"] and store.total_bytes() == path.stat().st_size
    with pytest.raises(ValueError):
        store.read(".tmp-def")
    assert store.clear_stale() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.kv"] and store.clear_stale() == 0
    assert store.read("s")[1] == {"turn": 4}


def test_write_into_a_vanished_directory_is_a_swap_error(tmp_path: Path) -> None:
    store = SwapStore(tmp_path / "swap", MODEL)
    (tmp_path / "swap").rmdir()
    with pytest.raises(SwapFileError, match="cannot write"):
        store.write("s", compress(make_kv(2)))


def test_private_permissions_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = SwapStore(tmp_path / "a" / "swap", MODEL)
        store.write("s", compress(make_kv(2)))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "swap").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "swap" / "s.kv").stat().st_mode) == 0o600


@pytest.mark.parametrize("key", ["", "a/b", "../x", ".", "..", ".tmp-1", "a b", "é", "x" * 129, None])
def test_invalid_keys_are_rejected(tmp_path: Path, key: str | None) -> None:
    store = SwapStore(tmp_path, MODEL)
    for call in (store.read, store.delete, store.exists, lambda k: store.write(k, compress(make_kv(1)))):
        with pytest.raises(ValueError, match="invalid swap key"):
            call(key)


def test_valid_keys_are_accepted(tmp_path: Path) -> None:
    store = SwapStore(tmp_path, MODEL)
    for key in ("session-17", "x" * 128, "a.b_c-D9", "0"):
        store.write(key, compress(make_kv(1)))
    assert store.keys() == sorted(["session-17", "x" * 128, "a.b_c-D9", "0"])
