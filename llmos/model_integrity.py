"""Digests of a model directory's files: recorded at import, checked at every load.

Without them a damaged weight file loads and answers garbage: onnxruntime checks no checksum, and
flipped bytes in `model.onnx.data` are just other weights. Import records the size and sha256 of every
file it wrote in the manifest (`ModelManifest.files`); every load (at start and after each idle unload)
checks them and refuses a damaged model with `ModelCorruptError`, naming the file and the command that
imports it again.

- **sha256**, because it is the fastest digest in hashlib where CPUs have SHA instructions (SHA-NI on
  x86, the ARMv8 crypto extension): OpenSSL's sha256 hashed 1.1 GB/s on one core of the development
  machine, sha1 the same, blake2b 0.93, sha512 0.77, md5 0.71. A non-cryptographic hash (xxh3) would be
  faster but is not in the standard library, and the cost is mostly hidden anyway (below).
- **Streaming**: a 1 MiB buffer reused with `readinto`, never a whole file in memory.
- **Parsed files first**: presence and sizes, then the files that get parsed (the graph, the tokenizer;
  ~2 MB) are checked before the engine opens anything, so neither onnxruntime nor `tokenizers` ever
  parses a damaged or altered file. A missing or truncated file fails at once.
- **The weights off the critical path**: hashlib and file reads release the GIL, so `ModelCheck` hashes
  the weight file on a thread while the engine loads the tokenizer and onnxruntime builds its session,
  and the engine waits for it before its warm-up run: damaged weights never compute a token. The load
  pays only what the hashing does not overlap (figures in docs/performance.md); reading the file also
  brings it into the page cache, which onnxruntime reads next.
- **Reloads read only what changed**: the daemon reloads the model after each idle unload. A file this
  process verified is not read again while its inode, size, mtime and ctime are those it had when it was
  read: any write, truncation, rename over it or chmod changes its ctime, which no unprivileged process
  can set back (`touch` sets mtime, and doing so moves ctime). A damaged file is read, and refused, at
  the next load; an untouched model reloads for a few `stat` calls. A new process (a daemon restart,
  the CLI) reads every file again.
- **What it protects against**: damage (disk, copy, an interrupted edit) and any change made since the
  import that did not also rewrite the manifest. It is not a signature: whoever can write the manifest
  can write matching digests, which is why the system store belongs to the `llmos` user. A file changed
  after the check, while the model is loaded, is caught at the next load.
- **Manifests from before digests** have no `files`: the files that must be there are checked for, and
  a warning says once per process and directory how to re-import to get verification (a re-import of
  the same source rebuilds such a directory, `ModelStore._is_current`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from llmos.errors import ModelCorruptError, ModelUnavailableError
from llmos.manifest import MANIFEST_FILE, FileDigest, ModelManifest
from llmos.reimport import reimport_command

log = logging.getLogger("llmos.integrity")
CHUNK = 1 << 20
_warned: set[Path] = set()
_warned_lock = threading.Lock()
# file → (its stat identity when it was read, its sha256): what this process has verified
_verified: dict[Path, tuple[tuple[int, ...], str]] = {}
_verified_lock = threading.Lock()


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces into one reused buffer (the GIL is free meanwhile)."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _model_files(directory: Path) -> list[Path]:
    """Every regular file under `directory` but the manifest, largest first (it bounds the wall time)."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _hash_all(paths: list[Path]) -> list[Future[str]]:
    """Start hashing `paths` on threads, one per file up to the CPUs there are."""
    if not paths:
        return []
    pool = ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1), thread_name_prefix="llmos-digest")
    futures = [pool.submit(sha256_of, p) for p in paths]
    pool.shutdown(wait=False)  # the threads end with their work
    return futures


def digest_directory(directory: str | os.PathLike[str]) -> dict[str, FileDigest]:
    """Size and sha256 of every file of a freshly built model directory, keyed by relative path."""
    d = Path(directory)
    paths = _model_files(d)
    futures = _hash_all(paths)
    return {
        p.relative_to(d).as_posix(): FileDigest(size=p.stat().st_size, sha256=f.result())
        for p, f in zip(paths, futures, strict=True)
    }


