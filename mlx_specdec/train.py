"""`mlx-specdec train-drafter`: the DeepSpec recipe (dspark-spec.md §7) at small scale, in MLX.

1. Training text is made by the target itself: its answers to chat prompts (`--prompts`) or its
   continuations of snippets of a text corpus (`--corpus`). Only the generated part is supervised.
2. Each step runs the frozen target over a batch of sequences once; that single pass gives both
   the taps the drafter reads and the target distribution it is taught to match.
3. Anchors are sampled per sequence; each anchor opens a block `[anchor, mask, ..., mask]` that
   sees the context strictly before the anchor and itself bidirectionally, exactly as at
   inference. All blocks of a batch run in one forward.
4. Losses per slot k, weighted by exp(-k/4): DSpark 0.1·CE + 0.9·L1(draft, target) + BCE of the
   confidence head against 1 - L1/2; DFlash CE only. AdamW, linear warm-up then cosine decay,
   gradient clipping at 1.0. Embedding and output head are frozen copies of the target's.

The result loads with `--drafter DIR` like a downloaded checkpoint: `--kind dspark` writes
DeepSpec's layout (config = target config + DSpark keys, flat tensor names, safetensors);
`--kind dflash` writes z-lab's `DFlashDraftModel` (no embedding or head of its own, the DFlash keys
in `dflash_config`, a block of the anchor row plus one mask row per draft, row k predicting the
token at anchor + k), or with `--layout deepspec` DeepSpec's DFlash (`Qwen3DSparkModel` with
`markov_rank` 0 and no confidence head). Both DFlash layouts train the same backbone; z-lab's
block has one more row (its anchor row predicts nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .drafters.dspark import DSparkConfig, DSparkDrafter
from .drafters.layers import rope_theta
from .errors import SpecDecError
from .target import Target

HELP = "train a DSpark or DFlash drafter for a target (DeepSpec recipe, in MLX)"
LOSS_DECAY = 4.0  # slot k weighs exp(-k / LOSS_DECAY)
CORPUS_SUFFIXES = (".py", ".txt", ".md", ".rst")
STATE_DIR = "train_state"
TRAINED_AS = "drafter.json"  # in STATE_DIR: the training config and checkpoint layout
# Batches are right-padded to a multiple of this many tokens: every new shape costs a compile
# (tens of seconds on CUDA), so few shapes beat tight padding.
PAD_TO = 128
DATA_FILE = "train_data.jsonl"
# How a checkpoint is written: DeepSpec's (`Qwen3DSparkModel`; DSpark, or DFlash as the same class
# without Markov and confidence heads) or z-lab's DFlash (`DFlashDraftModel`).
LAYOUTS = {"dspark": ("deepspec",), "dflash": ("zlab", "deepspec")}  # first: the default


@dataclass
class TrainOptions:
    model: str
    out: str
    kind: str = "dspark"
    layout: str | None = None  # checkpoint layout: see LAYOUTS (default: the kind's own)
    prompts: str | None = None
    corpus: str | None = None
    steps: int = 1000
    resume: bool = False
    data: str | None = None  # a train_data.jsonl written by an earlier run: skip generating
    samples: int = 512  # generated training sequences
    gen_tokens: int = 192  # tokens the target generates per sequence
    prompt_tokens: int = 64  # corpus mode: length of each snippet the target continues
    temperature: float = 0.7  # generation sampling (DeepSpec: Qwen3's T 0.7, top-p 0.8, top-k 20)
    top_p: float = 0.8
    top_k: int = 20
    gen_batch: int = 64  # sequences the target generates at once
    batch_size: int = 8  # sequences per step
    anchors: int = 32  # blocks per sequence
    block_size: int = 7
    draft_layers: int = 5
    # The draft layers' own attention heads, KV heads and MLP width (default: the target's).
    draft_heads: int | None = None
    draft_kv_heads: int | None = None
    draft_intermediate: int | None = None
    markov_rank: int = 256
    taps: list[int] | None = None
    mask_token_id: int | None = None
    lr: float = 6e-4
    ce_weight: float = 0.1  # DSpark: ce_weight * CE + (1 - ce_weight) * L1 (+ confidence BCE)
    warmup: float = 0.04
    save_every: int = 200
    dtype: str = "bfloat16"  # of the written checkpoint (DeepSpec writes bf16)
    seed: int = 0
    progress: bool = True
    compile: bool = True  # mx.compile the training step
    log_every: int = 0  # without a progress bar: print a line every this many steps (0: never)


@dataclass
class TrainResult:
    out: Path
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    accepts: list[float] = field(default_factory=list)  # greedy accept length per step (this run)


# ------------------------------------------------------------------------------------ config
def default_taps(num_layers: int) -> list[int]:
    """Five increasing layers spread over depth, never the last (DeepSpec: 1,9,17,25,33 of 36)."""
    if num_layers < 2:
        raise SpecDecError("the target needs at least 2 layers to feed a drafter")
    if num_layers <= 6:
        return list(range(num_layers - 1))
    return sorted({round(1 + i * (num_layers - 4) / 4) for i in range(5)})


def pick_mask_token(tokenizer: Any, vocab_rows: int) -> int:
    """An id the target never produces: a mask token of the tokenizer, else a padding row."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in ("<|mask|>", "<mask>", "[MASK]"):
        if name in vocab and vocab[name] < vocab_rows:
            return int(vocab[name])
    if len(vocab) < vocab_rows:
        return len(vocab)  # Qwen3 style: the first embedding row past the tokenizer
    raise SpecDecError(
        "the target has no mask token and no spare embedding row; pass --mask-token-id ID "
        "(an id the model never generates)"
    )


