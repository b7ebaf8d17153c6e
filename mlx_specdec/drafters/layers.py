"""Layers shared by the drafters: attention with injected target context, the draft decoder
layer (Qwen3 or Gemma-4 style), the Gemma-4 helpers, and the quantize/share helpers every
drafter loader uses."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.gemma4_text import RMSNormNoScale, geglu
from mlx_lm.models.qwen3 import MLP
from mlx_lm.models.rope_utils import initialize_rope

from ..cache import PaddedKVCache
from ..errors import SpecDecError
from ..sampling import SamplingParams, draw, probs


@dataclass(frozen=True)
class AttentionShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False
    # Gemma-4 options (defaults are Qwen3's):
    rope_type: str = "default"  # "proportional": only a leading fraction of frequencies rotate
    partial_rotary_factor: float = 1.0
    k_eq_v: bool = False  # no v_proj: values are the k_proj output (before k_norm and RoPE)
    v_norm: bool = False  # values go through a weightless RMSNorm
    scale: float | None = None  # None: head_dim ** -0.5
    # Other checkpoint formats' options (defaults are DeepSpec's):
    qk_norm: bool = True  # False: Llama-style heads with no q/k RMSNorm (SpecForge EAGLE3)
    rope_scaling: dict | None = None  # a non-default RoPE (yarn, llama3, ...), mlx-lm's
    max_position_embeddings: int | None = None


def split_heads(x: mx.array, n: int, d: int) -> mx.array:
    """[S, T, n*d] -> [S, n, T, d]."""
    return x.reshape(x.shape[0], x.shape[1], n, d).transpose(0, 2, 1, 3)


def _hide_padding(mask: mx.array | None, valid: int, capacity: int, rows: int) -> mx.array:
    """A [rows, valid + rows] block mask (None: all visible) over keys [context ; block],
    re-laid over [padded context buffer of `capacity` rows ; block], hiding rows >= valid."""
    hidden = mx.zeros((rows, capacity - valid), mx.bool_)
    if mask is None:
        seen = mx.ones((rows, valid), mx.bool_)
        block = mx.ones((rows, rows), mx.bool_)
    else:
        seen, block = mask[:, :valid], mask[:, valid:]
    return mx.concatenate([seen, hidden, block], axis=1)


class InjectedAttention(nn.Module):
    """Attention whose keys/values are [cached context rows ; new context ; block].

    Queries come only from the block. Context rows are projected with the same k/v weights as
    the block (KV injection, DFlash/DSpark), normed, RoPE'd at their absolute positions and
    appended to `cache`; block keys/values are used once and dropped. `mask=None` means every
    block query sees every context row and every block row (bidirectional). The Gemma-4 options
    of `AttentionShape` (K=V, weightless v_norm, scale, proportional RoPE) switch the variant.
    """

    def __init__(self, s: AttentionShape):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.attention_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.attention_bias)
        if not s.k_eq_v:
            self.v_proj = nn.Linear(
                s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.attention_bias
            )
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.attention_bias)
        if s.qk_norm:
            self.q_norm = nn.RMSNorm(s.head_dim, eps=s.rms_norm_eps)
            self.k_norm = nn.RMSNorm(s.head_dim, eps=s.rms_norm_eps)
        if s.v_norm:
            self.v_norm = RMSNormNoScale(s.head_dim, eps=s.rms_norm_eps)
        self.rope = make_rope(s)
        self.scale = s.head_dim**-0.5 if s.scale is None else s.scale

    def queries(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """x [N, L, H] -> normed queries [N, heads, L, d] RoPE'd at positions offset + 0..L-1
        (`offset`: one int, or an array [N] of one per row of the batch)."""
        q = split_heads(self.q_proj(x), self.n_heads, self.head_dim)
        return self.rope(self.q_norm(q) if "q_norm" in self else q, offset=offset)

    def keys_values(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array]:
        """x [N, L, H] -> keys and values [N, kv_heads, L, d], keys at positions as `queries`."""
        raw_k = split_heads(self.k_proj(x), self.n_kv, self.head_dim)
        k = self.rope(self.k_norm(raw_k) if "k_norm" in self else raw_k, offset=offset)
        v = split_heads(self.v_proj(x), self.n_kv, self.head_dim) if "v_proj" in self else raw_k
        if "v_norm" in self:
            v = self.v_norm(v)
        return k, v

    def __call__(
        self, x: mx.array, context: mx.array | None, cache: KVCache, mask: Any = None
    ) -> mx.array:
        padded = isinstance(cache, PaddedKVCache)  # keys: the whole buffer, see PaddedKVCache
        if context is not None and context.shape[1]:
            ctx_k, ctx_v = cache.update_and_fetch(*self.keys_values(context, cache.offset))
        elif cache.offset:
            ctx_k, ctx_v = cache.keys, cache.values
            if not padded:
                ctx_k, ctx_v = ctx_k[..., : cache.offset, :], ctx_v[..., : cache.offset, :]
        else:
            ctx_k = ctx_v = None
        start = cache.offset
        q = self.queries(x, start)
        k, v = self.keys_values(x, start)
        if ctx_k is not None:
            if padded and ctx_k.shape[2] > start:
                mask = _hide_padding(mask, start, ctx_k.shape[2], x.shape[1])
            k, v = mx.concatenate([ctx_k, k], axis=2), mx.concatenate([ctx_v, v], axis=2)
        return self.attend(q, k, v, mask)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Any = None) -> mx.array:
        """Queries [N, heads, L, d] over keys/values [N, kv_heads, K, d] -> the projected output
        [N, L, H]. `mask`: None (all visible) or a boolean/additive mask broadcasting to
        [N, heads, L, K]."""
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1))


class GeluMLP(MLP):
    """Gemma's gated MLP: same projections as Qwen3's, gelu-tanh instead of SiLU."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class InjectedDecoderLayer(nn.Module):
    """A draft block whose attention also reads the injected context: pre-norm Qwen3 style, or
    with `gemma=True` Gemma-4 style (sandwich norms around attention and MLP, gelu-tanh MLP, and
    the output scaled by the stored `layer_scalar`)."""

    def __init__(self, s: AttentionShape, intermediate_size: int, gemma: bool = False):
        super().__init__()
        self.gemma = gemma
        self.input_layernorm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.self_attn = InjectedAttention(s)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.mlp = (GeluMLP if gemma else MLP)(s.hidden_size, intermediate_size)
        if gemma:
            self.pre_feedforward_layernorm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
            self.post_feedforward_layernorm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
            self.layer_scalar = mx.ones((1,))

    def __call__(
        self, x: mx.array, context: mx.array | None, cache: KVCache, mask: Any = None
    ) -> mx.array:
        attn = self.self_attn(self.input_layernorm(x), context, cache, mask)
        return self.after_attention(x, attn)

    def after_attention(self, x: mx.array, attn: mx.array) -> mx.array:
        """The rest of the layer given its input `x` and attention output `attn`: residuals,
        norms and MLP."""
        if not self.gemma:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


