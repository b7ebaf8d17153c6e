"""Tiny random hybrid and MoE targets, built from mlx-lm's own model classes, and drafters for
them.

`HYBRID_TARGETS` maps a model type to its config: Qwen3.5 / Qwen3-Next (Gated DeltaNet between
full-attention layers, dense or MoE), Nemotron-H (Mamba-2, attention, MLP and MoE blocks),
LFM2 (short convolutions between attention layers, dense or MoE), and attention-only Qwen3-MoE.
Every config has the fixture tokenizer's vocabulary (`helpers.VOCAB`); `build_hybrid` makes the
random model and `write_hybrid` saves it as a loadable folder with the fixture tokenizer.

`drafter_configs(target)` gives a DSpark, a DFlash and an EAGLE3 config for a target of any of
these types: Qwen3-style drafter layers of the target's hidden size, tapping its layers.
`Steered` wraps such a (random) drafter so rounds accept a random number of drafts.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from helpers import (
    TOKENIZER_FILES,
    TOKENIZER_SOURCE,
    VOCAB,
    build_model,
    dflash_config,
    dspark_config,
    eagle3_config,
    target_config,
)
from mlx.utils import tree_map_with_path
from mlx_lm.utils import save_config, save_model

from mlx_specdec.drafters.base import Proposal

HIDDEN = 64
EOS = [493]


def _common(model_type: str, layers: int, **over) -> dict:
    config = dict(
        model_type=model_type,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=EOS,
    )
    config.update(over)
    return config


def _gated_delta(**over) -> dict:
    """Qwen3.5 / Qwen3-Next linear-attention sizes: 2 key heads, 4 value heads of 16."""
    return dict(
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=3,  # layers 2 and 5 attend, the others are Gated DeltaNet
        head_dim=16,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        **over,
    )


_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    mlp_only_layers=[],
    norm_topk_prob=True,
)


def qwen3_5_config(moe: bool = False) -> dict:
    """Qwen3.5 (`qwen3_5`) or its MoE (`qwen3_5_moe`), in the published text_config layout."""
    model_type = "qwen3_5_moe" if moe else "qwen3_5"
    text = _common(
        model_type,
        6,
        **_gated_delta(),
        rope_parameters={
            "type": "default",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
        },
        **(_MOE if moe else {}),
    )
    return dict(model_type=model_type, text_config=text, vocab_size=VOCAB, eos_token_id=EOS)


def qwen3_next_config() -> dict:
    return _common(
        "qwen3_next",
        6,
        **_gated_delta(),
        rope_theta=1e6,
        partial_rotary_factor=0.25,
        **_MOE,
    )


def qwen3_moe_config() -> dict:
    return _common(
        "qwen3_moe",
        6,
        head_dim=16,
        intermediate_size=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        **{k: v for k, v in _MOE.items() if k != "shared_expert_intermediate_size"},
    )


def _lfm2_layers() -> list[str]:
    return ["conv", "conv", "full_attention", "conv", "conv", "full_attention"]


def lfm2_config() -> dict:
    return _common(
        "lfm2",
        6,
        norm_eps=1e-5,
        conv_bias=False,
        conv_L_cache=3,
        block_dim=HIDDEN,
        block_ff_dim=128,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=True,
        rope_theta=1e6,
        layer_types=_lfm2_layers(),
        tie_word_embeddings=True,
    )


def lfm2_moe_config() -> dict:
    return _common(
        "lfm2_moe",
        6,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        use_expert_bias=True,
        num_dense_layers=2,
        norm_eps=1e-5,
        conv_bias=True,
        conv_L_cache=3,
        rope_theta=1e6,
        layer_types=_lfm2_layers(),
        tie_word_embeddings=True,
    )


def nemotron_h_config() -> dict:
    """Mamba-2 (M), attention (*), MLP (-) and MoE (E) blocks, as Nemotron-H mixes them."""
    return _common(
        "nemotron_h",
        7,
        hybrid_override_pattern=["M", "-", "M", "*", "E", "M", "*"],
        intermediate_size=128,
        attention_bias=False,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_proj_bias=False,
        ssm_state_size=16,
        conv_kernel=4,
        n_groups=2,
        mlp_bias=False,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        head_dim=16,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        n_group=1,
        n_routed_experts=4,
        n_shared_experts=1,
        topk_group=1,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        time_step_limit=(0.0, float("inf")),
    )


# model type -> a tiny random config of it
HYBRID_TARGETS: dict[str, Callable[[], dict]] = {
    "qwen3_5": qwen3_5_config,
    "qwen3_5_moe": lambda: qwen3_5_config(moe=True),
    "qwen3_next": qwen3_next_config,
    "qwen3_moe": qwen3_moe_config,
    "lfm2": lfm2_config,
    "lfm2_moe": lfm2_moe_config,
    "nemotron_h": nemotron_h_config,
}

_OUTPUTS = ("down_proj.weight", "w2.weight", "out_proj.weight", "o_proj.weight")


def build_hybrid(config: dict, seed: int = 0) -> nn.Module:
    """A random model of `config`. In tied-embedding models (LFM2) the residual embedding
    dominates a random net and greedy decoding repeats one token, so their blocks' output
    projections are scaled up to give varied text."""
    model = build_model(config, seed)
    if config.get("tie_word_embeddings"):
        scale = lambda path, w: w * 3 if path.endswith(_OUTPUTS) else w  # noqa: E731
        model.update(tree_map_with_path(scale, model.parameters()))
        mx.eval(model.parameters())
    return model


def write_hybrid(path: Path, config: dict, seed: int = 0) -> Path:
    """`build_hybrid`, saved with the fixture tokenizer (a folder `load_pair` reads)."""
    model = build_hybrid(config, seed)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SOURCE / name, path / name)
    return path


TAPS = (0, 2, 4)  # taps every hybrid above has (each has at least 6 layers)


def _drafter_base(target: dict) -> dict:
    """A Qwen3 config of the target's hidden size and layer count: what the Qwen3-style drafter
    builders read (their layers are Qwen3 layers whatever the target)."""
    text = target.get("text_config", target)
    return target_config(
        layers=text["num_hidden_layers"],
        hidden_size=text["hidden_size"],
        eos_token_id=EOS,
    )


def drafter_configs(target: dict) -> dict[str, dict]:
    """kind -> a DSpark, DFlash (z-lab) and EAGLE3 config for `target`."""
    base = _drafter_base(target)
    return {
        "dspark": dspark_config(base, target_layer_ids=list(TAPS)),
        "dflash": dflash_config(base, taps=TAPS),
        "eagle3": eagle3_config(base, taps=TAPS),
    }


class Steered:
    """A real drafter (any family) whose drafts are replaced by the target's own greedy
    continuation `want` for a random number of slots, then by wrong tokens: every round accepts
    a random 0..n drafts, so rollback is exercised at every depth, while the inner drafter runs
    as usual (its state, its cost). Greedy runs of one prompt (`prompt_len`) at a time;
    `want` must reach past the budget by a block."""

    def __init__(self, inner, prompt_len: int, want: list[int], seed: int = 0, p: float = 0.7):
        self.inner, self.prompt_len, self.want = inner, prompt_len, want
        self.rng, self.p = random.Random(seed), p
        self.seen = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def new_state(self, padded: bool = False):
        self.seen = 0
        return self.inner.new_state(padded)

    def propose(self, state, context, next_tokens, n, params) -> Proposal:
        inner = self.inner.propose(state, context, next_tokens, n, params)
        self.seen += next_tokens.shape[0]
        at = self.seen - self.prompt_len + 1  # want[at] follows the anchor
        n = inner.tokens.shape[0]
        good = 0
        while good < n and self.rng.random() < self.p:
            good += 1
        tokens = self.want[at : at + good]
        tokens += [(t + 1) % VOCAB for t in self.want[at + good : at + n]]
        return Proposal(mx.array(tokens, dtype=mx.int32))
