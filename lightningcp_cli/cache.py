"""On-disk static-feature cache (safetensors files, one per entry).

A batch job that reuses a portrait should not run the ReferenceNet again: its feature
bank depends only on the face crop, the model and the dtype.  Entries are keyed by a
hash of exactly those inputs, written atomically (temp file + rename, so concurrent
renders never see half a file) and carry a digest of their own tensors, so a damaged
entry is detected on load, deleted and rebuilt instead of poisoning a render.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

_SUFFIX = ".safetensors"


def default_cache_dir() -> Path:
    """``$LCP_CACHE_DIR``, else ``$XDG_CACHE_HOME/lcp``, else ``~/.cache/lcp``."""
    if env := os.environ.get("LCP_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lcp"


def cache_key(*parts: bytes | str) -> str:
    """A stable hex key over the given parts (order matters)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size_bytes: int
    kind: str
    model: str


class FeatureCache:
    """A folder of ``<kind>-<key>.safetensors`` files."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def _path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}{_SUFFIX}"

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when absent or damaged (a damaged file is removed).

        The file is read in ONE read and parsed from memory: another process may replace
        the entry (atomic rename) at any moment, and reading it twice (or lazily, as
        ``safe_open`` does) can pair one version's tensors with the other's digest
        (measured: a few in 300 concurrent rounds).  A damaged file is removed only if it
        is still the one that was read, never a fresh entry another process just wrote."""
        path = self._path(kind, key)
        try:
            with open(path, "rb") as f:
                seen = os.fstat(f.fileno()).st_ino
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            size = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
            tensors = load(data)
        except (SafetensorError, OSError, RuntimeError, ValueError, AttributeError):
            tensors, meta = None, {}
        if tensors is not None and meta.get("digest") == tensors_digest(tensors):
            return tensors
        with contextlib.suppress(OSError):
            if path.stat().st_ino == seen:
                path.unlink()
        return None

    def save(
        self, kind: str, key: str, tensors: dict[str, torch.Tensor], *, model: str = ""
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, key)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {"digest": tensors_digest(tensors), "kind": kind, "model": model}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".lcp-tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    def entries(self) -> list[CacheEntry]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob(f"*{_SUFFIX}")):
            kind, _, key = path.stem.partition("-")
            model = ""
            try:
                with safe_open(str(path), framework="pt") as f:
                    model = (f.metadata() or {}).get("model", "")
            except (SafetensorError, OSError, RuntimeError, ValueError):
                model = "(damaged)"
            out.append(CacheEntry(key, path, path.stat().st_size, kind, model))
        return out

    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""
        entries = self.entries()
        for e in entries:
            e.path.unlink(missing_ok=True)
        return len(entries)
