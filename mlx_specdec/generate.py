"""Text in, text out: prompts, detokenized streaming, timing, and the baseline (mlx-lm's own
generation on the same target), around the token loop in `speculate.py`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .autocap import resolve_max_draft
from .cache import cacheable, restore, snapshot_lengths, take_snapshot
from .drafters.base import Drafter
from .errors import SpecDecError
from .prefix_cache import PrefixCache, fingerprint
from .prompts import render_chat
from .recurrent import RecurrentCache
from .sampling import LogitsProcessor, Logprobs, SamplingParams, penalty_processors
from .speculate import Round, Step, speculate
from .target import Target

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
# The pieces of a run (`speculate.Step`: tokens, round, scores); a run is started from caches
# holding `cached` prompt tokens.
Steps = Iterator[Step]


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # generated ids; a final stop token is not included (as in mlx-lm)
    rounds: list[Round]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str  # "stop" or "length"
    mode: str
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)
    prefix_cache: str = "off"  # "hit", "miss", "unsupported" (caches not cuttable) or "off"
    # With logprobs / top_logprobs: one entry per token of `tokens` (see `GenerationChunk`).
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def mean_accept_len(self) -> float:
        """Tokens committed per verify forward, the correction/bonus token included."""
        if not self.rounds:
            return 0.0
        return sum(len(r.committed) for r in self.rounds) / len(self.rounds)

    @property
    def tokens_per_sec(self) -> float:
        """Decode speed: tokens after the first one, over the time after the first one."""
        n = sum(len(r.committed) for r in self.rounds)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def stats_line(self) -> str:
        cached = f", {self.cached_tokens} from cache" if self.cached_tokens else ""
        return (
            f"[{self.mode}] {len(self.tokens)} tokens, mean accept length "
            f"{self.mean_accept_len:.2f}, decode {self.tokens_per_sec:.1f} tok/s, prefill "
            f"{self.prefill_seconds * 1000:.0f} ms ({self.prompt_tokens} prompt tokens{cached})"
        )


@dataclass
class GenerationChunk:
    """A streamed piece: new text and ids; `result` is set on the last chunk only."""

    text: str
    tokens: list[int]
    round: Round | None = None
    result: GenerationResult | None = field(default=None, repr=False)
    # How the prefill went: {"prefix_cache": "hit"|"miss"|..., "cached_tokens": N} (empty when
    # no prefix cache is used); the same on every chunk.
    cache_info: dict[str, Any] = field(default_factory=dict, repr=False)
    # Asked for with `logprobs` / `top_logprobs`, one entry per token of `tokens`: the target's
    # log-probability of the token as plain decoding reports it (mlx-lm's generate_step: the
    # logits after the logits processors, minus their logsumexp; no temperature or top-p),
    # and the `top_logprobs` most likely tokens there, [(id, logprob)] best first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    *,
    chat: bool = True,
    enable_thinking: bool | None = None,
    raw_special: bool = False,
) -> list[int]:
    """A string (chat template applied when the tokenizer has one, unless `chat=False`), a list
    of chat messages, or token ids -> token ids. Message content is text: the template's special
    tokens written in it stay text (`prompts.render_chat`) unless `raw_special`. A plain string
    with chat off is the caller's whole prompt, special tokens included."""
    if isinstance(prompt, str):
        if chat and getattr(tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        else:
            bos = getattr(tokenizer, "bos_token", None)
            special = not (bos and prompt.startswith(bos))
            return list(tokenizer.encode(prompt, add_special_tokens=special))
    prompt = list(prompt)
    if prompt and all(isinstance(t, dict) for t in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise SpecDecError("this tokenizer has no chat template; pass plain text with chat off")
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return render_chat(tokenizer, prompt, template_kwargs=kwargs, raw_special=raw_special).ids
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise SpecDecError(
            "prompt must be a string, a list of chat messages or a list of token ids"
        )
    return prompt


def stream_steps(
    tokenizer: Any,
    steps: Steps,
    prompt_len: int,
    max_new_tokens: int,
    mode: str,
    cache_info: dict[str, Any],
    *,
    leading_space: bool = False,
) -> Iterator[GenerationChunk]:
    """Detokenize steps (`Step`s, or `(tokens, round)` pairs, which carry no scores); time
    prefill (to the first token) and decode. A stop token is not shown, nor are its scores.
    mlx-lm's detokenizer drops the answer's leading space (right for a chat answer);
    `leading_space` keeps it, as a text completion that continues its prompt needs."""
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer
    detok.reset()
    lead = None if leading_space else ""  # what goes before the text; None: not known yet

    def shown_text(segment: str) -> str:
        nonlocal lead
        if lead is None and segment:  # the first text: put back a space the detokenizer trimmed
            trimmed = tokenizer.decode(tokens).startswith(" ") and not segment.startswith(" ")
            lead = " " if trimmed else ""
            return lead + segment
        return segment

    tokens: list[int] = []
    rounds: list[Round] = []
    scores: dict[str, list] = {}  # "logprobs" / "top_logprobs" of the shown tokens, if given
    t0 = time.perf_counter()
    t_first = None
    finish = "length"
    for step in steps:
        step = step if isinstance(step, Step) else Step(*step)
        new, rnd = step.tokens, step.round
        if t_first is None:
            t_first = time.perf_counter()
        if rnd is not None:
            rounds.append(rnd)
        keep = [i for i, t in enumerate(new) if t not in eos]
        shown = [new[i] for i in keep]
        tokens += shown
        for t in shown:
            detok.add_token(t)
        if len(shown) < len(new):
            finish = "stop"
        mine = {
            name: [values[i] for i in keep]
            for name in ("logprobs", "top_logprobs")
            if (values := getattr(step, name)) is not None
        }
        for name, values in mine.items():
            scores.setdefault(name, []).extend(values)
        yield GenerationChunk(
            shown_text(detok.last_segment), shown, rnd, cache_info=cache_info, **mine
        )
    detok.finalize()
    tail = shown_text(detok.last_segment)
    end = time.perf_counter()
    t_first = t_first or end
    result = GenerationResult(
        text=(lead or "") + detok.text,
        tokens=tokens,
        rounds=rounds,
        prompt_tokens=prompt_len,
        prefill_seconds=t_first - t0,
        decode_seconds=end - t_first,
        finish_reason=finish if len(tokens) < max_new_tokens else "length",
        mode=mode,
        **cache_info,
        **scores,
    )
    empty = {name: [] for name in scores}
    yield GenerationChunk(tail, [], None, result, cache_info, **empty)


def stream_speculative_generate(
    target: Target,
    tokenizer: Any,
    drafter: Drafter | None,
    prompt: Prompt,
    *,
    max_new_tokens: int = 256,
    max_draft: int | str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    chat: bool = True,
    enable_thinking: bool | None = None,
    prefix_cache: PrefixCache | None = None,
    cap_cache: str | Path | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    logit_bias: Mapping[int, float] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    penalty_context_size: int = 20,
    logits_processors: Sequence[LogitsProcessor] = (),
    leading_space: bool = False,
) -> Iterator[GenerationChunk]:
    """Stream text pieces as rounds commit them; the last chunk carries the `GenerationResult`.
    With `drafter=None` this is plain decoding through mlx-lm (the baseline). With a
    `prefix_cache`, the longest prompt prefix it holds for this pair is not prefilled again, and
    the caches of a run that ends normally are kept in it. `max_draft`: None =
    the drafter's full block, N = verify the first N drafts, "auto" = the cap cached for this
    model on this machine in the file `cap_cache` (default `autocap.cache_file()`), measured once
    (a few seconds) when none is (`autocap.auto_max_draft`).

    `logprobs=True` puts on every chunk the target's log-probability of each token, and
    `top_logprobs=N` the N most likely tokens at each position too (see `GenerationChunk`);
    they equal what plain decoding reports. `logit_bias` ({token id: added logit}),
    `presence_penalty`, `frequency_penalty` and `repetition_penalty` are mlx-lm's logits
    processors, each penalty over the last `penalty_context_size` tokens (prompt included;
    mlx-lm's default 20); `logits_processors` adds any others of mlx-lm's signature, applied
    after them. Every verify row sees the tokens plain decoding sees there, so the output is
    still exactly plain decoding's with the same processors. `leading_space` as in
    `stream_steps`."""
    params = SamplingParams(temperature, top_p, top_k, min_p, seed)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
        raise SpecDecError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
    report = top_logprobs if logprobs or top_logprobs else None
    processors = penalty_processors(
        target.vocab_size,
        logit_bias=logit_bias,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        context_size=penalty_context_size,
    ) + list(logits_processors)
    if max_new_tokens < 1:
        raise SpecDecError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = encode_prompt(tokenizer, prompt, chat=chat, enable_thinking=enable_thinking)
    if not ids:
        raise SpecDecError("the prompt is empty")
    if max_draft == "auto" and drafter is not None and not drafter.tap_ids:
        max_draft = None  # no taps (lookup): no drafter cost to model; it sizes its own rounds
    if isinstance(max_draft, str):
        max_draft = resolve_max_draft(target, drafter, max_draft, cap_cache=cap_cache)
    eos = set(tokenizer.eos_token_ids)
    mode = drafter.kind if drafter else "baseline"

    def run(cache: list[Any] | None, drafter_state: Any, cached: int) -> Steps:
        extra = dict(logits_processors=processors, logprobs=report)
        if drafter is None:
            return baseline_steps(target, ids, max_new_tokens, params, eos, cache, cached, **extra)
        return speculate(
            target,
            drafter,
            ids,
            max_new_tokens=max_new_tokens,
            max_draft=max_draft,
            params=params,
            eos_ids=eos,
            cache=cache,
            drafter_state=drafter_state,
            cached=cached,
            **extra,
        )

    info: dict[str, Any] = {}
    if prefix_cache is None:
        steps = run(None, None, 0)
    else:
        marks = _marks(tokenizer)
        steps = _reusing_prefix(prefix_cache, target, drafter, ids, run, info, marks)
    return stream_steps(
        tokenizer, steps, len(ids), max_new_tokens, mode, info, leading_space=leading_space
    )


def _marks(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special and added tokens: what chat templates mark turns with."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset([*getattr(tokenizer, "all_special_ids", []), *added])


def turn_start(ids: Sequence[int], marks: frozenset[int]) -> int:
    """Where a chat prompt's last turn (its generation prompt) starts: at the last of the turn
    delimiters, the marker tokens (special or added) that occur most often, if more than once;
    0 when there are none. The prompt up to there is a prefix of the conversation's next turn,
    which renders the answer after it (the generation prompt itself may not be: an empty think
    block, say, is not kept in the history)."""
    counts = Counter(t for t in ids if t in marks)
    most = max(counts.values(), default=0)
    if most < 2:
        return 0
    return next(p for p in range(len(ids) - 1, -1, -1) if counts[ids[p]] == most)


def _reusing_prefix(
    prefix_cache: PrefixCache,
    target: Target,
    drafter: Drafter | None,
    ids: list[int],
    run: Any,
    info: dict[str, Any],
    marks: frozenset[int] = frozenset(),
) -> Steps:
    """`run` from the longest cached prefix of `ids`; when it ends normally, keep the positions
    both its caches hold. A run that fails drops the entry it started from; one that is closed
    early (cancelled) keeps nothing more, as its caches may hold uncommitted rows.

    A hybrid target's recurrent layers hold a state at exact positions only, so its entries are
    restored whole, and a run keeps two: where the prompt's last turn starts (`turn_start`,
    with `marks` the tokenizer's marker tokens; else all but its last token), taken once the
    first token is out, which the conversation's next turn and a retry start with; and the end
    of the run."""
    # Plain decoding is mlx-lm's own step: one-row attention, which padding would only slow.
    target_cache = target.make_cache(padded=False if drafter is None else None)
    drafter_state = drafter.new_state(target.padded_attention) if drafter is not None else []
    if not (cacheable(target_cache) and cacheable(drafter_state)):
        info["prefix_cache"] = "unsupported"
        yield from run(target_cache, drafter_state, 0)
        return
    recurrent = [c for c in target_cache if isinstance(c, RecurrentCache)]
    # Our prefill ends a chunk wherever a snapshot is wanted; mlx-lm's (the baseline) ends one
    # before the last token only.
    first_entry = (turn_start(ids, marks) if drafter is not None else 0) or len(ids) - 1
    for c in recurrent:
        c.keep(first_entry)
    owner = fingerprint(target, drafter)
    found = prefix_cache.fetch(owner, ids)
    cached = 0
    if found is not None:
        try:
            restore(found[0], found[1], [*target_cache, *drafter_state])
            cached = found[1]
        except SpecDecError:  # not this pair's layout: never reuse it
            prefix_cache.drop(found[0])
            found = None
    info.update(prefix_cache="hit" if found else "miss", cached_tokens=cached)

    def keep(tokens: list[int], at: int | None = None) -> None:
        """Store the longest snapshot both caches can give (or the one at `at`, if they can)."""
        lengths = snapshot_lengths(tokens, [*target_cache, *drafter_state])
        n = at if at in lengths else (lengths[-1] if lengths and at is None else 0)
        if n > cached:  # a run that ended at its first token may not have fed the drafter
            prefix_cache.store(take_snapshot(owner, tokens[:n], target_cache, drafter_state))

    tokens = list(ids)
    try:
        for step in run(target_cache, drafter_state or None, cached):
            tokens += step.tokens
            yield step
            if recurrent and step.round is None:
                keep(ids, first_entry)
    except Exception:
        if found is not None:
            prefix_cache.drop(found[0])
        raise
    keep(tokens)


def speculative_generate(
    target: Target, tokenizer: Any, drafter: Drafter | None, prompt: Prompt, **kwargs: Any
) -> GenerationResult:
    """Generate and return the whole `GenerationResult` (`.text`, `.tokens`, `.rounds`,
    `.mean_accept_len`, `.tokens_per_sec`). Keyword arguments as `stream_speculative_generate`."""
    *_, last = stream_speculative_generate(target, tokenizer, drafter, prompt, **kwargs)
    return last.result


def baseline_steps(
    target: Target,
    ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos: set[int],
    cache: list[Any] | None = None,
    cached: int = 0,
    logits_processors: Sequence[LogitsProcessor] = (),
    logprobs: int | None = None,
) -> Steps:
    """mlx-lm's own `generate_step` on the same target: the official baseline, one token a step
    (on top of `cache` holding the first `cached` prompt tokens, if given), with its logits
    processors and its log-probabilities (`logprobs`: None, or how many top ones)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    if params.seed is not None:
        mx.random.seed(params.seed)
    sampler = make_sampler(params.temperature, params.top_p, params.min_p, top_k=params.top_k)
    # generate_step's processors see the tokens it is given: add the cached ones in front.
    before = mx.array(ids[:cached], mx.int32)
    processors = [_after(before, p) for p in logits_processors] if cached else logits_processors
    gen = generate_step(
        mx.array(ids[cached:]),
        target.model,
        max_tokens=max_new_tokens,
        sampler=sampler,
        logits_processors=list(processors) or None,
        prompt_cache=cache,
    )
    for i, (token, row) in enumerate(gen):
        token = int(token)
        scores = (None, None)
        if logprobs is not None:
            scores = Logprobs.of(row[None], mx.array([token]), logprobs).read(1)
        yield Step([token], None if i == 0 else Round([], 0, [token]), False, *scores)
        if token in eos:
            break


def _after(before: mx.array, processor: LogitsProcessor) -> LogitsProcessor:
    return lambda tokens, logits: processor(mx.concatenate([before, tokens]), logits)


def baseline_generate(
    target: Target, tokenizer: Any, prompt: Prompt, **kwargs: Any
) -> GenerationResult:
    """Plain decoding with mlx-lm on the same target (what `--compare` races against)."""
    return speculative_generate(target, tokenizer, None, prompt, **kwargs)
