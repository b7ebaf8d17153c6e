"""Batched speculative rounds are exact per request (mlx_specdec/batch.py).

What is checked, on the CPU backend (whose matmuls are row-invariant):
- greedy: every request's tokens in a batch are the tokens `speculate` gives it alone, with mixed
  prompt lengths, caps, budgets and stop tokens, requests joining and leaving mid-run, chunked
  prefill, and a per-batch-size cap (down to plain batched decoding);
- sampling: every seeded request's tokens are those of the same request run alone through the
  batch decoder, whoever shares its rounds, with mixed temperatures and filters;
- for each drafter kind: DSpark and DeepSpec DFlash (drafted in one forward), z-lab DFlash (one
  forward too) and EAGLE3 (drafted row by row, verified together).
"""

from __future__ import annotations

import pytest
from helpers import FIXTURES, greedy_reference, run

from mlx_specdec import load_pair
from mlx_specdec.batch import BatchDecoder, Request, generate_batch
from mlx_specdec.drafters.batched import batched
from mlx_specdec.errors import SpecDecError
from mlx_specdec.sampling import SamplingParams

EOS = 2  # the demo tokenizer's end of text


@pytest.fixture(scope="module")
def demo():
    target, tokenizer, drafter, _ = load_pair(mode="dspark")
    return target, tokenizer, drafter


@pytest.fixture(scope="module")
def demo_prompts(demo):
    _, tokenizer, _ = demo
    texts = [
        "def read_lines(path):",
        "import os\n\ndef walk(top, onerror=None):\n    '''Walk a tree.'''\n",
        "class Queue:",
        "x = 1",
        "def __init__(self, filename, mode='a', encoding=None, delay=False):\n",
        "# Compute 12 + 30\n",
    ]
    return [tokenizer.encode(t) for t in texts]


def solo_greedy(target, drafter, request: Request) -> list[int]:
    tokens, _ = run(
        target,
        drafter,
        list(request.ids),
        request.max_new_tokens,
        eos=request.eos_ids,
        max_draft=request.max_draft,
    )
    return tokens


def mixed_requests(prompts, params=None) -> list[Request]:
    """Mixed budgets, caps and stop tokens (a common token as a stop: some rows stop early)."""
    out = []
    for i, ids in enumerate(prompts):
        eos = {EOS} if i % 3 else {EOS, ids[-1] % 50 + 10}
        cap = [None, 2, 4, 1, 6, 3][i % 6]
        p = params[i] if params else SamplingParams()
        out.append(Request(ids, 10 + 6 * i, p, eos, cap))
    return out


def test_greedy_batch_is_each_request_alone(demo, demo_prompts):
    target, _, drafter = demo
    requests = mixed_requests(demo_prompts)
    alone = [solo_greedy(target, drafter, r) for r in requests]
    # Joining at different steps, and one request cancelled mid-run.
    together = generate_batch(target, drafter, requests, joins=[0, 0, 1, 3, 3, 6])
    assert together == alone
    cut = generate_batch(target, drafter, requests, joins=[0, 2, 0, 0, 5, 1], leaves={1: 6})
    assert [t for i, t in enumerate(cut) if i != 1] == [t for i, t in enumerate(alone) if i != 1]
    assert cut[1] == alone[1][: len(cut[1])]


@pytest.mark.slow
def test_sampled_rows_draw_what_they_draw_alone(demo, demo_prompts):
    target, _, drafter = demo
    params = [
        SamplingParams(temperature=0.8, seed=11),
        SamplingParams(),  # greedy rows mixed in
        SamplingParams(temperature=1.0, top_p=0.9, seed=12),
        SamplingParams(temperature=0.6, top_k=20, seed=13),
        SamplingParams(temperature=1.3, min_p=0.05, seed=14),
        SamplingParams(temperature=0.9, seed=15),
    ]
    requests = mixed_requests(demo_prompts, params)
    alone = [generate_batch(target, drafter, [r])[0] for r in requests]
    assert generate_batch(target, drafter, requests) == alone
    assert generate_batch(target, drafter, requests[::-1], joins=[0, 4, 1, 2, 0, 7]) == alone[::-1]
    # A seed is a request's own stream: another seed draws another text.
    other = Request(requests[0].ids, requests[0].max_new_tokens, SamplingParams(0.8, seed=99))
    assert generate_batch(target, drafter, [other])[0] != alone[0]


