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
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import Snapshot
from .errors import SpecDecError

log = logging.getLogger("mlx_specdec.prefix_cache")

FORMAT = "mlx-specdec-prefix/1"


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
                if key[0] == owner and (n := _common_prefix(entry.tokens, want)) > best_len:
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
        prefixes too. Evicts least recently used entries past the RAM bound (to disk if set)."""
        if len(entry.tokens) == 0:
            return
        with self._lock:
            for key, other in list(self._ram.items()):
                n = len(other.tokens)
                if key[0] == entry.owner and _common_prefix(other.tokens, entry.tokens) == n:
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
        if self.spill_dir is None or entry.key in self._disk:
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
        tmp = self.spill_dir / ".partial" / path.name  # out of sight of `_scan` until whole
        try:
            tmp.parent.mkdir(exist_ok=True)
            mx.save_safetensors(str(tmp), arrays, meta)
            tmp.replace(path)  # never leave a half-written entry under the real name
        except OSError as e:
            log.warning("prefix cache: could not write %s (%s); entry dropped", path, e)
            tmp.unlink(missing_ok=True)
            return
        self._disk[entry.key] = (path, entry.tokens, path.stat().st_size)
        self.counts["spilled"] += 1
        while sum(size for _, _, size in self._disk.values()) > self.max_disk_bytes:
            _, (old, _, _) = self._disk.popitem(last=False)
            old.unlink(missing_ok=True)

    def _scan(self) -> None:
        """Index the folder's entry files from their headers; anything else is left alone."""
        assert self.spill_dir is not None
        files = sorted(self.spill_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                meta = read_safetensors_metadata(path)
                if meta.get("format") != FORMAT:
                    raise ValueError("not an mlx-specdec prefix cache file")
                tokens = np.asarray(json.loads(meta["tokens"]), dtype=np.int64)
                key = (meta["owner"], tokens.tobytes())
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("prefix cache: ignoring %s (%s)", path, e)
                continue
            self._disk[key] = (path, tokens, path.stat().st_size)

    def _load(self, key: tuple[str, bytes]) -> Snapshot | None:
        """Read a spilled entry back into RAM; a file that fails to load is deleted, with a
        warning."""
        path, tokens, _ = self._disk[key]
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            n_target = int(meta["n_target"])
            layers = []
            for i in range(len(arrays) // 2):
                k, v = arrays[f"{i}.keys"], arrays[f"{i}.values"]
                if k.ndim != 4 or v.ndim != 4 or not k.shape[2] == v.shape[2] == len(tokens):
                    raise ValueError("array shapes do not match the tokens")
                layers.append((k, v))
            if len(arrays) != 2 * len(layers) or not 0 < n_target <= len(layers):
                raise ValueError("unexpected arrays")
            entry = Snapshot(key[0], tokens, tuple(layers), n_target)
            mx.eval(entry.layers)
        except Exception as e:  # noqa: BLE001 - a bad file must never take the server down
            log.warning("prefix cache: ignoring %s (%s); deleted it", path, e)
            self._disk.pop(key, None)
            path.unlink(missing_ok=True)  # our own entry file (its header said so), now useless
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


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        size = path.stat().st_size
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("truncated file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta
