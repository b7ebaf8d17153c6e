"""Prefix caching: keep the target's KV cache and the drafter's context state of recent
conversations, and start a new request from the longest token prefix it shares with one.

An entry is a `cache.Snapshot`: every layer's (keys, values) cut to the same length, and the
tokens they hold. Entries are immutable copies: a request fills its own fresh caches with slices
of them, so an entry stays valid whatever that request does.

RAM holds an LRU bounded in bytes. With a folder, evicted entries are written there as
safetensors files (one per entry, the tokens in the header) and read back when a later request
matches them better than anything in RAM; the folder is bounded too, oldest files go first.
mlx-lm's own `LRUPromptCache` keeps target caches only and has no eviction hook for a disk
tier, hence this module.

The folder is read as untrusted: a file that fails any check is skipped with one warning line
(and deleted when it is ours, by its name or its header), symlinks are never followed, and
headers are parsed within bounds of size and depth.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import mlx.core as mx
import numpy as np

from . import safejson
from .cache import Snapshot
from .errors import SpecDecError

log = logging.getLogger("mlx_specdec.prefix_cache")

FORMAT = "mlx-specdec-prefix/1"
ENTRY_NAME = re.compile(r"prefix-[0-9a-f]{40}\.safetensors")  # how `_path` names our files
OWNER = re.compile(r"[0-9a-f]{1,64}")  # a `fingerprint`
MAX_HEADER_BYTES = 16 * 2**20  # the tokens of a million-token entry fit several times
MAX_HEADER_DEPTH = 3  # {"0.keys": {"shape": [...]}}
MAX_TOKEN_ID = 2**31 - 1  # above any vocabulary (model-side ids are int32)
_NOFOLLOW = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class BadEntry(ValueError):
    """A file in the folder that fails a check; `ours` when it is one of our entry files."""

    def __init__(self, reason: str, ours: bool) -> None:
        super().__init__(reason)
        self.ours = ours


def fingerprint(target: Any, drafter: Any) -> str:
    """A stable id of a loaded pair: configs, dtype and a few weights, so that caches are never
    shared across models, precisions or retrained weights (also across server restarts)."""
    parts: list[Any] = [target.config, str(target.embed_tokens.weight.dtype)]
    parts.append(_weight_probe(target.embed_tokens.weight))
    if drafter is not None:
        parts += [drafter.kind, list(drafter.tap_ids), drafter.max_draft]
        parts += [repr(getattr(drafter, "config", None))]
        for name, w in sorted(_first_weights(drafter)):
            parts += [name, _weight_probe(w)]
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _first_weights(module: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())[:4]


def _weight_probe(w: mx.array) -> float:
    return round(float(w[:4].astype(mx.float32).sum().item()), 4)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.shape[0], b.shape[0])
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _usable(entry: Snapshot, want: np.ndarray) -> int:
    """How many of `want`'s leading tokens `entry` can serve: a cut-able entry any common
    prefix, one with recurrent layers its whole length or nothing (and it must leave a token)."""
    n = _common_prefix(entry.tokens, want)
    if entry.cuttable:
        return n
    return n if n == len(entry.tokens) < len(want) else 0


class PrefixCache:
    """An LRU of `Snapshot`s in RAM (at most `max_ram_mb`), optionally spilling to `spill_dir`
    (at most `max_disk_mb`). Thread-safe; one instance can serve several pairs."""

    def __init__(
        self,
        max_ram_mb: float = 2048,
        spill_dir: str | Path | None = None,
        max_disk_mb: float = 16384,
    ) -> None:
        if not (max_ram_mb >= 0 and max_disk_mb >= 0):  # also refuses NaN
            raise SpecDecError(
                f"prefix cache sizes must be >= 0 MiB, got RAM {max_ram_mb}, disk {max_disk_mb}"
            )
        self.max_ram_bytes = int(max_ram_mb * 2**20)
        self.max_disk_bytes = int(max_disk_mb * 2**20)
        self._ram: OrderedDict[tuple[str, bytes], Snapshot] = OrderedDict()
        self._disk: OrderedDict[tuple[str, bytes], tuple[Path, np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "reused_tokens": 0, "spilled": 0, "loaded": 0}
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            try:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SpecDecError(
                    f"cannot use {self.spill_dir} as the prefix cache folder ({e.strerror}); "
                    "give a writable folder with --prefix-cache-dir"
                ) from None
            self._scan()

    # ------------------------------------------------------------------------------ lookup
    def fetch(self, owner: str, tokens: Sequence[int]) -> tuple[Snapshot, int] | None:
        """The entry holding the longest prefix of `tokens`, and how many of its positions to
        use: at most all but the last token, whose logits start generation. None when nothing
        useful is cached."""
        want = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            best, best_len, on_disk = None, 0, False
            for key, entry in self._ram.items():
                if key[0] == owner and (n := _usable(entry, want)) > best_len:
                    best, best_len = key, n
            for key, (_, held, _) in self._disk.items():
                fresh = key[0] == owner and key not in self._ram
                if fresh and (n := _common_prefix(held, want)) > best_len:
                    best, best_len, on_disk = key, n, True
            length = min(best_len, len(want) - 1)
            entry = None
            if best is not None and length > 0:
                entry = self._load(best) if on_disk else self._ram[best]
            if entry is None:
                self.counts["misses"] += 1
                return None
            self._ram.move_to_end(entry.key)
            self.counts["hits"] += 1
            self.counts["reused_tokens"] += length
        return entry, length

    # ------------------------------------------------------------------------------ update
    def store(self, entry: Snapshot) -> None:
        """Keep `entry` (most recent); entries it extends are dropped, as it serves their
        prefixes too (unless it has recurrent layers, which serve their whole length only).
        Evicts least recently used entries past the RAM bound (to disk if set; entries with
        recurrent layers stay in RAM only)."""
        if len(entry.tokens) == 0:
            return
        with self._lock:
            for key, other in list(self._ram.items()):
                n = len(other.tokens)
                if (
                    entry.cuttable
                    and key[0] == entry.owner
                    and _common_prefix(other.tokens, entry.tokens) == n
                ):
                    del self._ram[key]  # a prefix of the new entry
            self._ram[entry.key] = entry
            self._ram.move_to_end(entry.key)
            used = sum(e.nbytes for e in self._ram.values())
            while used > self.max_ram_bytes and self._ram:
                _, old = self._ram.popitem(last=False)
                used -= old.nbytes
                self._spill(old)

    def drop(self, entry: Snapshot) -> None:
        """Forget an entry (RAM and disk): a request that used it failed or was inconsistent."""
        with self._lock:
            self._ram.pop(entry.key, None)
            if (spilled := self._disk.pop(entry.key, None)) is not None:
                spilled[0].unlink(missing_ok=True)

    def clear(self) -> None:
        with self._lock:
            self._ram.clear()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                **self.counts,
                "ram_entries": len(self._ram),
                "ram_bytes": sum(e.nbytes for e in self._ram.values()),
                "disk_entries": len(self._disk),
                "disk_bytes": sum(size for _, _, size in self._disk.values()),
            }

    # ------------------------------------------------------------------------------ disk tier
    def _path(self, entry: Snapshot) -> Path:
        assert self.spill_dir is not None
        digest = hashlib.sha256(entry.owner.encode() + entry.tokens.tobytes()).hexdigest()
        return self.spill_dir / f"prefix-{digest[:40]}.safetensors"

    def _spill(self, entry: Snapshot) -> None:
        if self.spill_dir is None or entry.key in self._disk or not entry.cuttable:
            return
        path = self._path(entry)
        arrays = {}
        for i, (k, v) in enumerate(entry.layers):
            arrays[f"{i}.keys"], arrays[f"{i}.values"] = k, v
        meta = {
            "format": FORMAT,
            "owner": entry.owner,
            "n_target": str(entry.n_target),
            "tokens": json.dumps(entry.tokens.tolist()),
        }
        try:
            tmp = self._partial_dir() / path.name  # out of sight of `_scan` until whole
            mx.save_safetensors(str(tmp), arrays, meta)
            tmp.replace(path)  # never leave a half-written entry under the real name
        except OSError as e:
            log.warning("prefix cache: could not write %s (%s); entry dropped", path, e)
            (self.spill_dir / ".partial" / path.name).unlink(missing_ok=True)
            return
        self._disk[entry.key] = (path, entry.tokens, path.stat().st_size)
        self.counts["spilled"] += 1
        while sum(size for _, _, size in self._disk.values()) > self.max_disk_bytes:
            _, (old, _, _) = self._disk.popitem(last=False)
            old.unlink(missing_ok=True)

    def _partial_dir(self) -> Path:
        """The folder half-written entries go to: a real folder inside ours (a symlink or a
        file in its place is removed, so nothing is written elsewhere)."""
        assert self.spill_dir is not None
        partial = self.spill_dir / ".partial"
        if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
            partial.unlink()
        partial.mkdir(exist_ok=True)
        return partial

    def _scan(self) -> None:
        """Index the folder's entry files from their headers; anything else is left alone.
        Never raises: a file that fails a check is skipped, with one warning line."""
        assert self.spill_dir is not None
        for path, size in _regular_files(self.spill_dir):
            try:
                key, tokens = _read_entry(path)
            except BadEntry as e:
                _skip(path, e)
                continue
            self._disk[key] = (path, tokens, size)

    def _load(self, key: tuple[str, bytes]) -> Snapshot | None:
        """Read a spilled entry back into RAM; a file that fails to load is deleted, with a
        warning."""
        path, tokens, _ = self._disk[key]
        try:
            with _open_regular(path) as f:
                meta = _read_metadata(f)
                if _entry_key(meta)[0] != key:
                    raise ValueError("the file changed since the folder was read")
                f.seek(0)
                arrays = mx.load(f, format="safetensors")
            entry = _snapshot(key, tokens, arrays, int(meta["n_target"]))
            mx.eval(entry.layers)
        except Exception as e:  # noqa: BLE001 - a bad file must never take the server down
            self._disk.pop(key, None)
            _skip(path, BadEntry(str(e), ours=True))  # indexed, so its header said it is ours
            return None
        self.counts["loaded"] += 1
        self._disk.move_to_end(key)
        self._ram[key] = entry
        used = sum(e.nbytes for e in self._ram.values())
        while used > self.max_ram_bytes and len(self._ram) > 1:
            _, old = self._ram.popitem(last=False)
            used -= old.nbytes
            self._spill(old)
        return entry


def _snapshot(key: tuple[str, bytes], tokens: np.ndarray, arrays: dict, n_target: int) -> Snapshot:
    """The entry a file's arrays make, checked against its tokens."""
    layers = []
    for i in range(len(arrays) // 2):
        k, v = arrays[f"{i}.keys"], arrays[f"{i}.values"]
        if k.ndim != 4 or v.ndim != 4 or not k.shape[2] == v.shape[2] == len(tokens):
            raise ValueError("array shapes do not match the tokens")
        layers.append((k, v))
    if len(arrays) != 2 * len(layers) or not 0 < n_target <= len(layers):
        raise ValueError("unexpected arrays")
    return Snapshot(key[0], tokens, tuple(layers), n_target)


def _skip(path: Path, e: BadEntry) -> None:
    """One warning line for a file that failed a check; ours are deleted (never followed: a
    symlink's removal removes the link)."""
    if e.ours:
        path.unlink(missing_ok=True)
    log.warning("prefix cache: ignoring %s (%s)%s", path, e, "; deleted it" if e.ours else "")


def _regular_files(folder: Path) -> Iterator[tuple[Path, int]]:
    """`(path, size)` of the folder's `*.safetensors` regular files, oldest first; anything
    else under that name (symlink, folder, FIFO) is skipped with a warning."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.endswith(".safetensors"):
                continue
            path = Path(entry.path)
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as e:
                _skip(path, BadEntry(e.strerror or "cannot stat", ours=False))
                continue
            if not stat.S_ISREG(info.st_mode):
                _skip(path, BadEntry("not a regular file; symlinks are not followed", ours=False))
                continue
            found.append((info.st_mtime, path, info.st_size))
    for _, path, size in sorted(found):
        yield path, size


def _open_regular(path: Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file, never through a symlink (and never
    blocking on a FIFO put in its place)."""
    fd = os.open(path, _NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_entry(path: Path) -> tuple[tuple[str, bytes], np.ndarray]:
    """The index key and tokens of one of our entry files, from its header alone."""
    ours = ENTRY_NAME.fullmatch(path.name) is not None
    try:
        with _open_regular(path) as f:
            meta = _read_metadata(f)
        ours = ours or meta.get("format") == FORMAT
        return _entry_key(meta)
    except (OSError, ValueError) as e:
        raise BadEntry(getattr(e, "strerror", None) or str(e), ours) from None


def _entry_key(meta: dict[str, Any]) -> tuple[tuple[str, bytes], np.ndarray]:
    """`((owner, token bytes), tokens)` of our entry metadata; `ValueError` on anything off."""
    if meta.get("format") != FORMAT:
        raise ValueError("not an mlx-specdec prefix cache file")
    owner, n_target = meta.get("owner"), meta.get("n_target")
    if not (isinstance(owner, str) and OWNER.fullmatch(owner)):
        raise ValueError("bad owner")
    if not (isinstance(n_target, str) and n_target.isdigit() and 0 < int(n_target) < 2**16):
        raise ValueError("bad n_target")
    tokens = _tokens(meta.get("tokens"))
    return (owner, tokens.tobytes()), tokens


def _tokens(text: Any) -> np.ndarray:
    if not isinstance(text, str):
        raise ValueError("bad tokens")
    values = safejson.loads(text, max_depth=1)
    if not (isinstance(values, list) and values):
        raise ValueError("bad tokens")
    if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in values):
        raise ValueError("tokens are not token ids")
    return np.asarray(values, dtype=np.int64)


def _read_metadata(f: IO[bytes]) -> dict[str, Any]:
    """The `__metadata__` of an open safetensors file, from its header alone, within bounds."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("truncated file")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"header over the bound of {MAX_HEADER_BYTES} bytes")
    if n > size - 8:
        raise ValueError("truncated header")
    header = safejson.loads(f.read(n), max_depth=MAX_HEADER_DEPTH)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def read_safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file, from its header alone (bounded; a symlink or
    anything but a regular file raises `OSError` or `ValueError`)."""
    with _open_regular(path) as f:
        return _read_metadata(f)