def test_chunked_prefill_and_batch_caps_keep_outputs(demo, demo_prompts):
    target, _, drafter = demo
    params = [SamplingParams(temperature=0.7, seed=5)] + [SamplingParams()] * 3
    requests = mixed_requests(demo_prompts[:4], params)
    alone = [generate_batch(target, drafter, [r], prefill_chunk=8)[0] for r in requests]
    greedy = [solo_greedy(target, drafter, r) for r in requests[1:]]
    assert alone[1:] == greedy  # chunk boundaries do not move a greedy output here
    for cap_for in (lambda b: 0, lambda b: 2 if b > 2 else None):
        out = generate_batch(target, drafter, requests, prefill_chunk=8, cap_for=cap_for)
        assert out == alone


def test_plain_batched_decoding_without_drafter(demo, demo_prompts):
    target, _, _ = demo
    requests = [Request(ids, 10, eos_ids={EOS}) for ids in demo_prompts[:3]]
    plain = [greedy_reference(target.model, list(r.ids), 10, {EOS}) for r in requests]
    assert generate_batch(target, None, requests) == plain  # mlx-lm's own decoding


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, mode",
    [
        ("dflash_deepspec_qwen3", "dflash"),
        ("zlab_dflash_qwen3", "dflash"),
        ("eagle3_qwen3", "eagle3"),
    ],
)
def test_every_drafter_kind(case, mode):
    d = FIXTURES / case
    target, tokenizer, drafter, _ = load_pair(
        str(d / "target"), str(d / "drafter"), mode=mode, drafter_bits=16
    )
    assert batched(drafter) == (mode == "dflash")
    prompts = [tokenizer.encode(t) for t in ("Hello there", "The cache", "a b c d e f g h i j")]
    eos = set(tokenizer.eos_token_ids)
    requests = [Request(ids, 14 + 5 * i, eos_ids=eos) for i, ids in enumerate(prompts)]
    out = generate_batch(target, drafter, requests, joins=[0, 1, 2])
    assert out == [solo_greedy(target, drafter, r) for r in requests]
    sampled = [
        Request(r.ids, r.max_new_tokens, SamplingParams(0.9, seed=i), eos, 3)
        for i, r in enumerate(requests)
    ]
    alone = [generate_batch(target, drafter, [r])[0] for r in sampled]
    assert generate_batch(target, drafter, sampled) == alone


def test_refusals_are_one_line(demo):
    target, _, drafter = demo
    decoder = BatchDecoder(target, drafter)
    with pytest.raises(SpecDecError, match="empty"):
        decoder.add(Request([], 4))
    with pytest.raises(SpecDecError, match="max-draft"):
        decoder.add(Request([1, 2], 4, max_draft=99))
    exact_target, _, _, _ = load_pair(mode="baseline")
    exact_target.use_exact()
    with pytest.raises(SpecDecError, match="--exact"):
        BatchDecoder(exact_target, None)


def test_padded_attention_is_each_row_alone():
    """What `rows.BatchKV` relies on: on this backend, one attention call over rows of ragged
    lengths in a padded buffer (masked, stale values in the padding) gives each row bitwise
    its own call's output."""
    import random

    import mlx.core as mx

    rng = random.Random(1)
    mx.random.seed(1)
    for _ in range(20):
        b, t = rng.choice([2, 3, 8]), rng.choice([1, 2, 8])
        lengths = [rng.randint(t, 600) for _ in range(b)]
        used = [rng.randint(1, t) for _ in range(b)]
        width = max(lengths)
        q = mx.random.normal((b, 4, t, 64))
        k, v = mx.random.normal((b, 2, width, 64)), mx.random.normal((b, 2, width, 64))
        at = mx.array([[n - t + i for i in range(t)] for n in lengths])[:, None, :, None]
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=0.125, mask=mx.arange(width) <= at
        )
        for r in range(b):
            n, keys = used[r], lengths[r] - t + used[r]
            alone = mx.fast.scaled_dot_product_attention(
                q[r : r + 1, :, :n],
                k[r : r + 1, :, :keys],
                v[r : r + 1, :, :keys],
                scale=0.125,
                mask="causal" if n > 1 else None,
            )
            assert mx.array_equal(out[r : r + 1, :, :n], alone).item()