def rope_parameters(config: dict) -> dict:
    """The RoPE settings of full-attention layers: transformers-5 `rope_parameters` (Gemma-4
    keeps one entry per layer type), or the older `rope_theta`/`rope_scaling` spelling."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return params.get("full_attention", params)


def rope_scaling(config: dict, where: str) -> dict | None:
    """A non-default RoPE scaling (yarn, llama3, linear, ...) as mlx-lm's `initialize_rope`
    takes it, or None; a type mlx-lm does not know is refused, naming the field."""
    scaling = dict(rope_parameters(config))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    try:
        initialize_rope(16, 10000.0, False, scaling, config.get("max_position_embeddings"))
    except (ValueError, KeyError, TypeError) as e:
        raise SpecDecError(
            f"{where}: RoPE scaling rope_type '{kind}' is not supported ({e})"
        ) from None
    return scaling


def rope_theta(config: dict) -> float:
    """RoPE base from either the transformers-5 `rope_parameters` or the older spelling."""
    theta = rope_parameters(config).get("rope_theta") or config.get("rope_theta") or 10000.0
    return float(theta)


def make_rope(s: AttentionShape) -> nn.Module:
    """RoPE over the full head dim. `proportional` (Gemma-4 global layers) is mlx-lm's: explicit
    periods theta^(2k/d) for the first `factor * d / 2` pairs and infinite periods for the rest,
    pairing dims (k, k + d/2). A partial-rotary RoPE over `factor * d` dims would pair
    (k, k + factor * d / 2) instead, which is wrong for these checkpoints."""
    if s.rope_scaling:
        return initialize_rope(
            s.head_dim, s.rope_theta, False, s.rope_scaling, s.max_position_embeddings
        )
    if s.rope_type == "proportional":
        return initialize_rope(
            s.head_dim,
            base=s.rope_theta,
            traditional=False,
            scaling_config={
                "rope_type": "proportional",
                "partial_rotary_factor": s.partial_rotary_factor,
            },
        )
    return nn.RoPE(s.head_dim, traditional=False, base=s.rope_theta)


def attention_shape(config: dict) -> AttentionShape:
    heads = int(config["num_attention_heads"])
    return AttentionShape(
        hidden_size=int(config["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads", heads)),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(config),
        attention_bias=bool(config.get("attention_bias", False)),
    )


def gemma4_attention_shape(config: dict) -> AttentionShape:
    """Draft attention on a Gemma-4 text config: always the *global* (full-attention) geometry,
    K=V with `num_global_key_value_heads` when `attention_k_eq_v`, a weightless v_norm, scale 1
    (the q/k norms do the scaling) and the `full_attention` RoPE (proportional)."""
    base = attention_shape(config)
    k_eq_v = bool(config.get("attention_k_eq_v", False))
    n_kv = base.num_kv_heads
    if k_eq_v and config.get("num_global_key_value_heads") is not None:
        n_kv = int(config["num_global_key_value_heads"])
    rope = rope_parameters(config)
    return replace(
        base,
        num_kv_heads=n_kv,
        head_dim=int(config.get("global_head_dim") or base.head_dim),
        rope_type=str(rope.get("rope_type", "default")),
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
        k_eq_v=k_eq_v,
        v_norm=True,
        scale=1.0,
    )


def quantize_drafter(model: nn.Module, bits: int, group_size: int = 64) -> None:
    """Quantize every Linear/Embedding whose input width the group size divides (4 or 8 bits);
    16 keeps the checkpoint's dtype, 32 upcasts to float32 (fastest on CPUs with OpenBLAS)."""
    if bits == 32:
        model.set_dtype(mx.float32)
    elif bits in (4, 8):
        nn.quantize(
            model,
            group_size=group_size,
            bits=bits,
            class_predicate=lambda _, m: (
                isinstance(m, nn.Linear | nn.Embedding) and m.weight.shape[-1] % group_size == 0
            ),
        )