def drafter_config(target: Target, tokenizer: Any, opts: TrainOptions) -> dict[str, Any]:
    """The target's config plus the DSpark keys, as DeepSpec's trainer writes it (§3.2)."""
    if target.model_type != "qwen3" or "text_config" in target.config:
        raise SpecDecError(
            f"train-drafter supports Qwen3 targets, not model type '{target.model_type}'"
        )
    config = copy.deepcopy(target.config)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)  # the drafter is written in full precision
    taps = opts.taps or default_taps(target.num_layers)
    mask_id = opts.mask_token_id
    if mask_id is None:
        mask_id = pick_mask_token(tokenizer, target.vocab_size)
    if not 0 <= mask_id < target.vocab_size:
        raise SpecDecError(f"--mask-token-id must be in 0..{target.vocab_size - 1}, got {mask_id}")
    dspark = opts.kind == "dspark"
    rank = min(opts.markov_rank, target.vocab_size) if dspark else 0
    config.update(
        architectures=["Qwen3DSparkModel"],
        num_hidden_layers=opts.draft_layers,
        num_target_layers=target.num_layers,
        block_size=opts.block_size,
        mask_token_id=mask_id,
        target_layer_ids=taps,
        num_anchors=opts.anchors,
        enable_confidence_head=dspark,
        markov_rank=rank,
        tie_word_embeddings=False,
        vocab_size=target.vocab_size,
        layer_types=["full_attention"] * opts.draft_layers,
    )
    widths = {"--draft-heads": opts.draft_heads, "--draft-kv-heads": opts.draft_kv_heads,
              "--draft-intermediate": opts.draft_intermediate}  # fmt: skip
    for flag, value in widths.items():
        if value is not None and value < 1:
            raise SpecDecError(f"{flag} must be >= 1, got {value}")
    if opts.draft_heads:
        config["num_attention_heads"] = opts.draft_heads
        config.setdefault(
            "head_dim", target.hidden_size // int(target.config["num_attention_heads"])
        )
    if opts.draft_kv_heads or opts.draft_heads:
        config["num_key_value_heads"] = opts.draft_kv_heads or config["num_attention_heads"]
    if opts.draft_intermediate:
        config["intermediate_size"] = opts.draft_intermediate
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    if heads % kv_heads:
        raise SpecDecError(
            f"--draft-heads ({heads}) must be a multiple of --draft-kv-heads ({kv_heads})"
        )
    if dspark:
        config.update(confidence_head_with_markov=True, markov_head_type="vanilla")
    for key in ("confidence_head_with_markov", "markov_head_type"):
        if not dspark:
            config.pop(key, None)
    return config


def _full_weight(module: nn.Module) -> mx.array:
    """A full-precision copy of an Embedding/Linear weight, dequantizing a quantized one."""
    if isinstance(module, nn.QuantizedEmbedding | nn.QuantizedLinear):
        return mx.dequantize(
            module.weight, module.scales, module.biases, module.group_size, module.bits
        )
    return module.weight


