"""Prefix caching on hybrid targets: recurrent layers are snapshotted at exact positions (the
prompt but its last token, the end of a run) and restored only there. A warm turn gives the
tokens of a cold one, `cached_tokens` counts only what was reused, and a restored state is
bitwise the one a cold prefill computes."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import greedy_reference, write_drafter
from hybrid_models import HYBRID_TARGETS, drafter_configs, write_hybrid

from mlx_specdec import PrefixCache, load_pair, speculative_generate
from mlx_specdec.cache import restore
from mlx_specdec.generate import _marks, encode_prompt, turn_start
from mlx_specdec.prefix_cache import fingerprint
from mlx_specdec.recurrent import RecurrentCache

HISTORY = "Number the 7th of the numbers and letters, then the letters again. " * 3
MAX_NEW = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model type -> (target folder, kind -> drafter folder), made on first use."""
    root = tmp_path_factory.mktemp("hybrid_prefix")
    made: dict = {}

    def get(model_type: str):
        if model_type not in made:
            config = HYBRID_TARGETS[model_type]()
            target = write_hybrid(root / model_type, config, seed=3)
            drafters = {
                kind: write_drafter(root / f"{model_type}-{kind}", cfg, seed=5)
                for kind, cfg in drafter_configs(config).items()
            }
            made[model_type] = target, drafters
        return made[model_type]

    return get


def load(folders, model_type: str, kind: str | None):
    target_dir, drafters = folders(model_type)
    drafter = None if kind is None else str(drafters[kind])
    mode = kind or "baseline"
    target, tokenizer, drafter, _ = load_pair(str(target_dir), drafter, mode=mode, drafter_bits=32)
    tokenizer.eos_token_ids = set()  # random targets: run to the budget, every turn alike
    return target, tokenizer, drafter


def turns(first_reply: str) -> list[list[dict]]:
    """A growing conversation: each turn resends the whole history plus a new question."""
    one = [{"role": "system", "content": HISTORY}, {"role": "user", "content": "The 7th?"}]
    two = one + [
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "And the 8th one?"},
    ]
    return [one, two, two[:-1] + [{"role": "user", "content": "The letters?"}]]


@pytest.mark.parametrize(
    "model_type,kind",
    [
        ("qwen3_5", "dspark"),
        ("lfm2", "dflash"),
        ("nemotron_h", "eagle3"),
        ("qwen3_5", None),  # plain decoding (mlx-lm's own step) on the same caches
        pytest.param("qwen3_next", "dspark", marks=pytest.mark.slow),
        pytest.param("lfm2_moe", "eagle3", marks=pytest.mark.slow),
        pytest.param("qwen3_5_moe", "dflash", marks=pytest.mark.slow),
    ],
)
def test_warm_turns_match_cold_greedy_decoding(folders, model_type, kind):
    """Each turn resends the history: it starts from the entry kept where the first turn's
    generation prompt starts (its answer follows there; Qwen-style templates render it without
    the empty think block the generation prompt had), and gives the tokens of a cold turn.
    Plain decoding (mlx-lm's prefill) keeps all but the last prompt token: a retry only."""
    target, tokenizer, drafter = load(folders, model_type, kind)
    cache = PrefixCache()
    kwargs = dict(max_new_tokens=MAX_NEW, prefix_cache=cache)
    first = speculative_generate(target, tokenizer, drafter, turns("")[0], **kwargs)
    assert first.prefix_cache == "miss" and first.cached_tokens == 0
    start = turn_start(encode_prompt(tokenizer, turns("")[0]), _marks(tokenizer))
    assert 0 < start < first.prompt_tokens - 1
    for i, messages in enumerate(turns(first.text)):
        ids = encode_prompt(tokenizer, messages)
        warm = speculative_generate(target, tokenizer, drafter, messages, **kwargs)
        assert warm.tokens == greedy_reference(target.model, ids, MAX_NEW, set())
        if i == 0:  # the first prompt again
            assert warm.cached_tokens == (start if drafter else len(ids) - 1)
        elif drafter is not None:
            assert warm.prefix_cache == "hit" and start <= warm.cached_tokens < len(ids)


