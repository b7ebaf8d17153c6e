"""The prefix cache's folder as an attacker or a crash leaves it (issue 23): scanning never
raises, a file that fails a check is skipped with one warning line, our own damaged files are
deleted, other files are left alone, and symlinks are never followed, at start-up or later."""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_specdec import PrefixCache
from mlx_specdec.cache import Snapshot
from mlx_specdec.prefix_cache import FORMAT

OWNER = "0123456789abcdef" * 2
TOKENS = [5, 6, 7, 8]
OURS = "prefix-" + "ab" * 20 + ".safetensors"  # how our entry files are named


def _entry(path: Path, tokens=TOKENS, **meta) -> Path:
    """A valid entry file (one layer over `tokens`), its metadata overridden by `meta`."""
    n = len(tokens)
    arrays = {"0.keys": mx.zeros((1, 1, n, 4)), "0.values": mx.ones((1, 1, n, 4))}
    header = {"format": FORMAT, "owner": OWNER, "n_target": "1", "tokens": json.dumps(tokens)}
    mx.save_safetensors(str(path), arrays, {**header, **meta})
    return path


def _raw(path: Path, header: bytes | str, declared: int | None = None) -> Path:
    """A file whose safetensors header is `header` as given (any bytes, any JSON)."""
    body = header.encode() if isinstance(header, str) else header
    n = len(body) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + body)
    return path


def _meta(path: Path, **meta) -> Path:
    """A header with crafted metadata values (not only strings), and no arrays."""
    return _raw(path, json.dumps({"__metadata__": {"format": FORMAT, **meta}}))