def init_drafter(target: Target, config: dict[str, Any]) -> DSparkDrafter:
    """A fresh fp32 drafter whose embedding and head are frozen copies of the target's."""
    drafter = DSparkDrafter(DSparkConfig.from_dict(config))
    drafter.set_dtype(mx.float32)
    drafter.embed_tokens.weight = _full_weight(target.embed_tokens).astype(mx.float32)
    drafter.lm_head.weight = _full_weight(target.head_module).astype(mx.float32)
    drafter.embed_tokens.freeze()
    drafter.lm_head.freeze()
    mx.eval(drafter.parameters())
    return drafter


# ------------------------------------------------------------------------------------ data
def _read_prompts(file: Path) -> list[Any]:
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


def _corpus_prompts(root: Path, tokenizer: Any, opts: TrainOptions, rng: random.Random) -> list:
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
    for chunk in _bar(chunks, progress, "generating training text"):
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

    from .generate import encode_prompt

    rng = random.Random(opts.seed)
    if opts.prompts:
        raw = _read_prompts(Path(opts.prompts))
        prompts = [encode_prompt(tokenizer, p, enable_thinking=False) for p in raw]
        prompts = [list(prompts[i % len(prompts)]) for i in range(opts.samples)]
    elif opts.corpus:
        prompts = _corpus_prompts(Path(opts.corpus), tokenizer, opts, rng)
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


def _read_data(file: Path) -> list[dict[str, list]]:
    try:
        data = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise SpecDecError(f"cannot read training data '{file}' ({e})") from None
    if not data or not all(isinstance(d, dict) and {"ids", "mask"} <= set(d) for d in data):
        raise SpecDecError(f"training data '{file}' must hold {{'ids', 'mask'}} lines")
    return data


# ------------------------------------------------------------------------------------ model
def _rope(x: mx.array, positions: mx.array, base: float) -> mx.array:
    """Rotate-half RoPE (nn.RoPE with traditional=False) at explicit positions [S, L]."""
    half = x.shape[-1] // 2
    inv = base ** (-mx.arange(0, half, dtype=mx.float32) / half)
    angles = positions.astype(mx.float32)[:, None, :, None] * inv
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _heads(x: mx.array, n: int, d: int) -> mx.array:
    return x.reshape(x.shape[0], x.shape[1], n, d).transpose(0, 2, 1, 3)


def _layer(
    layer: Any,
    x: mx.array,
    ctx: mx.array,
    pos: mx.array,
    ctx_pos: mx.array,
    bias: mx.array,
    cfg: DSparkConfig,
) -> mx.array:
    """One draft layer over all blocks of a batch at once. Same weights and maths as
    `InjectedAttention` at inference, but with per-row positions and a block mask instead of a
    cache (training sees every anchor's context at the same time)."""
    s = cfg.shape
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    q = _rope(attn.q_norm(_heads(attn.q_proj(xn), s.num_heads, s.head_dim)), pos, s.rope_theta)

    def kv(h: mx.array, p: mx.array) -> tuple[mx.array, mx.array]:
        k = _rope(attn.k_norm(_heads(attn.k_proj(h), s.num_kv_heads, s.head_dim)), p, s.rope_theta)
        return k, _heads(attn.v_proj(h), s.num_kv_heads, s.head_dim)

    kc, vc = kv(ctx, ctx_pos)
    kb, vb = kv(xn, pos)
    k, v = mx.concatenate([kc, kb], axis=2), mx.concatenate([vc, vb], axis=2)
    rep = s.num_heads // s.num_kv_heads
    if rep > 1:
        k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    scores = (q * (s.head_dim**-0.5)) @ k.transpose(0, 1, 3, 2) + bias
    out = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype) @ v
    out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    x = x + attn.o_proj(out)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def block_forward(
    drafter: DSparkDrafter, taps: mx.array, ids: mx.array, anchors: mx.array, zlab: bool = False
) -> tuple[mx.array, mx.array | None]:
    """Draft logits (Markov-corrected, teacher-forced) and confidence logits of every block.

    taps [S, T, m*H], ids [S, T], anchors [S, A] -> logits [S, A, B, V], confidence [S, A, B].
    `zlab`: z-lab's block, one row longer, whose rows 1..B give the B drafts (DFlash only).
    """
    cfg = drafter.config
    if zlab and (cfg.markov_rank or cfg.confidence_head):
        raise SpecDecError("z-lab's layout is DFlash's: no Markov or confidence head")
    S, T = ids.shape
    A, drafts = anchors.shape[1], cfg.block_size
    B = drafts + 1 if zlab else drafts  # rows per block
    offs = mx.arange(B)
    pos = (anchors[:, :, None] + offs).reshape(S, A * B)  # slot j of anchor p sits at p + j
    block = mx.concatenate(
        [
            mx.take_along_axis(ids, anchors, axis=1)[:, :, None],
            mx.full((S, A, B - 1), cfg.mask_token_id, ids.dtype),
        ],
        axis=2,
    ).reshape(S, A * B)
    # Block row (a, j) sees context rows t < p_a and the B rows of its own block.
    row_anchor = mx.repeat(anchors, B, axis=1)  # [S, A*B]
    see_ctx = mx.arange(T)[None, None, :] < row_anchor[:, :, None]
    blk = mx.repeat(mx.arange(A), B)
    see_blk = mx.broadcast_to((blk[:, None] == blk[None, :])[None], (S, A * B, A * B))
    visible = mx.concatenate([see_ctx, see_blk], axis=2)[:, None]
    bias = mx.where(visible, 0.0, -1e9).astype(mx.float32)

    ctx = drafter.hidden_norm(drafter.fc(taps))
    ctx_pos = mx.broadcast_to(mx.arange(T)[None], (S, T))
    x = drafter.embed_tokens(block)
    for layer in drafter.layers:
        x = _layer(layer, x, ctx, pos, ctx_pos, bias, cfg)
    h = drafter.norm(x)
    logits = drafter.lm_head(h)
    conf = None
    if cfg.markov_rank:
        # Teacher forcing: slot j's previous token is the true token at p + j (the anchor for 0).
        prev = mx.take_along_axis(ids, mx.minimum(pos, T - 1), axis=1)
        e = drafter.markov_head.markov_w1(prev)
        logits = logits + drafter.markov_head.markov_w2(e)
        if cfg.confidence_head:
            feats = mx.concatenate([h, e], axis=-1) if cfg.confidence_with_markov else h
            conf = drafter.confidence_head.proj(feats)[..., 0].reshape(S, A, B)
    logits = logits.reshape(S, A, B, -1)
    return (logits[:, :, 1:] if zlab else logits), conf


