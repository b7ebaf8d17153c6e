"""Exact rollback of recurrent layers: after a verify forward of T positions rolled back to any
k of them, every layer's cache (KV rows, conv window, delta-rule or SSM state) is bit for bit
what mlx-lm's own plain decoding of the same tokens holds, on every hybrid type; and what is not
supported is refused by name."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from helpers import build_model
from hybrid_models import HYBRID_TARGETS, build_hybrid
from mlx_lm.models import gated_delta, qwen3_5
from mlx_lm.models.cache import make_prompt_cache

from mlx_specdec import SpecDecError, recurrent
from mlx_specdec.recurrent import KINDS, RecurrentCache, _Record, _recording
from mlx_specdec.target import Target


def _layer_states(cache: list) -> list[list[mx.array]]:
    """Every array a cache holds for its committed positions, layer by layer."""
    out = []
    for c in cache:
        if hasattr(c, "keys"):
            out.append([c.keys[..., : c.offset, :], c.values[..., : c.offset, :]])
        else:
            out.append([a for a in c.cache if a is not None])
    return out


def _assert_same(ours: list, plain: list) -> None:
    assert len(ours) == len(plain)
    for i, (a, b) in enumerate(zip(ours, plain)):
        assert len(a) == len(b), i
        for x, y in zip(a, b):
            assert x.shape == y.shape and mx.array_equal(x, y), f"layer cache {i} differs"


def _plain(model, prompt: list[int], generated: list[int]) -> list:
    """mlx-lm's caches after its own decoding: the prompt but its last token in one call (as
    `generate_step` prefills), then one token a step."""
    cache = make_prompt_cache(model)
    model(mx.array([prompt[:-1]]), cache=cache)
    for t in prompt[-1:] + generated:
        model(mx.array([[t]]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


@pytest.fixture(scope="module", params=list(HYBRID_TARGETS))
def hybrid(request):
    config = HYBRID_TARGETS[request.param]()
    model = build_hybrid(config, seed=1)
    return model, Target(model, config, request.param)


@pytest.mark.parametrize("replay", [False, True], ids=["per-position", "replay"])
def test_states_after_rollback_are_plain_decodings(hybrid, replay, monkeypatch):
    """Two verify rounds of 8 positions, each rolled back to every depth (all kept, some, only
    the first, none): the caches equal plain decoding's of the committed tokens, and the
    offsets agree; with either way of keeping the recurrence (Mamba-2 always per position)."""
    monkeypatch.setattr(recurrent, "REPLAY", replay)
    model, target = hybrid
    rng = random.Random(0)
    prompt = [rng.randrange(3, 490) for _ in range(13)]
    rounds = [[rng.randrange(3, 490) for _ in range(8)] for _ in range(2)]
    for keep in (8, 5, 1, 0):
        cache = target.make_cache()
        target.prefill(mx.array(prompt), cache)
        committed = list(prompt)
        for verify in rounds:
            target(mx.array(verify), cache)
            Target.rollback(cache, len(verify) - keep)
            committed += verify[:keep]
            mx.eval([c.state for c in cache])
            plain = _plain(model, prompt, committed[len(prompt) :])
            _assert_same(_layer_states(cache), _layer_states(plain))
            assert {c.offset for c in cache} == {len(committed)}


def test_unsteered_step_by_step_state(hybrid):
    """Plain decoding through the Target (one position a forward, nothing rolled back) holds
    plain mlx-lm's state too: the recording is invisible when nothing is dropped."""
    model, target = hybrid
    tokens = list(range(20, 31))
    cache = target.make_cache()
    target.prefill(mx.array(tokens[:4]), cache)
    for t in tokens[4:]:
        target(mx.array([t]), cache)
        Target.rollback(cache, 0)
    mx.eval([c.state for c in cache])
    _assert_same(_layer_states(cache), _layer_states(_plain(model, tokens[:4], tokens[4:])))