def same_weights(weight: mx.array, module: nn.Module) -> bool:
    """Is `weight` (a drafter's full-precision copy) what `module` of the target holds?

    For a quantized target, equal means quantizing the copy the way the target was quantized
    gives bit-identical packed weights, scales and biases: sharing then changes nothing but the
    memory footprint.
    """
    if isinstance(module, nn.QuantizedEmbedding | nn.QuantizedLinear):
        if getattr(module, "mode", "affine") != "affine":
            return False
        packed = mx.quantize(weight, group_size=module.group_size, bits=module.bits)
        theirs = (module.weight, module.scales, module.biases)
        return all(
            a.shape == b.shape and mx.array_equal(a, b).item() for a, b in zip(packed, theirs)
        )
    other = module.weight
    return other.shape == weight.shape and mx.array_equal(other, weight).item()


def pick(logits: mx.array, params: SamplingParams) -> tuple[mx.array, mx.array | None]:
    """Rows of draft logits -> (tokens [n] int32, q [n, V] they were drawn from, None if greedy)."""
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32), None
    q = probs(logits, params)
    return draw(q).astype(mx.int32), q


class TargetCopies:
    """Mixin for drafters whose checkpoints may carry their own copies of the target's embedding
    (`embed_tokens`) and LM head (`lm_head`): `share_target_tensors` swaps identical copies for
    the target's modules, and binds the target's where the checkpoint has none (formats that
    borrow them, e.g. vLLM speculators). Subclasses set `object.__setattr__(self, "_shared", {})`
    in __init__ (a plain attribute, so the target's weights never count as, or get loaded into,
    ours). Gemma drafters also set `_embed_scale` (`gemma_embed_scale`) and `_logit_softcap`.
    A reduced-vocabulary head (`map_draft_vocab`) has `lm_head` rows for its draft tokens only;
    `_to_target` puts its logits back on the target's ids."""

    _embed_scale: float | None = None
    _logit_softcap: float | None = None
    _draft_ids: mx.array | None = None

    def _embed(self, ids: mx.array) -> mx.array:
        x = self._shared.get("embed_tokens", self.get("embed_tokens"))(ids)
        return x if self._embed_scale is None else x * self._embed_scale

    def _head(self, h: mx.array) -> mx.array:
        out = self._shared.get("lm_head", self.get("lm_head"))(h)
        cap = self._logit_softcap
        return mx.tanh(out / cap) * cap if cap else out

    def _to_target(self, logits: mx.array) -> mx.array:
        return expand_vocab(logits, self._draft_ids, self.config.vocab_size)

    def map_draft_vocab(self, ids: mx.array) -> None:
        """Target id of each `lm_head` row (a reduced draft vocabulary)."""
        rows = self.lm_head.weight.shape[0] if "lm_head" in self else None
        if rows != ids.shape[0]:
            raise SpecDecError(
                f"the draft vocabulary map has {ids.shape[0]} entries but the drafter's lm_head "
                f"has {rows} rows"
            )
        object.__setattr__(self, "_draft_ids", ids.astype(mx.int32))

    def share_target_tensors(self, target: Any) -> list[str]:
        """Runs before quantization (it compares full-precision copies); the target's modules
        live outside our module tree, so quantizing us never touches them."""
        shared = []
        own = self.get("embed_tokens")
        if own is None or (
            isinstance(own, nn.Embedding) and same_weights(own.weight, target.embed_tokens)
        ):
            if own is not None:
                self.pop("embed_tokens")
            self._shared["embed_tokens"] = target.embed_tokens
            shared.append("embed_tokens")
        own = self.get("lm_head")
        if own is None or (
            isinstance(own, nn.Linear) and same_weights(own.weight, target.head_module)
        ):
            if own is not None:
                self.pop("lm_head")
            self._shared["lm_head"] = target.project  # no soft-cap: `_head` applies ours
            shared.append("lm_head")
        return shared


