"""SpecForge / SGLang EAGLE3 heads (`LlamaForCausalLMEagle3`; specforge 0.2.0 is the reference).

One Llama decoder layer named `midlayer` (no q/k norms, q/k/v read [embedding ; hidden]), `fc`
over three taps, `norm`, a `lm_head` over a reduced draft vocabulary (`draft_vocab_size`) with
`d2t` / `t2d` maps; the embedding is usually left out (the target's is used). Translated:

- `midlayer.*` -> `layers.0.*`; the config to DeepSpec's EAGLE3 keys with `qk_norm` false.
- Tap ids: `eagle_config.eagle_aux_hidden_state_layer_ids` are layer outputs (SGLang captures
  the input of layer i + 1), our ids as they are. Without them SpecForge's default
  [1, N/2 - 1, N - 4] of an N-layer target.
- Chain length: the checkpoint does not store one (SGLang takes it from its launch flags);
  `ttt_length` from the config if present, else 7 (SpecForge's training TTT length).
- SpecForge's `norm_output` = true (its default) is norm(h) -> lm_head with the raw h fed to
  the next chain step: our default, not speculators' EAGLE 3.1 `norm_output`; dropped. False
  means logits straight from the layer output (no final norm): refused, as is `fc_norm`.
"""

from __future__ import annotations

import mlx.core as mx

from ...errors import SpecDecError

ARCHITECTURES = ("LlamaForCausalLMEagle3",)
DEFAULT_TTT = 7


def recognises(config: dict, weights: dict[str, mx.array]) -> bool:
    arch = (config.get("architectures") or [None])[0]
    return arch in ARCHITECTURES or any(k.startswith("midlayer.") for k in weights)


def _taps(config: dict, what: str, target_layers: int) -> list[int]:
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = [1, target_layers // 2 - 1, target_layers - 4]
    if len(ids) != 3:
        raise SpecDecError(
            f"{what}: eagle_config.eagle_aux_hidden_state_layer_ids must list 3 layers, got {ids}"
        )
    return [int(i) for i in ids]


def translate(
    config: dict, weights: dict[str, mx.array], what: str, target_layers: int
) -> tuple[dict, dict[str, mx.array]]:
    if config.get("norm_output") is False:
        raise SpecDecError(f"{what}: SpecForge EAGLE3 norm_output = false is not supported")
    if config.get("fc_norm"):
        raise SpecDecError(f"{what}: SpecForge EAGLE3 fc_norm = true is not supported")
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise SpecDecError(
            f"{what}: SpecForge EAGLE3 num_hidden_layers = {config['num_hidden_layers']} is not "
            "supported (one midlayer)"
        )
    target_hidden = config.get("target_hidden_size")
    if target_hidden and int(target_hidden) != int(config["hidden_size"]):
        raise SpecDecError(
            f"{what}: target_hidden_size {target_hidden} differs from hidden_size "
            f"{config['hidden_size']}; drafters of another width are not supported"
        )
    out = dict(config)
    # SpecForge's norm_output (default true) is DeepSpec's head: norm before lm_head, the raw
    # output fed on. Our `norm_output` is speculators' EAGLE 3.1 (normed output fed on).
    out.pop("norm_output", None)
    out.update(
        architectures=["Qwen3Eagle3Model"],
        num_hidden_layers=1,
        target_layer_ids=_taps(config, what, target_layers),
        ttt_length=int(config.get("ttt_length", DEFAULT_TTT)),
        qk_norm=False,
        shared_embedding="embed_tokens.weight" not in weights,
    )
    renamed = {
        ("layers.0." + k[len("midlayer.") :] if k.startswith("midlayer.") else k): v
        for k, v in weights.items()
    }
    return out, renamed
