"""Prefix caching: a warm turn gives exactly the tokens of a cold one, for every drafter family
and target kind; eviction, spill to disk and reload; bad files; failed and cancelled runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import FIXTURES, greedy_reference
from mlx_lm.models.cache import RotatingKVCache

from mlx_specdec import PrefixCache, SpecDecError, load_pair, speculative_generate
from mlx_specdec.generate import encode_prompt, stream_speculative_generate
from mlx_specdec.prefix_cache import FORMAT

PAIRS = {
    "dspark": ("dspark_qwen3", "dspark"),
    "dflash-deepspec": ("dflash_deepspec_qwen3", "dspark"),
    "dflash-zlab": ("zlab_dflash_qwen3", "dflash"),
    "eagle3": ("eagle3_qwen3", "eagle3"),
    "dspark-gemma4": ("dspark_gemma4", "dspark"),
    "baseline": ("dspark_qwen3", "baseline"),
}
HISTORY = "Number the 7th of the numbers and letters, then the letters again. " * 6


def load(name: str):
    folder, mode = PAIRS[name]
    drafter = None if mode == "baseline" else str(FIXTURES / folder / "drafter")
    target, tokenizer, drafter, _ = load_pair(str(FIXTURES / folder / "target"), drafter, mode=mode)
    return target, tokenizer, drafter


def reference(target, tokenizer, messages, n: int) -> list[int]:
    """Plain mlx-lm greedy decoding of the rendered conversation, stop token dropped."""
    eos = set(tokenizer.eos_token_ids)
    out = greedy_reference(target.model, encode_prompt(tokenizer, messages), n, eos)
    return [t for t in out if t not in eos]


def turns(first_reply: str) -> list[list[dict]]:
    """A growing conversation: each turn resends the whole history plus a new question."""
    one = [{"role": "system", "content": HISTORY}, {"role": "user", "content": "The 7th?"}]
    two = one + [
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "And the 8th one?"},
    ]
    return [one, two, two[:-1] + [{"role": "user", "content": "The letters?"}]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("max_draft", [None, 2])
def test_warm_turns_match_cold_greedy_decoding(name, max_draft):
    if name == "baseline" and max_draft is not None:
        pytest.skip("the baseline has no draft cap")
    target, tokenizer, drafter = load(name)
    cache = PrefixCache()
    kwargs = dict(max_new_tokens=24, max_draft=max_draft, prefix_cache=cache)
    first = speculative_generate(target, tokenizer, drafter, turns("")[0], **kwargs)
    assert first.prefix_cache == "miss" and first.cached_tokens == 0
    for messages in turns(first.text):
        warm = speculative_generate(target, tokenizer, drafter, messages, **kwargs)
        assert warm.prefix_cache == "hit"
        assert 0 < warm.cached_tokens < warm.prompt_tokens
        assert warm.tokens == reference(target, tokenizer, messages, 24)
    # The same prompt again: all but its last token come from the cache.
    again = speculative_generate(target, tokenizer, drafter, messages, **kwargs)
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again.tokens == warm.tokens


def test_a_shorter_prompt_reuses_part_of_a_longer_entry():
    target, tokenizer, drafter = load("dspark")
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache)
    short = ids[:40]
    r = speculative_generate(
        target, tokenizer, drafter, short, max_new_tokens=16, prefix_cache=cache
    )
    assert r.cached_tokens == 39
    eos = set(tokenizer.eos_token_ids)
    assert r.tokens == [t for t in greedy_reference(target.model, short, 16, eos) if t not in eos]


def test_entries_are_per_pair():
    """One cache serving two pairs never hands one pair's state to the other."""
    cache = PrefixCache()
    ids = None
    for name in ("dspark", "eagle3"):
        target, tokenizer, drafter = load(name)
        ids = ids or encode_prompt(tokenizer, HISTORY, chat=False)
        r = speculative_generate(
            target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache
        )
        assert r.prefix_cache == "miss"
    assert cache.stats()["ram_entries"] == 2