def check_gemma4_drafter(c: dict, where: str) -> None:
    """Refuse the Gemma-4 options the reference drafter asserts off or that would change it."""
    if c.get("enable_moe_block"):
        raise SpecDecError(f"{where}: Gemma-4 drafters with MoE blocks are not supported")
    if c.get("hidden_size_per_layer_input"):
        raise SpecDecError(f"{where}: Gemma-4 drafters with per-layer inputs are not supported")
    # The reference would make the last draft layers KV-shared/double-wide in that case (the
    # count is inherited from the target: gemma-4-12B's 0, or the E2B/E4B's 20 > draft layers).
    if 0 < int(c.get("num_kv_shared_layers") or 0) < int(c["num_hidden_layers"]):
        raise SpecDecError(f"{where}: Gemma-4 drafters with KV-shared layers are not supported")
    act = c.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise SpecDecError(f"{where}: Gemma-4 drafter activation '{act}' is not supported")


def gemma_embed_scale(hidden_size: int) -> float:
    """Gemma's embedding scale sqrt(H) as the bf16 checkpoints apply it (62.0 for H=3840)."""
    return mx.array(hidden_size**0.5, dtype=mx.bfloat16).item()


BACKBONE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)


def require_keys(config: dict, keys: tuple[str, ...], kind: str, where: str) -> None:
    """One clear error naming every key a drafter config lacks."""
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise SpecDecError(f"{where}: {kind} drafter config lacks {', '.join(missing)}")


def anchor_block(next_tokens: mx.array, block_size: int, mask_token_id: int) -> mx.array:
    """The parallel drafters' input: the anchor (newest committed token), then mask tokens."""
    anchor = next_tokens[-1:].astype(mx.int32)
    return mx.concatenate([anchor, mx.full((block_size - 1,), mask_token_id, mx.int32)])


def expand_vocab(logits: mx.array, ids: mx.array | None, vocab_size: int) -> mx.array:
    """Rows of logits over a reduced draft vocabulary -> rows over the target's, the other
    tokens at -inf: argmax and every sampling filter then act on target ids, and the draft
    distribution is q itself, zero outside the draft vocabulary (exact speculative sampling
    needs q on the target's ids). `ids` [V_draft] are the target ids (None: no reduction)."""
    if ids is None:
        return logits
    full = mx.full((*logits.shape[:-1], vocab_size), -mx.inf, logits.dtype)
    full[..., ids] = logits
    return full