def _open_cache(folder: Path, **kwargs) -> PrefixCache:
    """`PrefixCache(spill_dir=folder)`, failing the test rather than hanging on a FIFO."""
    made: list = []
    thread = threading.Thread(
        target=lambda: made.append(_try(lambda: PrefixCache(spill_dir=folder, **kwargs))),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=10)
    assert made, "scanning the folder hung"
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _try(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        return e


def _warnings(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if name in r.getMessage()]


def test_crafted_files_never_crash_the_start_up(tmp_path, caplog):
    good = _entry(tmp_path / "good.safetensors")
    crafted = {
        "dangling": lambda p: p.symlink_to(tmp_path / "nowhere"),
        "nested": lambda p: _raw(p, "[" * 200_000),
        "inf_token": lambda p: _meta(p, owner=OWNER, n_target="1", tokens="[1e400]"),
        "huge_token": lambda p: _meta(p, owner=OWNER, n_target="1", tokens="[" + "9" * 25 + "]"),
        "bool_token": lambda p: _meta(p, owner=OWNER, n_target="1", tokens="[true]"),
        "negative_token": lambda p: _meta(p, owner=OWNER, n_target="1", tokens="[-1]"),
        "digits": lambda p: _meta(p, owner=OWNER, n_target="1", tokens="[" + "1" * 5000 + "]"),
        "list_owner": lambda p: _meta(p, owner=["x"], n_target="1", tokens="[1]"),
        "dict_tokens": lambda p: _meta(p, owner=OWNER, n_target="1", tokens={"a": 1}),
        "no_tokens": lambda p: _meta(p, owner=OWNER, n_target="1", tokens="[]"),
        "bad_target": lambda p: _meta(p, owner=OWNER, n_target="x", tokens="[1]"),
        "list_meta": lambda p: _raw(p, json.dumps({"__metadata__": [1]})),
        "list_header": lambda p: _raw(p, "[1, 2]"),
        "not_utf8": lambda p: _raw(p, b"\xff\xfe{}"),
        "short_length": lambda p: p.write_bytes(b"\x01\x02"),
        "long_length": lambda p: _raw(p, "{}", declared=2**63),
        "empty": lambda p: p.write_bytes(b""),
        "folder": lambda p: p.mkdir(),
        "fifo": lambda p: os.mkfifo(p),
    }
    for name, make in crafted.items():
        make(tmp_path / f"{name}.safetensors")
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        cache = _open_cache(tmp_path)
    assert cache.stats()["disk_entries"] == 1
    for name in crafted:
        assert len(_warnings(caplog, f"{name}.safetensors")) == 1, name
    assert not _warnings(caplog, good.name)
    # Files whose header says they are ours were deleted, every other one left alone.
    left = {p.name.removesuffix(".safetensors") for p in tmp_path.iterdir()} - {"good"}
    claimed = {n for n in crafted if n.endswith("_token") or n in ("digits", "list_owner")}
    claimed |= {"dict_tokens", "no_tokens", "bad_target"}
    assert left == set(crafted) - claimed


def test_a_header_over_the_size_bound_is_not_read(tmp_path, caplog):
    meta = {"format": FORMAT, "owner": OWNER, "n_target": "1", "pad": "x" * (17 * 2**20)}
    _raw(tmp_path / "big.safetensors", json.dumps({"__metadata__": meta}))
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        assert _open_cache(tmp_path).stats()["disk_entries"] == 0
    assert "header over" in " ".join(_warnings(caplog, "big.safetensors"))


def test_our_own_damaged_files_are_deleted_others_left(tmp_path, caplog):
    whole = _entry(tmp_path / "whole.safetensors").read_bytes()
    ours = tmp_path / OURS
    ours.write_bytes(whole[:100])  # our name, header cut short
    ours_by_format = _meta(
        tmp_path / "renamed.safetensors", owner=OWNER, n_target="1", tokens="[1e400]"
    )
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(whole[:100])  # the same damage under a name that is not ours
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        cache = _open_cache(tmp_path)
    assert cache.stats()["disk_entries"] == 1  # whole.safetensors
    assert not ours.exists() and not ours_by_format.exists() and foreign.exists()
    assert "deleted" in _warnings(caplog, OURS)[0]
    assert "deleted" not in _warnings(caplog, "foreign.safetensors")[0]


def test_symlinks_are_never_followed(tmp_path, caplog):
    folder, outside = tmp_path / "cache", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    valid = _entry(outside / OURS)
    (folder / OURS).symlink_to(valid)
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        cache = _open_cache(folder)
    assert cache.stats()["disk_entries"] == 0 and len(_warnings(caplog, OURS)) == 1
    assert valid.exists() and (folder / OURS).is_symlink()  # neither followed nor removed


def test_an_entry_swapped_for_a_symlink_after_the_scan_is_not_read(tmp_path, caplog):
    folder, outside = tmp_path / "cache", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    entry = _entry(folder / OURS)
    cache = _open_cache(folder)
    assert cache.stats()["disk_entries"] == 1
    decoy = _entry(outside / "decoy.safetensors")
    entry.unlink()
    entry.symlink_to(decoy)
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        assert cache.fetch(OWNER, TOKENS + [9]) is None
    assert _warnings(caplog, OURS) and decoy.exists()
    assert cache.stats()["disk_entries"] == 0


def test_spilled_entries_are_written_inside_the_folder(tmp_path):
    """A `.partial` folder that is a symlink to elsewhere is replaced, not written through."""
    folder, outside = tmp_path / "cache", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (folder / ".partial").symlink_to(outside, target_is_directory=True)
    cache = _open_cache(folder, max_ram_mb=0)
    layers = ((mx.zeros((1, 1, 4, 4)), mx.zeros((1, 1, 4, 4))),)
    cache.store(Snapshot(OWNER, np.asarray(TOKENS, np.int64), layers, 1))
    assert cache.stats()["spilled"] == 1
    assert not (folder / ".partial").is_symlink() and not list(outside.iterdir())
    assert len(list(folder.glob("prefix-*.safetensors"))) == 1
    # ...and the entry reads back
    assert cache.fetch(OWNER, TOKENS + [9]) is not None


@pytest.mark.parametrize("tokens", [[0], [2**31 - 1, 3]])
def test_token_ids_at_the_bounds_are_kept(tmp_path, tokens):
    _entry(tmp_path / "edge.safetensors", tokens=tokens)
    assert _open_cache(tmp_path).stats()["disk_entries"] == 1