def test_eviction_spill_and_reload_after_restart(tmp_path, caplog):
    target, tokenizer, drafter = load("dspark")
    prompts = [encode_prompt(tokenizer, f"{i} {HISTORY}", chat=False) for i in range(3)]
    cache = PrefixCache(max_ram_mb=0.5, spill_dir=tmp_path)  # room for about one entry
    cold = []
    for ids in prompts:
        r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12)
        cold.append(r.tokens)
        speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    stats = cache.stats()
    assert stats["ram_entries"] == 1 and stats["ram_bytes"] <= 0.5 * 2**20
    assert stats["spilled"] == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2

    # A new cache on the same folder (a restarted server) finds the spilled entries.
    restarted = PrefixCache(max_ram_mb=0.5, spill_dir=tmp_path)
    assert restarted.stats()["disk_entries"] == 2
    for ids, want in zip(prompts[:2], cold):
        r = speculative_generate(
            target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=restarted
        )
        assert r.cached_tokens == len(ids) - 1 and r.tokens == want
    assert restarted.stats()["loaded"] == 2
    assert "ignoring" not in caplog.text


def test_disk_tier_is_bounded(tmp_path):
    target, tokenizer, drafter = load("dspark")
    cache = PrefixCache(max_ram_mb=0, spill_dir=tmp_path, max_disk_mb=0.5)
    for i in range(4):
        ids = encode_prompt(tokenizer, f"{i} {HISTORY}", chat=False)
        speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=4, prefix_cache=cache)
    stats = cache.stats()
    assert stats["ram_entries"] == 0 and stats["spilled"] == 4
    files = list(tmp_path.glob("*.safetensors"))
    assert 1 <= len(files) == stats["disk_entries"] < 4
    assert sum(f.stat().st_size for f in files) <= 0.5 * 2**20


def _spill_one(tmp_path: Path, pair) -> tuple[list[int], list[int], Path]:
    target, tokenizer, drafter = pair
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    cache = PrefixCache(max_ram_mb=0, spill_dir=tmp_path)
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    (path,) = tmp_path.glob("*.safetensors")
    return ids, r.tokens, path


def test_corrupt_and_foreign_files_are_ignored_with_a_warning(tmp_path, caplog):
    pair = load("dspark")
    target, tokenizer, drafter = pair
    ids, want, path = _spill_one(tmp_path, pair)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    mx.save_safetensors(str(tmp_path / "foreign.safetensors"), {"w": mx.zeros((2,))})
    (tmp_path / "notes.txt").write_text("left alone")
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        cache = PrefixCache(spill_dir=tmp_path)
    for name in ("garbage", "truncated", "foreign"):
        assert f"{name}.safetensors" in caplog.text
    assert cache.stats()["disk_entries"] == 1
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    assert r.prefix_cache == "hit" and r.tokens == want


def test_a_file_whose_arrays_are_damaged_is_dropped(tmp_path, caplog):
    """The header is fine but the arrays are not: the load fails, the entry is dropped with a
    warning and the request runs cold with the right output."""
    pair = load("dspark")
    target, tokenizer, drafter = pair
    ids, want, path = _spill_one(tmp_path, pair)
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(bytes(data[: header_end + 64]))  # arrays cut short
    cache = PrefixCache(spill_dir=tmp_path)
    assert cache.stats()["disk_entries"] == 1
    with caplog.at_level(logging.WARNING, logger="mlx_specdec.prefix_cache"):
        r = speculative_generate(
            target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache
        )
    assert "ignoring" in caplog.text
    assert r.prefix_cache == "miss" and r.tokens == want
    assert cache.stats()["disk_entries"] == 0 and not path.exists()


