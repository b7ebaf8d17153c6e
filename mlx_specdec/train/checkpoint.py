"""Checkpoints and training state. A drafter is written as DeepSpec's `Qwen3DSparkModel` (the
target's config plus the DSpark keys, flat tensor names, safetensors; DFlash as the same class
with `markov_rank` 0 and no confidence head) or as z-lab's `DFlashDraftModel`. The training
state beside it (`train_state/`: weights, optimizer, losses, the config as trained) lets a run
resume where it stopped."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..drafters.dspark import DSparkDrafter
from ..drafters.layers import rope_theta
from ..errors import SpecDecError
from .options import TrainOptions

STATE_DIR = "train_state"
TRAINED_AS = "drafter.json"  # in STATE_DIR: the training config and checkpoint layout
# How a checkpoint is written: DeepSpec's (`Qwen3DSparkModel`; DSpark, or DFlash as the same class
# without Markov and confidence heads) or z-lab's DFlash (`DFlashDraftModel`).
LAYOUTS = {"dspark": ("deepspec",), "dflash": ("zlab", "deepspec")}  # first: the default


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


def save_state(
    out: Path,
    drafter: DSparkDrafter,
    opt: optim.Optimizer,
    step: int,
    losses: list[float],
    opts: TrainOptions,
) -> None:
    """The state to resume from after `step` steps: weights, optimizer, losses, options."""
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(state / "drafter.safetensors"), dict(tree_flatten(drafter.parameters()))
    )
    mx.save_safetensors(str(state / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
    info = {"step": step, "losses": losses, "options": asdict(opts)}
    (state / "progress.json").write_text(json.dumps(info) + "\n")


def load_state(out: Path, drafter: DSparkDrafter, opt: optim.Optimizer) -> tuple[int, list[float]]:
    """Load what `save_state` wrote into `drafter` and `opt`: (step, losses so far)."""
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


def save_config(out: Path, config: dict[str, Any], layout: str) -> None:
    """Record the training config and layout of a new run, for `saved_config` on --resume."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR / TRAINED_AS).write_text(
        json.dumps({"config": config, "layout": layout}) + "\n"
    )


def saved_config(out: Path, opts: TrainOptions) -> tuple[dict[str, Any], str]:
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
