"""Checkpoint formats: each module translates one publisher's layout into a family's config and
tensor names, so the families (`dspark`, `dflash`, `dflash2`, `eagle3`) load it unchanged.

- native: DeepSpec (`Qwen3DSparkModel`, `Gemma4DSparkModel`, `Qwen3Eagle3Model`, any block size)
  and z-lab (`DFlashDraftModel`, `DFlash2DraftModel`) configs, read as they are;
- `speculators`: vLLM speculators (`speculators_config`), algorithms dspark / dflash / dflash2 /
  eagle3;
- `specforge`: SpecForge / SGLang EAGLE3 heads (`LlamaForCausalLMEagle3`, `midlayer.*`);
- `gguf`: GGUF drafters (`general.architecture = dspark`), F32 / F16 / BF16 tensors.

A reduced draft vocabulary travels as `d2t` (offsets: target id = draft id + d2t[draft id]) and
`t2d` (a mask over the target vocabulary); `draft_vocab_ids` turns them into target ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ...errors import SpecDecError
from . import specforge, speculators


@dataclass
class Checkpoint:
    """A drafter checkpoint in a family's layout."""

    config: dict
    weights: dict[str, mx.array]
    format: str
    draft_ids: mx.array | None = None  # target id of each lm_head row (reduced vocabulary)


def translate(
    config: dict, weights: dict[str, mx.array], what: str, target_layers: int
) -> Checkpoint:
    """A config.json + safetensors checkpoint of any known format -> the family layout.
    `target_layers` (the target's layer count) resolves formats' default tap layers."""
    if speculators.recognises(config):
        config, weights = speculators.translate(config, weights, what, target_layers)
        fmt = "speculators"
    elif specforge.recognises(config, weights):
        config, weights = specforge.translate(config, weights, what, target_layers)
        fmt = "specforge"
    else:
        fmt = "native"
    rows = config.get("draft_vocab_size") or config.get("vocab_size")
    ids = draft_vocab_ids(weights, rows, config.get("vocab_size"), what)
    if ids is None:
        config.pop("draft_vocab_size", None)
    elif fmt == "native":
        config["draft_vocab_size"] = int(ids.shape[0])
    return Checkpoint(config, weights, fmt, ids)


def draft_vocab_ids(
    weights: dict[str, mx.array], rows: int | None, vocab: int | None, what: str
) -> mx.array | None:
    """Pop `d2t` / `t2d` and return the target id of each draft row (None: the full vocabulary
    or an identity map). Refuses a map that is not a one-to-one map into the target's ids."""
    d2t, t2d = weights.pop("d2t", None), weights.pop("t2d", None)
    if d2t is None:
        if rows is not None and vocab is not None and int(rows) != int(vocab):
            raise SpecDecError(
                f"{what} has a reduced draft vocabulary ({rows} of {vocab} tokens) but no d2t "
                "map to target ids"
            )
        return None
    offsets = np.array(d2t).astype(np.int64).ravel()
    ids = np.arange(offsets.size) + offsets
    if rows is not None and offsets.size != int(rows):
        raise SpecDecError(f"{what}: d2t has {offsets.size} entries, the draft vocabulary {rows}")
    if vocab is not None and (ids.min() < 0 or ids.max() >= int(vocab)):
        raise SpecDecError(f"{what}: d2t maps draft tokens outside the target's {vocab} ids")
    if np.unique(ids).size != ids.size:
        raise SpecDecError(f"{what}: d2t maps two draft tokens to the same target id")
    if t2d is not None:
        mask = np.array(t2d).astype(bool).ravel()
        if mask.sum() != ids.size or not mask[ids].all():
            raise SpecDecError(f"{what}: t2d and d2t disagree on the draft vocabulary")
    if vocab is not None and ids.size == int(vocab) and (offsets == 0).all():
        return None
    return mx.array(ids.astype(np.int32))