def test_rollback_past_the_last_forward_is_refused():
    config = HYBRID_TARGETS["qwen3_5"]()
    target = Target(build_model(config), config, "tiny qwen3_5")
    cache = target.make_cache()
    target.prefill(mx.array([5, 6, 7]), cache)  # prefill positions cannot be rolled back
    with pytest.raises(SpecDecError, match="only the 0 positions"):
        Target.rollback(cache, 1)
    target(mx.array([8, 9]), cache)
    with pytest.raises(SpecDecError, match="only the 2 positions of its last verify"):
        Target.rollback(cache, 3)


def test_the_caller_model_is_untouched(hybrid):
    """Recording happens on the Target's copy only: mlx-lm's classes, functions and modules
    are as they were, and the copy's forward without a cache (training) is the model's."""
    model, target = hybrid
    names = [f"{type(m).__module__}.{type(m).__qualname__}" for _, m in model.named_modules()]
    assert not any("Recording" in n for n in names)
    assert qwen3_5.gated_delta_update is gated_delta.gated_delta_update
    ids = mx.array([[3, 4, 5, 6]])
    logits, _ = target.forward_batch(ids)
    assert mx.allclose(logits, model(ids), atol=1e-5)
    recognised = sum(n in KINDS for n in names)
    assert target.recurrent_layers == recognised


def _fake_update(calls: list):
    """An update with a keyword mlx-lm's do not have; its state sums the rows it saw."""

    def update(q, k, state=None, mask=None, *, new_keyword=None):
        calls.append((q.shape[1], new_keyword))
        s = (0 if state is None else state) + q.sum()
        return q * 2, s

    return update


def _recorded(wrapped, *args, **kwargs):
    token = recurrent._ACTIVE.set(rec := _Record())
    try:
        return wrapped(*args, **kwargs), rec
    finally:
        recurrent._ACTIVE.reset(token)


@pytest.mark.parametrize("replay", [True, False])
def test_the_update_wrapper_passes_every_argument_through(replay, monkeypatch):
    """mlx-lm adds keywords to its update functions over releases: the recording wrapper passes
    unknown ones through to every call, and calls through untouched when not recording."""
    calls: list = []
    monkeypatch.setattr(recurrent, "REPLAY", replay)
    wrapped = _recording(_fake_update(calls), KINDS["mlx_lm.models.qwen3_5.GatedDeltaNet"])
    q = mx.arange(6, dtype=mx.float32).reshape(1, 3, 2)
    y, s = wrapped(q, q, None, None, new_keyword="x")  # not recording: one call
    assert calls == [(3, "x")] and s.item() == 15.0
    calls.clear()
    (y2, s2), rec = _recorded(wrapped, q, q, mx.array(1.0), new_keyword="y")
    assert mx.array_equal(y2, y) and s2.item() == 16.0
    assert calls == ([(3, "y")] if replay else [(1, "y")] * 3)
    calls.clear()
    assert [rec.state_after(k).item() for k in range(4)] == [1.0, 2.0, 7.0, 16.0]
    assert all(kw == "y" for _, kw in calls)  # replays of 1, 2 and 3 rows (or none)
    assert [n for n, _ in calls] == ([1, 2, 3] if replay else [])


def test_an_unsupported_recurrent_layer_is_refused_by_name():
    config = dict(
        model_type="mamba2",
        num_heads=4,
        head_dim=16,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=64,
        state_size=16,
        num_hidden_layers=2,
        layer_norm_epsilon=1e-5,
        conv_kernel=4,
        n_groups=1,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=False,
        time_step_limit=(0.0, float("inf")),
        time_step_rank=4,
    )
    target = Target(build_model(config), config, "tiny-mamba2")
    with pytest.raises(SpecDecError) as e:
        target.make_cache()
    assert "Mamba2Block" in str(e.value) and "--mode baseline" in str(e.value)
    assert "\n" not in str(e.value)


def test_recurrent_cache_is_mlx_lm_s_arrays_cache():
    """mlx-lm's layers (and its own decoding) use it as their own cache."""
    config = HYBRID_TARGETS["lfm2"]()
    model = build_hybrid(config)
    target = Target(model, config, "tiny lfm2")
    ours = target.make_cache()
    assert sum(isinstance(c, RecurrentCache) for c in ours) == target.recurrent_layers == 4
    model(mx.array([[3, 4, 5]]), cache=ours)
    assert {c.offset for c in ours} == {3}
