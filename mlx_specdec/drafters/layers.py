"""Layers shared by the drafters: attention with injected target context, the draft decoder
layer, and the quantize/share helpers every drafter loader uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.qwen3 import MLP


@dataclass(frozen=True)
class AttentionShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False


def _heads(x: mx.array, n: int, d: int) -> mx.array:
    """[1, T, n*d] -> [1, n, T, d]."""
    return x.reshape(1, x.shape[1], n, d).transpose(0, 2, 1, 3)


class InjectedAttention(nn.Module):
    """Qwen3-style attention whose keys/values are [cached context rows ; new context ; block].

    Queries come only from the block. Context rows are projected with the same k/v weights as
    the block (KV injection, DFlash/DSpark), normed, RoPE'd at their absolute positions and
    appended to `cache`; block keys/values are used once and dropped. `mask=None` means every
    block query sees every context row and every block row (bidirectional).
    """

    def __init__(self, s: AttentionShape):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=s.attention_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.attention_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=s.attention_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.attention_bias)
        self.q_norm = nn.RMSNorm(s.head_dim, eps=s.rms_norm_eps)
        self.k_norm = nn.RMSNorm(s.head_dim, eps=s.rms_norm_eps)
        self.rope = nn.RoPE(s.head_dim, traditional=False, base=s.rope_theta)
        self.scale = s.head_dim**-0.5

    def keys_values(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array]:
        k = self.rope(self.k_norm(_heads(self.k_proj(x), self.n_kv, self.head_dim)), offset=offset)
        v = _heads(self.v_proj(x), self.n_kv, self.head_dim)
        return k, v

    def __call__(
        self, x: mx.array, context: mx.array | None, cache: KVCache, mask: Any = None
    ) -> mx.array:
        if context is not None and context.shape[1]:
            ctx_k, ctx_v = cache.update_and_fetch(*self.keys_values(context, cache.offset))
        elif cache.offset:
            ctx_k, ctx_v = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
        else:
            ctx_k = ctx_v = None
        start = cache.offset
        q = self.rope(self.q_norm(_heads(self.q_proj(x), self.n_heads, self.head_dim)), offset=start)
        k, v = self.keys_values(x, start)
        if ctx_k is not None:
            k, v = mx.concatenate([ctx_k, k], axis=2), mx.concatenate([ctx_v, v], axis=2)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(1, x.shape[1], -1))


class InjectedDecoderLayer(nn.Module):
    """Pre-norm Qwen3 block whose attention also reads the injected context."""

    def __init__(self, s: AttentionShape, intermediate_size: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.self_attn = InjectedAttention(s)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.mlp = MLP(s.hidden_size, intermediate_size)

    def __call__(
        self, x: mx.array, context: mx.array | None, cache: KVCache, mask: Any = None
    ) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), context, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_theta(config: dict) -> float:
    """RoPE base from either the transformers-5 `rope_parameters` or the older spelling."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


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
            class_predicate=lambda _, m: isinstance(m, nn.Linear | nn.Embedding)
            and m.weight.shape[-1] % group_size == 0,
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
        return all(a.shape == b.shape and mx.array_equal(a, b).item() for a, b in zip(packed, theirs))
    other = module.weight
    return other.shape == weight.shape and mx.array_equal(other, weight).item()