def block_loss(
    drafter: DSparkDrafter,
    taps: mx.array,
    target_logits: mx.array,
    ids: mx.array,
    mask: mx.array,
    anchors: mx.array,
    anchor_ok: mx.array,
    ce_weight: float = 0.1,
    zlab: bool = False,
) -> tuple[mx.array, mx.array]:
    """The DeepSpec loss of a batch (see the module docstring), and the greedy accept length
    of its complete blocks (drafts the target's argmax agrees with, in a row, plus the bonus).

    With greedy training text the accept length is exactly what greedy decoding would get at
    those anchors with the full block: the teacher-forced Markov inputs are then the drafts."""
    cfg = drafter.config
    S, T = ids.shape
    B = cfg.block_size
    logits, conf = block_forward(drafter, taps, ids, anchors, zlab)
    label_pos = anchors[:, :, None] + mx.arange(1, B + 1)  # slot j predicts p + j + 1
    in_range = label_pos < T
    flat = mx.minimum(label_pos, T - 1).reshape(S, -1)
    labels = mx.take_along_axis(ids, flat, axis=1).reshape(label_pos.shape)
    supervised = mx.take_along_axis(mask, flat, axis=1).reshape(label_pos.shape) * in_range
    # Only the contiguous supervised prefix of each block counts.
    valid = mx.cumprod(supervised.astype(mx.float32), axis=2) * anchor_ok[:, :, None]
    w = mx.exp(-mx.arange(B, dtype=mx.float32) / LOSS_DECAY) * valid
    norm = mx.maximum(w.sum(), 1e-6)

    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    ce = -mx.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    # Target distribution for the token at p + j + 1 is the target's output at row p + j.
    t_rows = mx.minimum(anchors[:, :, None] + mx.arange(B), T - 1).reshape(S, -1)
    t_logits = mx.take_along_axis(target_logits, t_rows[..., None], axis=1).reshape(logp.shape)
    hit = (mx.argmax(logits, axis=-1) == mx.argmax(t_logits, axis=-1)).astype(mx.float32)
    full = valid[..., -1]
    accept = ((mx.cumprod(hit, axis=2).sum(axis=2) + 1) * full).sum() / mx.maximum(full.sum(), 1)
    accept = mx.stop_gradient(accept)
    if not cfg.markov_rank:  # DFlash: CE only
        return (w * ce).sum() / norm, accept
    p_t = mx.softmax(t_logits.astype(mx.float32), axis=-1)
    l1 = mx.abs(mx.exp(logp) - p_t).sum(axis=-1)
    loss = ce_weight * (w * ce).sum() / norm + (1 - ce_weight) * (w * l1).sum() / norm
    if conf is not None:
        c_star = mx.stop_gradient(mx.clip(1.0 - 0.5 * l1, 0.0, 1.0))
        bce = nn.losses.binary_cross_entropy(conf.astype(mx.float32), c_star, reduction="none")
        loss = loss + (w * bce).sum() / norm
    return loss, accept


