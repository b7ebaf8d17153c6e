"""The training forward: the drafter's config and fresh weights for a target, the frozen target
pass, and every block of a batch drafted at once with the drafter's own layers, then scored.

Each anchor opens a block `[anchor, mask, ..., mask]` that sees the context strictly before the
anchor and itself bidirectionally, exactly as at inference; all blocks of a batch run in one
forward, through the same attention maths as inference (`InjectedAttention.queries`,
`keys_values`, `attend`) with per-block positions and a block mask instead of a cache.
The loss per slot k is weighted by exp(-k/4): DSpark 0.1·CE + 0.9·L1(draft, target) + BCE of the
confidence head against 1 - L1/2; DFlash CE only.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..drafters.dspark import DSparkConfig, DSparkDrafter
from ..drafters.layers import InjectedDecoderLayer, rope_theta
from ..errors import SpecDecError
from ..target import Target
from .options import TrainOptions

LOSS_DECAY = 4.0  # slot k weighs exp(-k / LOSS_DECAY)
# Target families (mlx-lm model types) whose drafters are Qwen3 layers (DeepSpec's
# Qwen3DSparkModel): Qwen3 itself, its MoE, and the hybrids, whose taps are residual-stream
# outputs like any other layer's.
TRAINABLE = ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe", "qwen3_next", "lfm2", "lfm2_moe",
             "nemotron_h")  # fmt: skip


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


def qwen3_widths(target: Target) -> dict[str, Any]:
    """A target's widths as the Qwen3 config its drafter's layers read (for a target that is not
    Qwen3: LFM2, Nemotron-H and Qwen3.5 spell them otherwise, or in a `text_config`)."""
    text = target.config.get("text_config", target.config)
    hidden, heads = target.hidden_size, int(text["num_attention_heads"])
    ffn = text.get("intermediate_size") or text.get("block_ff_dim") or 3 * hidden  # MoE: none
    eps = text.get("rms_norm_eps") or text.get("norm_eps") or text.get("layer_norm_epsilon")
    return dict(
        model_type="qwen3",
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        intermediate_size=int(ffn),
        rms_norm_eps=float(eps or 1e-6),
        rope_theta=rope_theta(text),
        max_position_embeddings=int(text.get("max_position_embeddings") or 40960),
        vocab_size=target.vocab_size,
        eos_token_id=target.config.get("eos_token_id", text.get("eos_token_id")),
    )


def drafter_config(target: Target, tokenizer: Any, opts: TrainOptions) -> dict[str, Any]:
    """The target's config plus the DSpark keys, as DeepSpec's trainer writes it (for a target
    that is not Qwen3, its widths in Qwen3's keys)."""
    family = str(target.config.get("model_type", target.model_type))
    if family not in TRAINABLE:
        raise SpecDecError(
            f"train-drafter supports Qwen3, Qwen3-MoE, Qwen3.5/3.6, Qwen3-Next, LFM2 and "
            f"Nemotron-H targets, not model type '{family}'"
        )
    if family == "qwen3" and "text_config" not in target.config:
        config = copy.deepcopy(target.config)
    else:
        config = qwen3_widths(target)
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
        config.setdefault("head_dim", target.hidden_size // int(config["num_attention_heads"]))
        config["num_attention_heads"] = opts.draft_heads
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


def _by_rows(t: mx.array, seqs: int) -> mx.array:
    """Heads of one block per batch entry [S*A, n, B, d] -> of each sequence's blocks in a row
    [S, n, A*B, d]."""
    blocks, n, rows, d = t.shape
    per_seq = blocks // seqs
    return t.reshape(seqs, per_seq, n, rows, d).transpose(0, 2, 1, 3, 4).reshape(seqs, n, -1, d)


def _layer(
    layer: InjectedDecoderLayer,
    x: mx.array,
    ctx: mx.array,
    anchors: mx.array,
    visible: mx.array,
) -> mx.array:
    """One draft layer over all blocks of a batch at once: x [S, A*B, H] (each sequence's
    blocks in a row), ctx [S, T, H], anchors [S, A], visible [S, 1, A*B, T + A*B]. The layer's
    own maths, with each block RoPE'd from its anchor's position and the context from 0, and a
    block mask where inference has a cache."""
    S, A = anchors.shape
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    blocks = xn.reshape(S * A, -1, xn.shape[-1])  # one block per batch entry
    starts = anchors.reshape(-1)  # row j of the block of anchor p sits at p + j
    q = _by_rows(attn.queries(blocks, starts), S)
    k, v = (_by_rows(t, S) for t in attn.keys_values(blocks, starts))
    ctx_k, ctx_v = attn.keys_values(ctx, 0)
    k, v = mx.concatenate([ctx_k, k], axis=2), mx.concatenate([ctx_v, v], axis=2)
    return layer.after_attention(x, attn.attend(q, k, v, visible))


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

    ctx = drafter.hidden_norm(drafter.fc(taps))
    x = drafter.embed_tokens(block)
    for layer in drafter.layers:
        x = _layer(layer, x, ctx, anchors, visible)
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
    """The DeepSpec loss of a batch (see the module docstring) and the greedy accept length
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
    """One frozen target forward over the whole batch: (logits [S, T, V], taps [S, T, m*H])."""
    logits, taps = target.forward_batch(ids)
    return mx.stop_gradient(logits), mx.stop_gradient(taps)