class ModelCheck:
    """The check of one model directory against its manifest: `start` checks what it can at once and
    hashes the weights on a thread; `wait` finishes. Both raise `ModelCorruptError` naming the file."""

    def __init__(self, directory: str | os.PathLike[str], manifest: ModelManifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.hashed: list[str] = []  # the files this check reads (the others were verified unchanged)
        self._identity: dict[str, tuple[int, ...]] = {}  # each file's stat before it is read
        self._futures: dict[str, Future[str]] = {}

    @classmethod
    def start(cls, directory: str | os.PathLike[str], manifest: ModelManifest) -> ModelCheck:
        """Check presence and sizes, and the small files that get parsed (graph, tokenizer: ~2 ms), now;
        start hashing the weight file, which is only read as numbers, on a thread. Files verified
        earlier in this process and unchanged since (same inode, size, mtime and ctime) are not read."""
        check = cls(directory, manifest)
        check._check_present()
        check.hashed = [n for n in manifest.files if not check._unchanged_since_verified(n)]
        later = [n for n in check.hashed if n == manifest.weights_file]
        for name in check.hashed:
            if name not in later:
                check._compare(name, check._hash(name))
        check._futures = dict(zip(later, _hash_all([check.directory / n for n in later]), strict=True))
        return check

    def wait(self) -> None:
        """Block until the weight file is hashed; raise if it does not match."""
        for name, future in self._futures.items():
            try:
                digest = future.result()
            except OSError as e:
                raise self._unreadable(name, e) from None
            self._compare(name, digest)

    def _unchanged_since_verified(self, name: str) -> bool:
        key = (self.directory / name).absolute()
        with _verified_lock:
            return _verified.get(key) == (self._identity[name], self.manifest.files[name].sha256)

    def _hash(self, name: str) -> str:
        try:
            return sha256_of(self.directory / name)
        except OSError as e:
            raise self._unreadable(name, e) from None

    def _compare(self, name: str, digest: str) -> None:
        if digest != self.manifest.files[name].sha256:
            raise ModelCorruptError(
                f"{self.directory / name} does not match its digest from import (damaged or changed "
                f"since); re-import it: {self._fix()}"
            )
        with _verified_lock:  # with its stat from before the read: a change during the read shows next time
            _verified[(self.directory / name).absolute()] = (self._identity[name], digest)

    def _check_present(self) -> None:
        m, d = self.manifest, self.directory
        if not m.files:  # imported before digests: at least the files the engine opens must be there
            from llmos.tokenizer import CONFIG_FILE  # the engine imports it next anyway

            for name in (m.graph_file, m.weights_file, m.tokenizer_file, CONFIG_FILE):
                if not (d / name).is_file():
                    raise ModelCorruptError(
                        f"{d / name} is missing (a damaged import); re-import it: {self._fix()}"
                    )
            warn_unverified(d, m)
            return
        for name, expected in m.files.items():
            path = d / name
            try:
                st = path.stat()
            except FileNotFoundError:
                raise ModelCorruptError(
                    f"{path} is missing (a damaged import, or deleted since); re-import it: {self._fix()}"
                ) from None
            except OSError as e:
                raise self._unreadable(name, e) from None
            if st.st_size != expected.size:
                raise ModelCorruptError(
                    f"{path} is {st.st_size} bytes but import wrote {expected.size} (truncated or changed "
                    f"since); re-import it: {self._fix()}"
                )
            self._identity[name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _unreadable(self, name: str, e: OSError) -> Exception:
        what = f"{self.directory / name} cannot be read ({e.strerror or e})"
        if isinstance(e, PermissionError):  # not damage: re-importing would not help
            return ModelUnavailableError(what)
        return ModelCorruptError(f"{what}; re-import it: {self._fix()}")

    def _fix(self) -> str:
        return reimport_command(self.directory, self.manifest)


def verify_model(directory: str | os.PathLike[str], manifest: ModelManifest) -> None:
    """Check every file now (import uses it to tell a current model from one to rebuild)."""
    ModelCheck.start(directory, manifest).wait()


def warn_unverified(directory: Path, manifest: ModelManifest) -> None:
    """Once per process and directory: this model cannot be checked, and what gets it checked."""
    key = directory.absolute()
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(
        "%s was imported before llmos recorded file digests, so damage to its files cannot be detected; "
        "re-import it to get verification: %s",
        directory,
        reimport_command(directory, manifest),
    )