def target_pass(target: Target, ids: mx.array) -> tuple[mx.array, mx.array]:
    """One frozen target forward over the whole batch: (logits [S, T, V], taps [S, T, m*H]).

    Rows are right-padded, so a causal mask keeps every real row exact."""
    sink = target._sink  # the tapped layers record their outputs here during the forward
    sink.values.clear()
    h = target.inner(ids, cache=None)
    taps = mx.concatenate([sink.values[i] for i in target.tap_ids], axis=-1)
    sink.values.clear()
    return mx.stop_gradient(target.head(h)), mx.stop_gradient(taps)


# ------------------------------------------------------------------------------------ batches
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


# ------------------------------------------------------------------------------------ checkpoints
def _bar(it: Any, enabled: bool, desc: str, total: int | None = None, initial: int = 0) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, dynamic_ncols=True)


def zlab_layout(
    config: dict[str, Any], weights: dict[str, mx.array]
) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """A DeepSpec DFlash config and weights as z-lab's `DFlashDraftModel`: the DFlash keys move
    into `dflash_config`, the block gains the anchor row, the target's embedding and head (which
    z-lab always reads from the target) are not stored."""
    deepspec = ("block_size", "mask_token_id", "target_layer_ids", "num_anchors",
                "enable_confidence_head", "markov_rank")  # fmt: skip
    zlab = {k: v for k, v in config.items() if k not in deepspec}
    # Plain RoPE, as trained (z-lab's loader would apply a target's YaRN & co.).
    zlab.pop("rope_scaling", None)
    zlab.pop("rope_parameters", None)
    zlab.update(
        rope_theta=rope_theta(config),
        architectures=["DFlashDraftModel"],
        block_size=config["block_size"] + 1,
        dflash_config={
            "mask_token_id": config["mask_token_id"],
            "target_layer_ids": config["target_layer_ids"],
        },
    )
    own = {k: v for k, v in weights.items() if not k.startswith(("embed_tokens.", "lm_head."))}
    return zlab, own


def write_checkpoint(
    drafter: DSparkDrafter, config: dict[str, Any], out: Path, dtype: str, layout: str
) -> None:
    """config.json + model.safetensors in the given layout (flat names, no `model.` prefix)."""
    out.mkdir(parents=True, exist_ok=True)
    cast = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[dtype]
    weights = {k: v.astype(cast) for k, v in tree_flatten(drafter.parameters())}
    if layout == "zlab":
        config, weights = zlab_layout(config, weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(config, torch_dtype=dtype), indent=2) + "\n")