@pytest.mark.parametrize("model_type,kind", [("qwen3_5", "dspark"), ("nemotron_h", None)])
def test_the_next_turn_starts_from_the_end_of_the_last(folders, model_type, kind):
    """A follow-up holding the previous run's output restores the entry kept at that run's end
    (past its prompt), not only the prompt's."""
    target, tokenizer, drafter = load(folders, model_type, kind)
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    first = speculative_generate(
        target, tokenizer, drafter, ids, max_new_tokens=12, prefix_cache=cache
    )
    follow = ids + first.tokens + [20, 21, 22]
    r = speculative_generate(
        target, tokenizer, drafter, follow, max_new_tokens=8, prefix_cache=cache
    )
    assert len(ids) <= r.cached_tokens <= len(ids) + len(first.tokens)
    assert r.tokens == greedy_reference(target.model, follow, 8, set())


def test_cached_tokens_count_only_whole_entries(folders):
    """A prompt sharing part of an entry cannot start inside it (the recurrent state is valid
    at the entry's end only): a miss, nothing reported reused, the same tokens."""
    target, tokenizer, drafter = load(folders, "qwen3_5", "dspark")
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache)
    assert cache.stats()["ram_entries"] == 2  # the prompt but its last token, the run's end
    short = ids[:40]
    r = speculative_generate(
        target, tokenizer, drafter, short, max_new_tokens=8, prefix_cache=cache
    )
    assert r.prefix_cache == "miss" and r.cached_tokens == 0
    assert r.tokens == greedy_reference(target.model, short, 8, set())
    longer = ids + ids[:5]  # holds the prompt's entry whole, not the run's
    r = speculative_generate(
        target, tokenizer, drafter, longer, max_new_tokens=8, prefix_cache=cache
    )
    assert r.cached_tokens == len(ids) - 1
    assert r.tokens == greedy_reference(target.model, longer, 8, set())


def test_a_restored_state_is_the_cold_prefill_state(folders):
    target, tokenizer, drafter = load(folders, "qwen3_5", "dspark")
    cache = PrefixCache()
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache)
    follow = ids + [20, 21, 22, 23]
    entry, length = cache.fetch("x", follow) or (None, 0)  # another pair's owner: nothing
    assert entry is None
    entry, length = cache.fetch(fingerprint(target, drafter), follow)
    assert length == len(ids) - 1 == len(entry.tokens)
    warm = target.make_cache()
    restore(entry, length, [*warm, *drafter.new_state(target.padded_attention)])
    target.prefill(mx.array(follow[length:]), warm)
    cold = target.make_cache()
    target.prefill(mx.array(follow), cold)
    for w, c in zip(warm, cold):
        if isinstance(w, RecurrentCache):
            assert all(mx.array_equal(a, b) for a, b in zip(w.cache, c.cache))
        else:
            assert mx.array_equal(w.keys[..., : w.offset, :], c.keys[..., : c.offset, :])
        assert w.offset == c.offset == len(follow)


def test_hybrid_entries_stay_in_ram(folders, tmp_path):
    """Entries with recurrent layers are not written to the disk tier: evicted, they are gone."""
    target, tokenizer, drafter = load(folders, "lfm2", "dspark")
    cache = PrefixCache(max_ram_mb=0, spill_dir=tmp_path)
    ids = encode_prompt(tokenizer, HISTORY, chat=False)
    r = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=8, prefix_cache=cache)
    assert r.prefix_cache == "miss"
    stats = cache.stats()
    assert stats["ram_entries"] == 0 and stats["spilled"] == 0
    assert not list(tmp_path.glob("*.safetensors"))
