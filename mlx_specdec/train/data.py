"""Training text and batches: the target's own answers to chat prompts or continuations of
corpus snippets (only the generated part is supervised), the data file a run keeps, and the
right-padded batches with their sampled anchors."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import SpecDecError
from ..target import Target
from .options import TrainOptions, progress_bar

CORPUS_SUFFIXES = (".py", ".txt", ".md", ".rst")
DATA_FILE = "train_data.jsonl"  # in the output folder: the generated text, for --resume
# Batches are right-padded to a multiple of this many tokens: every new shape costs a compile
# (tens of seconds on CUDA), so few shapes beat tight padding.
PAD_TO = 128


def read_prompts(file: Path) -> list[Any]:
    """JSONL: a string, {"prompt": str} or {"messages": [...]} per line."""
    prompts = []
    try:
        lines = file.read_text().splitlines()
    except OSError as e:
        raise SpecDecError(f"cannot read --prompts '{file}': {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise SpecDecError(f"{file}:{n} is not valid JSON") from None
        if isinstance(item, dict):
            item = item.get("messages") or item.get("prompt")
        if not isinstance(item, str | list) or not item:
            raise SpecDecError(f"{file}:{n}: expected a string, {{'prompt'}} or {{'messages'}}")
        prompts.append(item)
    if not prompts:
        raise SpecDecError(f"--prompts '{file}' holds no prompts")
    return prompts


def corpus_prompts(root: Path, tokenizer: Any, opts: TrainOptions, rng: random.Random) -> list:
    """Random snippets of `prompt_tokens` tokens from the text files under `root`."""
    files = sorted(p for p in root.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file())
    if not files:
        raise SpecDecError(f"--corpus '{root}' has no {', '.join(CORPUS_SUFFIXES)} files")
    snippets: list[list[int]] = []
    for _ in range(opts.samples * 20):  # give up on corpora too small to yield enough snippets
        if len(snippets) >= opts.samples:
            break
        try:
            text = rng.choice(files).read_text(errors="ignore")
        except OSError:
            continue
        start = rng.randrange(max(1, len(text) - 4 * opts.prompt_tokens))
        ids = tokenizer.encode(text[start : start + 8 * opts.prompt_tokens])
        if len(ids) >= opts.prompt_tokens:
            snippets.append(list(ids[: opts.prompt_tokens]))
    if not snippets:
        raise SpecDecError(f"--corpus '{root}' yielded no snippet of {opts.prompt_tokens} tokens")
    return snippets


def generate_answers(
    target: Target,
    prompts: list[list[int]],
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array],
    eos: list[int],
    batch: int = 64,
    progress: bool = False,
) -> list[list[int]]:
    """The target's answer to each token prompt, ending with its stop token if it stopped.

    Prompts of the same length run together, so a batch needs neither padding nor masks and
    decodes exactly as one prompt alone would (up to batched arithmetic)."""
    from mlx_lm.models.cache import make_prompt_cache

    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    chunks = [ids[s : s + batch] for ids in by_length.values() for s in range(0, len(ids), batch)]
    stop = mx.array(eos or [-1])
    answers: list[list[int]] = [[] for _ in prompts]
    for chunk in progress_bar(chunks, progress, "generating training text"):
        cache = make_prompt_cache(target.model)
        logits = target.model(mx.array([prompts[i] for i in chunk]), cache=cache)[:, -1]
        done = mx.zeros((len(chunk),), mx.bool_)
        steps = []
        for n in range(max_tokens):
            tok = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            steps.append(tok)
            done = done | (tok[:, None] == stop).any(axis=1)
            if n + 1 == max_tokens:
                break
            logits = target.model(tok[:, None], cache=cache)[:, -1]
            if n % 16 == 15 and done.all().item():  # every answer has stopped
                break
        rows = mx.stack(steps, axis=1).tolist()
        for i, row in zip(chunk, rows, strict=True):
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            answers[i] = row[:end]
    return answers


def generate_data(target: Target, tokenizer: Any, opts: TrainOptions) -> list[dict[str, list]]:
    """The target's own text: `{"ids": prompt + answer, "mask": 1 on the answer}` per sample."""
    from mlx_lm.sample_utils import make_sampler

    from ..generate import encode_prompt

    rng = random.Random(opts.seed)
    if opts.prompts:
        raw = read_prompts(Path(opts.prompts))
        prompts = [encode_prompt(tokenizer, p, enable_thinking=False) for p in raw]
        prompts = [list(prompts[i % len(prompts)]) for i in range(opts.samples)]
    elif opts.corpus:
        prompts = corpus_prompts(Path(opts.corpus), tokenizer, opts, rng)
    else:
        raise SpecDecError(
            "train-drafter needs training prompts: --prompts FILE.jsonl or --corpus DIR"
        )
    mx.random.seed(opts.seed)
    sampler = make_sampler(opts.temperature, opts.top_p, top_k=opts.top_k)
    t0 = time.perf_counter()
    eos = sorted(tokenizer.eos_token_ids)
    answers = generate_answers(
        target, prompts, opts.gen_tokens, sampler, eos, opts.gen_batch, opts.progress
    )
    data = [
        {"ids": p + a, "mask": [0] * len(p) + [1] * len(a)}
        for p, a in zip(prompts, answers, strict=True)
    ]
    if opts.log_every and not opts.progress:
        n = sum(len(a) for a in answers)
        print(f"  generated {len(data)} answers, {n} tokens, in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
    return data


def write_data(file: Path, data: list[dict[str, list]]) -> None:
    """The training text as JSONL, one `{"ids", "mask"}` sample per line."""
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(d) + "\n" for d in data))


def read_data(file: Path) -> list[dict[str, list]]:
    """Training text written by `write_data` (an earlier run's, or `--data`)."""
    try:
        data = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise SpecDecError(f"cannot read training data '{file}' ({e})") from None
    if not data or not all(isinstance(d, dict) and {"ids", "mask"} <= set(d) for d in data):
        raise SpecDecError(f"training data '{file}' must hold {{'ids', 'mask'}} lines")
    return data


def make_batch(
    data: list[dict[str, list]], rows: list[int], anchors: int, rng: np.random.Generator
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Right-padded ids/mask [S, T] and per-sequence anchors [S, A] with their validity."""
    seqs = [data[i] for i in rows]
    longest = max(len(s["ids"]) for s in seqs)
    T = -(-longest // PAD_TO) * PAD_TO  # few distinct shapes: less to compile and cache
    ids = np.zeros((len(seqs), T), np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    anc = np.zeros((len(seqs), anchors), np.int32)
    ok = np.zeros((len(seqs), anchors), np.float32)
    for r, s in enumerate(seqs):
        n = len(s["ids"])
        ids[r, :n], mask[r, :n] = s["ids"], s["mask"]
        m = mask[r]
        # An anchor is a generated token whose successor is generated too.
        cand = np.nonzero(m[:-1] & m[1:])[0]
        if len(cand):
            pick = rng.choice(cand, size=min(anchors, len(cand)), replace=False)
            anc[r, : len(pick)], ok[r, : len(pick)] = pick, 1.0
    return mx.array(ids), mx.array(mask), mx.array(anc), mx.array(ok)