def _save_state(
    out: Path,
    drafter: DSparkDrafter,
    opt: optim.Optimizer,
    step: int,
    losses: list[float],
    opts: TrainOptions,
) -> None:
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(state / "drafter.safetensors"), dict(tree_flatten(drafter.parameters()))
    )
    mx.save_safetensors(str(state / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    info = {"step": step, "losses": losses, "options": asdict(opts)}
    (state / "progress.json").write_text(json.dumps(info) + "\n")


def _load_state(out: Path, drafter: DSparkDrafter, opt: optim.Optimizer) -> tuple[int, list[float]]:
    state = out / STATE_DIR
    try:
        info = json.loads((state / "progress.json").read_text())
        drafter.load_weights(list(mx.load(str(state / "drafter.safetensors")).items()))
        opt.state = tree_unflatten(list(mx.load(str(state / "optimizer.safetensors")).items()))
    except (OSError, ValueError, KeyError) as e:
        raise SpecDecError(
            f"cannot resume from '{state}' ({e}); start again without --resume"
        ) from None
    return int(info["step"]), list(info["losses"])


# ------------------------------------------------------------------------------------ training
def schedule(opts: TrainOptions) -> Callable[[mx.array], mx.array]:
    warm = max(1, round(opts.warmup * opts.steps))
    return optim.join_schedules(
        [
            optim.linear_schedule(opts.lr / warm, opts.lr, warm),
            optim.cosine_decay(opts.lr, max(1, opts.steps - warm), 0.0),
        ],
        [warm],
    )


def _saved_config(out: Path, opts: TrainOptions) -> tuple[dict[str, Any], str]:
    """The training config and layout of the run saved in `out`, checked against `opts`."""
    saved = out / STATE_DIR / TRAINED_AS
    if saved.is_file():
        info = json.loads(saved.read_text())
        config, layout = info["config"], info["layout"]
    else:  # a state written before layouts: DeepSpec's, config.json as trained
        config, layout = json.loads((out / "config.json").read_text()), "deepspec"
        if config.get("architectures") != ["Qwen3DSparkModel"]:
            raise SpecDecError(f"--resume: '{out}/{STATE_DIR}' lacks {TRAINED_AS}")
    kind = "dspark" if config.get("enable_confidence_head") else "dflash"
    if opts.kind != kind:
        raise SpecDecError(f"--resume: '{out}' holds a {kind} drafter; pass --kind {kind}")
    if opts.layout and opts.layout != layout:
        raise SpecDecError(
            f"--resume: '{out}' was trained for the {layout} layout, not {opts.layout}"
        )
    return config, layout


def train_drafter(
    opts: TrainOptions, target: Target | None = None, tokenizer: Any = None
) -> TrainResult:
    """Generate data (once), train, and write the checkpoint to `opts.out`."""
    if opts.kind not in ("dspark", "dflash"):
        raise SpecDecError(f"--kind must be dspark or dflash, got '{opts.kind}'")
    if min(opts.steps, opts.batch_size, opts.anchors, opts.gen_batch) < 1 or opts.block_size < 2:
        raise SpecDecError(
            "--steps, --batch-size, --anchors, gen_batch must be >= 1 and --block-size >= 2"
        )
    out = Path(opts.out)
    layout = opts.layout or LAYOUTS[opts.kind][0]
    if layout not in LAYOUTS[opts.kind]:
        raise SpecDecError(
            f"--layout {layout} is not a {opts.kind} layout; use {' or '.join(LAYOUTS[opts.kind])}"
        )
    resuming = opts.resume and (out / STATE_DIR / "progress.json").is_file()
    if opts.resume and not resuming:
        raise SpecDecError(f"--resume: '{out}' holds no training state ({STATE_DIR}/)")
    if not opts.resume and (out / STATE_DIR / "progress.json").is_file():
        raise SpecDecError(
            f"'{out}' holds the state of an earlier run: pass --resume to continue it, or "
            "choose another --out"
        )
    if resuming:
        config, layout = _saved_config(out, opts)
    if target is None:
        from .loading import load_target

        target, tokenizer = load_target(opts.model)
    if target.stand_ins:  # a compiled step cannot read the stand-ins' shared RoPE tables
        target = Target(target.model, target.config, name=target.name, stand_ins=False)
    if not resuming:
        config = drafter_config(target, tokenizer, opts)
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        (out / STATE_DIR / TRAINED_AS).write_text(
            json.dumps({"config": config, "layout": layout}) + "\n"
        )
    mx.random.seed(opts.seed)
    drafter = init_drafter(target, config)
    target.set_taps(drafter.tap_ids)

    data_file = out / DATA_FILE
    if opts.data or (data_file.is_file() and opts.resume):
        data = _read_data(Path(opts.data) if opts.data else data_file)
    else:
        data = generate_data(target, tokenizer, opts)
        out.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(d) + "\n" for d in data))
    if not any(sum(d["mask"]) > 1 for d in data):
        raise SpecDecError("the target generated no usable training text (every answer was empty)")

    opt = optim.AdamW(learning_rate=schedule(opts), weight_decay=0.0)
    step, losses = 0, []
    if resuming:
        step, losses = _load_state(out, drafter, opt)
    else:
        write_checkpoint(drafter, config, out, opts.dtype, layout)

    loss_and_grad = nn.value_and_grad(drafter, block_loss)
    zlab = layout == "zlab"
    state = [drafter.state, opt.state, mx.random.state, target.model.state]

    def train_step(*batch: mx.array) -> tuple[mx.array, mx.array]:
        ids = batch[0]
        logits, taps = target_pass(target, ids)
        (loss, accept), grads = loss_and_grad(drafter, taps, logits, *batch, opts.ce_weight, zlab)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(drafter, grads)
        return loss, accept

    if opts.compile:  # one graph per padded batch shape: far fewer kernel launches
        train_step = mx.compile(train_step, inputs=state, outputs=state)

    rng = np.random.default_rng(opts.seed + step)
    order: list[int] = []
    bar = _bar(range(step, opts.steps), opts.progress, f"training {opts.kind}", opts.steps, step)
    tokens, t0 = 0, time.perf_counter()
    accepts: list[float] = []
    for step in bar:
        if len(order) < opts.batch_size:
            order += list(rng.permutation(len(data)))
        rows, order = order[: opts.batch_size], order[opts.batch_size :]
        batch = make_batch(data, rows, opts.anchors, rng)
        loss, accept = train_step(*batch)
        mx.eval(loss, accept, drafter.parameters(), opt.state)
        losses.append(float(loss.item()))
        accepts.append(float(accept.item()))
        tokens += int(batch[0].size)
        done = step + 1
        if opts.progress or (opts.log_every and done % opts.log_every == 0):
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            recent = accepts[-20:]
            shown = {
                "loss": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                "accept": f"{sum(recent) / len(recent):.2f}",
                "tok_s": f"{rate:.0f}",
            }
            if opts.progress:
                bar.set_postfix(shown)
            else:
                print(f"  {opts.kind} step {done}/{opts.steps} "
                      + " ".join(f"{k} {v}" for k, v in shown.items()), flush=True)  # fmt: skip
        if done % opts.save_every == 0 or done == opts.steps:
            _save_state(out, drafter, opt, done, losses, opts)
            write_checkpoint(drafter, config, out, opts.dtype, layout)
    return TrainResult(out=out, losses=losses, steps_done=opts.steps, accepts=accepts)


