"""The model store: import a GGUF into an onnxruntime model directory, list and resolve models.

A model directory is `<store>/<name>--<precision>/` with model.onnx, model.onnx.data, tokenizer.json and
manifest.json. Imports build into a hidden temporary directory and rename it into place only when
complete, under a lock, so an import that fails or is killed never leaves a half model under a real
name. Importing the same source file (same sha256) with the same builder is a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from llmos.default_model import DEFAULT_MODEL_NAME, GGUF_SHA256, default_gguf_path, sha256_file
from llmos.engine import native_ops
from llmos.engine.memory import release_free_heap
from llmos.errors import (
    LlmosError,
    ModelCorruptError,
    ModelFormatError,
    ModelImportError,
    ModelNotFoundError,
)
from llmos.gguf_file import GGUFFile, LlamaHParams
from llmos.graph_builder import BUILDER_VERSION, PRECISIONS, Precision, build_onnx
from llmos.manifest import MANIFEST_FILE, ModelManifest, missing_manifest_message
from llmos.model_integrity import digest_directory, verify_model
from llmos.paths import model_store_dir
from llmos.reimport import reimport_command

# progress(stage, done, total): stages are "hash", "tokenizer", "graph" (tensor by tensor), "check",
# "digest"
ImportProgress = Callable[[str, int, int], None]
DEFAULT_POINTER = "DEFAULT"
_TMP_PREFIX = ".import-"


def _slug(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


class ModelStore:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else model_store_dir()

    # -- queries -------------------------------------------------------------------------------------
    def list(self) -> list[tuple[Path, ModelManifest]]:
        if not self.root.is_dir():
            return []
        found = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") or not (d / MANIFEST_FILE).is_file():
                continue
            with contextlib.suppress(LlmosError):
                found.append((d, ModelManifest.read(d)))
        return found

    def default_dir(self) -> Path | None:
        pointer = self.root / DEFAULT_POINTER
        if pointer.is_file():
            d = self.root / pointer.read_text(encoding="utf-8").strip()
            if (d / MANIFEST_FILE).is_file():
                return d
        return None

    def resolve(self, name: str | None = None) -> Path:
        """A model directory by path, by `<name>--<precision>`, by name (preferring int4), or the default."""
        if name is None:
            d = self.default_dir()
            if d is None:
                self._raise_for_broken_default()
                raise ModelNotFoundError(
                    f"no default model in {self.root}; run `llmosctl model import --default` first"
                )
            return d
        if (Path(name) / MANIFEST_FILE).is_file():
            return Path(name)
        if os.sep in name and Path(name).is_dir():  # a path, to a directory that is not a (whole) model
            raise ModelFormatError(missing_manifest_message(name))
        in_store = self.root / name
        if not name.startswith(".") and in_store.is_dir() and not (in_store / MANIFEST_FILE).is_file():
            raise ModelCorruptError(missing_manifest_message(in_store))  # a store directory lost it
        models = self.list()
        for d, _m in models:
            if d.name == name:
                return d
        matches = [(d, m) for d, m in models if m.name == name]
        if not matches:
            known = ", ".join(d.name for d, _ in models) or "none"
            raise ModelNotFoundError(f"no model named {name!r} in {self.root} (imported: {known})")
        matches.sort(key=lambda dm: PRECISIONS.index(dm[1].precision) if dm[1].precision in PRECISIONS else 9)
        return matches[0][0]

    def _raise_for_broken_default(self) -> None:
        """The DEFAULT pointer names a directory that is gone or has no manifest: say that, not "no
        default model", so nobody imports a second model to work around a damaged first one."""
        pointer = self.root / DEFAULT_POINTER
        if not pointer.is_file():
            return
        d = self.root / pointer.read_text(encoding="utf-8").strip()
        if d.is_dir():
            raise ModelCorruptError(missing_manifest_message(d))
        raise ModelCorruptError(
            f"the default model {d} is missing from the store ({pointer} names it); "
            f"re-import it: {reimport_command(d)}"
        )

    # -- import --------------------------------------------------------------------------------------
    def import_default(
        self,
        precision: Precision = "int4",
        progress: ImportProgress | None = None,
        say: Callable[[str], None] | None = None,
    ) -> Path:
        gguf = default_gguf_path(say)  # verified against the pinned sha256 already: no second hash
        d = self.import_gguf(
            gguf, precision=precision, name=DEFAULT_MODEL_NAME, progress=progress, known_sha256=GGUF_SHA256
        )
        self._write_pointer(d)
        return d

    def import_gguf(
        self,
        source: str | os.PathLike[str],
        precision: Precision = "int4",
        name: str | None = None,
        progress: ImportProgress | None = None,
        make_default: bool = False,
        known_sha256: str | None = None,
    ) -> Path:
        """Import `source` as `<name>--<precision>`; `known_sha256` skips hashing a file just verified."""
        if precision not in PRECISIONS:
            raise ModelImportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        step = progress or (lambda _s, _d, _t: None)
        src = Path(source)
        if not src.is_file():
            raise ModelFormatError(f"{src}: no such model file")
        model_name = name or _slug(src.stem)
        target = self.root / f"{_slug(model_name)}--{precision}"
        step("hash", 0, 1)
        digest = known_sha256 or sha256_file(src)
        step("hash", 1, 1)
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._clean_stale()
            if self._is_current(target, digest):
                if make_default:
                    self._write_pointer(target)
                return target  # already imported: idempotent, and no need to parse the GGUF again
            gguf = GGUFFile(src)  # validates the file before anything is written
            hp = gguf.hparams()
            tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
            try:
                self._build(gguf, hp, src, digest, model_name, precision, tmp, step)
                self._publish(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if make_default:
                self._write_pointer(target)
        return target

    @staticmethod
    def _is_current(target: Path, digest: str) -> bool:
        if not (target / MANIFEST_FILE).is_file():
            return False
        try:
            old = ModelManifest.read(target)
            if old.source_sha256 != digest or old.builder_version != BUILDER_VERSION or not old.files:
                return False  # another source, an older graph, or imported before digests: rebuild
            if old.custom_op_domains and not set(old.native_ops) <= native_ops.op_names():
                return False  # imported for native ops the library here lacks: rebuilt for what it has
            verify_model(target, old)  # a damaged directory is rebuilt by the same import command
        except LlmosError:
            return False
        return True

    def _build(
        self,
        gguf: GGUFFile,
        hp: LlamaHParams,
        src: Path,
        digest: str,
        name: str,
        precision: Precision,
        out: Path,
        step: ImportProgress,
    ) -> None:
        from llmos.tokenizer import Tokenizer  # heavy import kept off the listing path

        step("tokenizer", 0, 1)
        tok = Tokenizer.from_gguf(gguf)
        tok.save(out)
        gguf.drop_vocabulary()  # built and saved: the reader's per-token views are ~160 MB
        step("tokenizer", 1, 1)
        try:
            report = build_onnx(
                gguf,
                precision,
                out,
                progress=lambda i, n: step("graph", i, n),
                native_ops=native_ops.op_names(),  # import decides: the ops its library here holds
            )
        except LlmosError:
            raise
        except Exception as e:
            raise ModelImportError(
                f"building the graph for {src.name} failed: {type(e).__name__}: {e}"
            ) from e
        types = Counter(
            gguf.tensor(n).qtype.name for n in gguf.tensor_names() if len(gguf.tensor(n).shape) == 2
        )
        manifest = ModelManifest(
            builder_version=BUILDER_VERSION,
            name=name,
            architecture=hp.architecture,
            precision=precision,
            exact_weights=report.exact,
            n_layer=hp.n_layer,
            n_embd=hp.n_embd,
            n_head=hp.n_head,
            n_head_kv=hp.n_head_kv,
            head_dim=hp.head_dim,
            n_vocab=hp.n_vocab,
            context_length=hp.context_length,
            bos_token_id=tok.bos_id,
            eos_token_ids=sorted(tok.eos_ids),
            chat_template=gguf.get("tokenizer.chat_template"),
            source_file=src.name,
            source_sha256=digest,
            source_quant=types.most_common(1)[0][0] if types else "unknown",
            embedding=report.embedding,
            embedding_type=report.embedding_type,
            custom_op_domains=[native_ops.DOMAIN] if report.native_ops else [],
            native_ops=sorted(report.native_ops),
        )
        step("check", 0, 1)
        self._check_loads(out, manifest)
        step("check", 1, 1)
        step("digest", 0, 1)
        manifest = manifest.model_copy(update={"files": digest_directory(out)})  # what load checks
        step("digest", 1, 1)
        manifest.write(out)  # last: a directory with a manifest is complete

    @staticmethod
    def _check_loads(out: Path, manifest: ModelManifest) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if manifest.custom_op_domains:
            native_ops.register(so)
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # loading is the check: prepacked copies of every weight would double the import's peak memory
        so.add_session_config_entry("session.disable_prepacking", "1")
        try:
            ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelImportError(f"the built graph does not load in onnxruntime: {e}") from e
        finally:
            gc.collect()
            release_free_heap()

    def _publish(self, tmp: Path, target: Path) -> None:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if target.exists():
            old = target.with_name(f"{_TMP_PREFIX}old-{target.name}-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)

    def _write_pointer(self, d: Path) -> None:
        tmp = self.root / (DEFAULT_POINTER + ".tmp")
        tmp.write_text(d.name + "\n", encoding="utf-8")
        os.replace(tmp, self.root / DEFAULT_POINTER)

    def _clean_stale(self) -> None:
        """Remove temporary directories left by an import that was killed (we hold the lock)."""
        for d in self.root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
