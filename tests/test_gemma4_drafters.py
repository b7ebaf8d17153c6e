"""z-lab DFlash and EAGLE3 (`Gemma4Eagle3Model`) drafters on tiny Gemma-4 text targets: lossless
greedy decoding against plain mlx-lm (prompts longer than the sliding window, several caps), and
one drafter forward checked against the spec's formulas written out in numpy (dflash-spec §1.4-1.6,
dspark-spec §1.6 and §5.2)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    GEMMA4_MASK_ID,
    GEMMA4_TARGETS,
    GEMMA4_WINDOW,
    dflash_config,
    eagle3_config,
    gemma4_text_config,
    greedy_reference,
    run,
    write_drafter,
    write_target,
)
from mlx.utils import tree_flatten

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.drafters import eagle3

MASK_ID = GEMMA4_MASK_ID
WINDOW = GEMMA4_WINDOW
DRAFT_WINDOW = 4  # the DFlash drafter's own sliding window
SOFTCAP = 30.0


# ----------------------------------------------------------------------------- drafter configs
def dflash_gemma_config(text: dict, cap: float = SOFTCAP) -> dict:
    """A z-lab style DFlash drafter for a Gemma-4 target: Qwen3-style layers, two sliding ones,
    the DFlash keys (block, mask token 4, taps, soft-cap) in `dflash_config`."""
    return dflash_config(
        text,
        softcap=cap,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=DRAFT_WINDOW,
    )


def eagle3_gemma_config(text: dict, cap: float = SOFTCAP) -> dict:
    """DeepSpec's build_draft_config for EAGLE3 on Gemma-4: the target's text config, 1 layer."""
    return eagle3_config(text, final_logit_softcapping=cap)


def load(tmp_path: Path, target_config: dict, kind: str, seed: int = 0, cap: float = SOFTCAP):
    """A random Gemma-4 target and a random `kind` drafter for it (vector weights off 1, so a
    missing norm or scalar shows), through `load_pair`."""
    text = target_config.get("text_config", target_config)
    target_dir = write_target(tmp_path / "t", target_config, seed=seed)
    if kind == "dflash":
        config, copies = dflash_gemma_config(text, cap), None
    else:
        from mlx_specdec.loading import load_target

        target = load_target(str(target_dir))[0]
        config = eagle3_gemma_config(text, cap)
        copies = {  # EAGLE3's frozen copies of the target's embedding and head
            "embed_tokens.weight": target.embed_tokens.weight,
            "lm_head.weight": target.head_module.weight,
        }
    drafter_dir = write_drafter(
        tmp_path / "d", config, seed + 10, copies=copies, vectors_off_one=True
    )
    return load_pair(str(target_dir), str(drafter_dir), mode=kind, drafter_bits=16)


# ----------------------------------------------------------------------------- token identity
@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
@pytest.mark.parametrize("target_kind", list(GEMMA4_TARGETS))
def test_lossless_on_tiny_gemma4_targets(tmp_path, kind, target_kind):
    seed = list(GEMMA4_TARGETS).index(target_kind)
    target, _, drafter, config = load(tmp_path, GEMMA4_TARGETS[target_kind](), kind, seed)
    assert config.drafter_kind == kind
    assert config.shared_with_target == ["embed_tokens", "lm_head"]
    rng = random.Random(seed)
    for length in (3, 3 * WINDOW + 5):  # the second is longer than the target's window
        prompt = [rng.randrange(7, 490) for _ in range(length)]
        want = greedy_reference(target.model, prompt, 2 * WINDOW + 4, eos=set())
        for cap in (1, 3, None):
            got, rounds = run(target, drafter, prompt, 2 * WINDOW + 4, max_draft=cap)
            assert got == want, (length, cap)
            assert all(len(r.proposed) <= (cap or drafter.max_draft) for r in rounds)


# ----------------------------------------------------------------------------- spec formulas
def rms(x: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def rope(x: np.ndarray, pos: np.ndarray, theta: float, factor: float = 1.0) -> np.ndarray:
    """x [heads, T, d]; NeoX pairs (k, k + d/2), only the first factor*d/2 pairs rotate."""
    d = x.shape[-1]
    half = d // 2
    k = np.arange(half)
    inv = np.where(k < int(factor * half), theta ** (-2.0 * k / d), 0.0)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def heads(x: np.ndarray, n: int) -> np.ndarray:
    """[T, n*d] -> [n, T, d]."""
    return x.reshape(x.shape[0], n, -1).transpose(1, 0, 2)


def attend(q, k, v, scale, keep=None) -> np.ndarray:
    """GQA attention: q [nh, Tq, d], k/v [nkv, Tk, d], keep [Tq, Tk] -> [Tq, nh*d]."""
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    s = q @ k.transpose(0, 2, 1) * scale
    if keep is not None:
        s = np.where(keep[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    return o.transpose(1, 0, 2).reshape(q.shape[1], -1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def dflash_reference(w, cfg, embed, block, ctx, cap) -> np.ndarray:
    """dflash-spec §1.4-1.6 for one round from an empty draft cache: logits of rows 1..B-1."""
    H, B, S = embed.shape[1], len(block), ctx.shape[0]
    x = embed[block] * math.sqrt(H)  # target embedding x Gemma's embed_scale
    c = rms(ctx @ w["fc.weight"].T, w["hidden_norm.weight"])
    pq, pk = np.arange(S, S + B), np.arange(S + B)
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])

        def qkn(t, n, name, norm, pos, p=p):
            return rope(rms(heads(t @ w[p + name].T, n), w[p + norm]), pos, cfg["rope_theta"])

        q = qkn(a, 4, "self_attn.q_proj.weight", "self_attn.q_norm.weight", pq)
        kv_in = np.concatenate([c, a])
        k = qkn(kv_in, 2, "self_attn.k_proj.weight", "self_attn.k_norm.weight", pk)
        v = heads(kv_in @ w[p + "self_attn.v_proj.weight"].T, 2)
        keep = None
        if kind == "sliding_attention":  # causal inside the block, keys within the window
            keep = (pk[None] <= pq[:, None]) & (pq[:, None] - pk[None] < cfg["sliding_window"])
        x = x + attend(q, k, v, 16**-0.5, keep) @ w[p + "self_attn.o_proj.weight"].T
        b = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = b @ w[p + "mlp.gate_proj.weight"].T, b @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    z = rms(x, w["norm.weight"])[1:] @ embed.T  # the target's tied head, readout not shifted
    return cap * np.tanh(z / cap)


def eagle3_gemma_reference(w, text, head, embeds, hidden, cap) -> tuple[np.ndarray, np.ndarray]:
    """dspark-spec §5.2 + §1.6: rows (embedding, hidden) at positions 0..T-1, causal attention of
    the last row over all of them -> (its output hidden state, its soft-capped logits)."""
    p = "layers.0."
    T = embeds.shape[0]
    x = np.concatenate(
        [rms(embeds, w[p + "input_layernorm.weight"]), rms(hidden, w[p + "hidden_norm.weight"])],
        axis=-1,
    )
    rope_cfg = text["rope_parameters"]["full_attention"]
    theta, factor = rope_cfg["rope_theta"], rope_cfg["partial_rotary_factor"]
    nkv = text["num_global_key_value_heads"] if text["attention_k_eq_v"] else 2
    raw_k = heads(x @ w[p + "self_attn.k_proj.weight"].T, nkv)
    k = rope(rms(raw_k, w[p + "self_attn.k_norm.weight"]), np.arange(T), theta, factor)
    v_proj = p + "self_attn.v_proj.weight"
    raw_v = raw_k if text["attention_k_eq_v"] else heads(x @ w[v_proj].T, nkv)
    v = rms(raw_v)  # weightless v_norm, no RoPE
    q = heads(x[-1:] @ w[p + "self_attn.q_proj.weight"].T, 4)
    q = rope(rms(q, w[p + "self_attn.q_norm.weight"]), np.array([T - 1]), theta, factor)
    attn = attend(q, k, v, 1.0) @ w[p + "self_attn.o_proj.weight"].T  # scale 1
    h = hidden[-1:] + rms(attn, w[p + "post_attention_layernorm.weight"])
    b = rms(h, w[p + "pre_feedforward_layernorm.weight"])
    mlp = gelu_tanh(b @ w[p + "mlp.gate_proj.weight"].T) * (b @ w[p + "mlp.up_proj.weight"].T)
    h = h + rms(mlp @ w[p + "mlp.down_proj.weight"].T, w[p + "post_feedforward_layernorm.weight"])
    h = h * w[p + "layer_scalar"]
    z = rms(h, w["norm.weight"]) @ head.T
    return h, cap * np.tanh(z / cap)


def test_dflash_gemma_forward_matches_the_spec_formulas(tmp_path):
    cap = 0.5  # small, so the soft-cap visibly bends the logits
    target, _, drafter, _ = load(tmp_path, gemma4_text_config(), "dflash", seed=3, cap=cap)
    assert target.embed_scale == 8.0 and target.logit_softcap == SOFTCAP
    cfg = dflash_gemma_config(gemma4_text_config(), cap)
    embed = np.array(target.embed_tokens.weight.astype(mx.float32))
    block = np.array([17] + [MASK_ID] * 7)
    ctx = np.random.default_rng(0).normal(size=(11, 3 * 64)).astype(np.float32)
    want = dflash_reference(weights(drafter), cfg, embed, block, ctx, cap)
    state = drafter.new_state()
    got = np.array(drafter.logits(mx.array(block), mx.array(ctx), state, 7))
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert 0.9 * cap < np.abs(got).max() <= cap
    # Context given over two rounds (the cache holds the first part) gives the same block.
    state = drafter.new_state()
    drafter.logits(mx.array(block), mx.array(ctx[:6]), state, 7)
    again = np.array(drafter.logits(mx.array(block), mx.array(ctx[6:]), state, 7))
    np.testing.assert_allclose(again, want, atol=2e-4)


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_eagle3_gemma_chain_matches_the_spec_formulas(tmp_path, k_eq_v):
    cap = 0.5
    text = gemma4_text_config(attention_k_eq_v=k_eq_v)
    _, _, drafter, _ = load(tmp_path, text, "eagle3", seed=4, cap=cap)
    attn = drafter.layers[0].self_attn
    assert attn.scale == 1.0 and ("v_proj" in attn) != k_eq_v
    assert attn.k_proj.weight.shape == ((1 if k_eq_v else 2) * 32, 128)  # global head dim 32
    w = weights(drafter)
    embed = np.array(drafter._shared["embed_tokens"].weight.astype(mx.float32))
    rng = np.random.default_rng(1)
    taps = rng.normal(size=(9, 3 * 64)).astype(np.float32)
    tokens = rng.integers(7, 490, size=9)
    hidden = taps @ w["fc.weight"].T
    embeds = embed[tokens] * 8.0  # sqrt(H) through bf16: exactly 8

    (cache,) = drafter.new_state()
    h = drafter.extend(cache, mx.array(taps), mx.array(tokens, dtype=mx.int32))
    want_h, want_z = eagle3_gemma_reference(w, text, embed, embeds, hidden, cap)  # tied head
    np.testing.assert_allclose(np.array(h[0]), want_h, atol=2e-4)
    z = np.array(drafter.logits(h))
    np.testing.assert_allclose(z, want_z, atol=2e-4)
    assert 0.9 * cap < np.abs(z).max() <= cap
    # One chain step: the draft's embedding with the output hidden state it came from.
    draft = int(z.argmax())
    h2 = drafter.step(cache, mx.array([draft], dtype=mx.int32), h)
    embeds2 = np.concatenate([embeds, embed[[draft]] * 8.0])
    want_h2, want_z2 = eagle3_gemma_reference(
        w, text, embed, embeds2, np.concatenate([hidden, want_h]), cap
    )
    np.testing.assert_allclose(np.array(h2[0]), want_h2, atol=2e-4)
    np.testing.assert_allclose(np.array(drafter.logits(h2)), want_z2, atol=2e-4)


def test_bad_gemma4_eagle3_configs_are_refused():
    base = eagle3_gemma_config(gemma4_text_config())
    for bad, words in (
        (dict(num_hidden_layers=2), "2 layers"),
        (dict(enable_moe_block=True), "MoE"),
        (dict(hidden_size_per_layer_input=8), "per-layer inputs"),
        (dict(hidden_activation="silu"), "activation 'silu'"),
    ):
        with pytest.raises(SpecDecError, match=words):
            eagle3.build({**base, **bad}, "drafter")