# ------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainOptions(model="", out="")
    p.add_argument("--model", required=True, help="target: Hugging Face repo id or local folder")
    p.add_argument("--kind", choices=["dspark", "dflash"], default="dspark")
    p.add_argument(
        "--layout",
        choices=["deepspec", "zlab"],
        help="checkpoint layout (dspark: deepspec; dflash: zlab, z-lab's DFlashDraftModel, "
        "the default, or deepspec)",
    )
    p.add_argument("--out", required=True, help="folder for the drafter checkpoint")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="JSONL of chat prompts the target answers")
    src.add_argument("--corpus", help="folder of text files whose snippets the target continues")
    src.add_argument("--data", help="train_data.jsonl of an earlier run (skips generation)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--resume", action="store_true", help="continue from the state in --out")
    p.add_argument("--samples", type=int, default=d.samples, help="training sequences to generate")
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens)
    p.add_argument(
        "--prompt-tokens", type=int, default=d.prompt_tokens, help="corpus snippet length"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--anchors", type=int, default=d.anchors, help="blocks per sequence")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--draft-layers", type=int, default=d.draft_layers)
    p.add_argument(
        "--draft-heads", type=int, help="draft layers' attention heads (default: target's)"
    )
    p.add_argument(
        "--draft-kv-heads", type=int, help="draft layers' KV heads (default: --draft-heads)"
    )
    p.add_argument(
        "--draft-intermediate", type=int, help="draft layers' MLP width (default: target's)"
    )
    p.add_argument("--markov-rank", type=int, default=d.markov_rank)
    p.add_argument(
        "--taps",
        type=lambda s: [int(x) for x in s.split(",")],
        help="target layers to tap, e.g. 1,9,17,25,33 (default: 5 spread over depth)",
    )
    p.add_argument("--mask-token-id", type=int)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="sampling temperature of the training text",
    )
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)


def run(args: argparse.Namespace) -> int:
    fields = TrainOptions.__dataclass_fields__
    opts = TrainOptions(**{k: v for k, v in vars(args).items() if k in fields})
    start = time.perf_counter()
    result = train_drafter(opts)
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(
        f"{opts.kind} drafter written to {result.out} ({result.steps_done} steps, "
        f"loss {first:.3f} -> {last:.3f}, {time.perf_counter() - start:.0f} s)"
    )
    print(f"use it: mlx-specdec generate --model {opts.model} --drafter {result.out} --prompt ...")
    return 0


__all__ = ["TrainOptions", "TrainResult", "block_forward", "default_taps", "train_drafter"]
