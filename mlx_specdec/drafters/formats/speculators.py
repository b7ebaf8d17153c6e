"""vLLM speculators checkpoints (`speculators_config`, e.g. RedHatAI `*-speculator.dspark`).

The config nests the drafter's decoder shape in `transformer_layer_config` and names the
algorithm in `speculators_config.algorithm`; the tensor names are the families' own. What
differs, and how it is translated (speculators 0.9.0 is the reference):

- Tap ids (`aux_hidden_state_layer_ids`, EAGLE3's `eagle_aux_hidden_state_layer_ids`) index
  Hugging Face's `hidden_states`, where 0 is the embedding output: id i is the output of
  decoder layer i - 1, our tap i - 1 (speculators' z-lab converter adds the same 1).
- `sample_from_anchor` (dspark default true, dflash false) says whether the anchor's block row
  drafts: our DSpark class's `logits_start` 0 or 1. dspark and dflash both run on the DSpark
  class (dflash = no Markov head), dflash2 on its own family.
- The embedding, and the LM head of a full-vocabulary drafter, are the verifier's: absent from
  the checkpoint, bound to the target's. A reduced vocabulary keeps its own `lm_head` + `d2t`.
- RoPE: `transformer_layer_config.rope_parameters`, its `sliding_attention` entry when nested
  (speculators' `flatten_rope_parameters`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ...errors import SpecDecError

ALGORITHMS = ("dspark", "dflash", "dflash2", "eagle3")
_BACKBONE = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "attention_bias",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "hidden_act",
)


def recognises(config: dict) -> bool:
    return "speculators_config" in config or "speculators_model_type" in config


def _algorithm(config: dict, what: str) -> str:
    algorithm = (config.get("speculators_config") or {}).get("algorithm")
    algorithm = algorithm or config.get("speculators_model_type")
    if algorithm not in ALGORITHMS:
        raise SpecDecError(
            f"{what}: speculators_config.algorithm '{algorithm}' is not supported "
            f"(supported: {', '.join(ALGORITHMS)})"
        )
    return algorithm


def _backbone(layer: dict, what: str) -> dict[str, Any]:
    """The decoder shape and RoPE of `transformer_layer_config`, top-level as the families read
    them."""
    if "sliding_attention" in (layer.get("layer_types") or []) and layer.get(
        "use_sliding_window", True
    ):
        raise SpecDecError(
            f"{what}: transformer_layer_config.layer_types has sliding_attention layers; "
            "speculators' anchor-relative sliding window is not supported"
        )
    out = {k: layer[k] for k in _BACKBONE if layer.get(k) is not None}
    rope = layer.get("rope_parameters") or layer.get("rope_scaling")
    if isinstance(rope, dict) and "sliding_attention" in rope:
        rope = rope["sliding_attention"]
    if rope:
        out["rope_parameters"] = rope
    return out


def _taps(ids: list[int] | None, key: str, what: str, target_layers: int) -> list[int]:
    if not ids:
        raise SpecDecError(f"{what}: speculators config lacks {key}")
    for i in ids:
        if not 1 <= int(i) < target_layers:
            raise SpecDecError(
                f"{what}: {key} entry {i} is not supported (hidden state {i} of a "
                f"{target_layers}-layer target; taps are outputs of layers "
                f"0..{target_layers - 2})"
            )
    return [int(i) - 1 for i in ids]


def _proposal_length(config: dict) -> int | None:
    methods = (config.get("speculators_config") or {}).get("proposal_methods") or []
    return int(methods[0]["speculative_tokens"]) if methods else None


def translate(
    config: dict, weights: dict[str, mx.array], what: str, target_layers: int
) -> tuple[dict, dict[str, mx.array]]:
    algorithm = _algorithm(config, what)
    layer = config.get("transformer_layer_config") or {}
    out = _backbone(layer, what)
    vocab = out.get("vocab_size")
    draft_vocab = config.get("draft_vocab_size") or vocab
    if draft_vocab != vocab:
        out["draft_vocab_size"] = int(draft_vocab)
    weights = {k: v for k, v in weights.items() if not k.startswith("verifier_")}
    if algorithm == "eagle3":
        return _eagle3(config, layer, out, weights, what, target_layers)
    block = int(config.get("block_size", 8))
    taps = _taps(
        config.get("aux_hidden_state_layer_ids"), "aux_hidden_state_layer_ids", what, target_layers
    )
    out.update(
        block_size=block,
        mask_token_id=config.get("mask_token_id"),
        target_layer_ids=taps,
        num_target_layers=target_layers,
    )
    if algorithm == "dflash2":
        return _dflash2(config, out, weights, what)
    anchor = bool(config.get("sample_from_anchor", algorithm == "dspark"))
    rank = int(config.get("markov_rank", 256 if algorithm == "dspark" else 0))
    out.update(
        architectures=["Qwen3DSparkModel"],
        logits_start=0 if anchor else 1,
        markov_rank=rank,
        markov_head_type=config.get("markov_head_type", "vanilla"),
        enable_confidence_head=bool(config.get("enable_confidence_head", algorithm == "dspark")),
        confidence_head_with_markov=bool(config.get("confidence_head_with_markov", rank > 0)),
        shared_embedding="embed_tokens.weight" not in weights,
        shared_lm_head="lm_head.weight" not in weights,
    )
    return out, weights


def _dflash2(config: dict, out: dict, weights: dict, what: str) -> tuple[dict, dict]:
    if config.get("sample_from_anchor"):
        raise SpecDecError(f"{what}: dflash2 with sample_from_anchor = true is not supported")
    if out.get("draft_vocab_size"):
        raise SpecDecError(f"{what}: dflash2 with a reduced draft_vocab_size is not supported")
    keys = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
    defaults = (2, 16, 256, 16)  # speculators' DFlash2SpeculatorConfig defaults
    dflash = {k: int(config.get(k, d)) for k, d in zip(keys, defaults)}
    dflash.update(
        block_size=out.pop("block_size"),
        mask_token_id=out.pop("mask_token_id"),
        target_layer_ids=out.pop("target_layer_ids"),
    )
    out.update(architectures=["DFlash2DraftModel"], dflash_config=dflash)
    dropped = ("embed_tokens.weight", "lm_head.weight")  # the verifier's own copies
    return out, {k: v for k, v in weights.items() if k not in dropped}


def _eagle3(
    config: dict, layer: dict, out: dict, weights: dict, what: str, target_layers: int
) -> tuple[dict, dict]:
    for flag in ("norm_before_fc", "fc_norm"):
        if config.get(flag):
            raise SpecDecError(f"{what}: EAGLE3 {flag} = true is not supported")
    key = "eagle_aux_hidden_state_layer_ids"
    ids = config.get(key)
    if not ids:  # vLLM's default capture: hidden states 2, N/2, N-3
        ids = [2, target_layers // 2, target_layers - 3]
    out.update(
        architectures=["Qwen3Eagle3Model"],
        target_layer_ids=_taps(ids, key, what, target_layers),
        ttt_length=_proposal_length(config) or 3,
        qk_norm=layer.get("model_type", "llama") != "llama",
        norm_before_residual=bool(config.get("norm_before_residual", False)),
        norm_output=bool(config.get("norm_output", False)),
        shared_embedding="embed_tokens.weight" not in weights,
    )
    return out, weights