def test_a_run_that_fails_drops_the_entry_it_used(tmp_path):
    """An entry whose arrays have the wrong shape for the model (same header, same owner) makes
    the run fail; the entry is dropped, so the next request runs cold and correctly."""
    pair = load("dspark")
    target, tokenizer, drafter = pair
    ids, want, path = _spill_one(tmp_path, pair)
    arrays, meta = mx.load(str(path), return_metadata=True)
    arrays = {k: mx.concatenate([v, v], axis=-1) for k, v in arrays.items()}  # wrong head dim
    mx.save_safetensors(str(path), arrays, meta)
    cache = PrefixCache(spill_dir=tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - whatever the shape error is
        speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    assert cache.stats()["disk_entries"] == 0 and not path.exists()
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    assert r.prefix_cache == "miss" and r.tokens == want


def test_a_cancelled_run_keeps_nothing():
    target, tokenizer, drafter = load("dspark")
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    stream = stream_speculative_generate(
        target, tokenizer, drafter, ids, max_new_tokens=40, prefix_cache=cache
    )
    next(stream), next(stream)
    stream.close()  # the client went away mid-generation
    assert cache.stats()["ram_entries"] == 0
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    assert r.prefix_cache == "miss"


def test_caches_that_cannot_be_cut_fall_back_to_a_fresh_prefill():
    """Rotating (sliding-window) caches cannot in general be cut back to any prefix: no reuse,
    and the stats say so. (Here the window is never filled, so the run itself stays exact.)"""
    target, tokenizer, drafter = load("dspark")
    target.make_cache = lambda **_: [RotatingKVCache(max_size=4096) for _ in target.layers]
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    want = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=8).tokens
    for _ in range(2):
        r = speculative_generate(
            target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache
        )
        assert r.prefix_cache == "unsupported" and r.cached_tokens == 0 and r.tokens == want
    assert cache.stats()["ram_entries"] == 0


def test_entries_are_immutable_snapshots():
    """Generating from an entry never changes it: its arrays are the same after a warm run."""
    target, tokenizer, drafter = load("dspark")
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache)
    (entry,) = cache._ram.values()
    before = [np.array(k.astype(mx.float32)) for k, _ in entry.layers]
    longer = ids + encode_prompt(tokenizer, " and more text here", chat=False)
    speculative_generate(target, tokenizer, drafter, longer, max_new_tokens=12, prefix_cache=cache)
    after = [np.array(k.astype(mx.float32)) for k, _ in entry.layers]
    assert all(np.array_equal(b, a) for b, a in zip(before, after))


def test_bad_sizes_and_folders_are_one_line_errors(tmp_path):
    with pytest.raises(SpecDecError, match="must be >= 0"):
        PrefixCache(max_ram_mb=-1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpecDecError, match="--prefix-cache-dir"):
        PrefixCache(spill_dir=blocker / "sub")


def test_spill_file_format(tmp_path):
    """Entry files are plain safetensors with the tokens in the header, readable by others."""
    pair = load("dspark")
    ids, _, path = _spill_one(tmp_path, pair)
    arrays, meta = mx.load(str(path), return_metadata=True)
    assert meta["format"] == FORMAT
    held = json.loads(meta["tokens"])
    assert held[: len(ids)] == ids and len(held) > len(ids)  # the prompt, then the answer
    assert all(a.shape[2] == len(held) for a in arrays.values())


@pytest.mark.parametrize("name", ["dspark", "eagle3", "baseline"])
def test_a_run_that_ends_at_its_first_token(name):
    """max_new_tokens=1 (or a stop token first): the drafter never saw the prompt, so there is
    nothing both caches hold; nothing is stored for a drafter pair, and nothing breaks."""
    target, tokenizer, drafter = load(name)
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    first = speculative_generate(
        target, tokenizer, drafter, ids, max_new_tokens=1, prefix_cache=cache
    )
    assert len(first.tokens) <= 1
    assert cache.stats()["ram_entries"] == (1 if drafter is None else 0)
    again = speculative_generate(
        target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache
    )
    assert again.tokens[:1] == first.tokens
