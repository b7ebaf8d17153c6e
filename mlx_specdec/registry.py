"""Known targets and the drafters made for them.

A target matches a row when its repo or folder name, with any quantization suffix removed
(`-8bit`, `-4bit`, `-bf16`, `-MLX`, ...), equals the row's id: every mlx-community quantization
of a model resolves the same drafters, while fine-tunes with other names (e.g. `-Instruct-2507`)
do not silently get a drafter trained for another model.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import PurePath

MODES = ("dspark", "dflash", "eagle3")
# Drafter checkpoint formats `loading` reads (drafters/formats), and known ones it does not.
LOADABLE = ("deepspec", "z-lab", "z-lab dflash2", "speculators", "specforge", "gguf")
NOT_LOADABLE = {
    "modelopt-nvfp4": "an NVFP4-quantized drafter (modelopt) is not supported",
    "liquidai-lfm2": "LiquidAI's DSpark packaging (interleaved RoPE) is not supported",
}
# Targets whose layers keep a recurrent state: they run once the hybrid-target rollback
# (`mlx_specdec.recurrent`) is installed.
HYBRID = ("qwen3_5", "qwen3_5_moe", "nemotron_h", "lfm2")


@dataclass(frozen=True)
class Drafter:
    repo: str
    format: str  # one of LOADABLE or NOT_LOADABLE


@dataclass(frozen=True)
class Entry:
    id: str
    target: str
    model_type: str  # the target's mlx-lm model type
    dspark: Drafter | None = None
    dflash: Drafter | None = None
    eagle3: Drafter | None = None

    def drafter(self, mode: str) -> str | None:
        """The repo of this mode's drafter, if this install can load it."""
        d = getattr(self, mode)
        return d.repo if d is not None and d.format in LOADABLE else None

    def runnable(self) -> str:
        """'yes', or 'no: why' (for `mlx-specdec models`)."""
        if importlib.util.find_spec(f"mlx_lm.models.{self.model_type}") is None:
            return f"no: this mlx-lm has no {self.model_type} models"
        if self.model_type in HYBRID and importlib.util.find_spec("mlx_specdec.recurrent") is None:
            return "no: needs hybrid-target support"
        drafters = [getattr(self, m) for m in MODES if getattr(self, m) is not None]
        if not any(d.format in LOADABLE for d in drafters):
            return "no: " + "; ".join(NOT_LOADABLE[d.format] for d in drafters)
        return "yes"


def _deepspec(name: str) -> Drafter:
    return Drafter(f"deepseek-ai/{name}", "deepspec")


# One row per target. Where several drafters of a family are published, the one with the best
# published acceptance (mlx-dspark's measurements for Qwen3.8-27B: speculators DSpark 5.55 vs
# DFlash 2 5.42 at 8 bits; the auto mode prefers DSpark anyway).
REGISTRY: tuple[Entry, ...] = (
    Entry(
        "qwen3-4b",
        "mlx-community/Qwen3-4B-8bit",
        "qwen3",
        dspark=_deepspec("dspark_qwen3_4b_block7"),
        dflash=Drafter("z-lab/Qwen3-4B-DFlash-b16", "z-lab"),
        eagle3=_deepspec("eagle3_qwen3_4b_ttt7"),
    ),
    Entry(
        "qwen3-8b",
        "mlx-community/Qwen3-8B-8bit",
        "qwen3",
        dspark=_deepspec("dspark_qwen3_8b_block7"),
        dflash=Drafter("z-lab/Qwen3-8B-DFlash-b16", "z-lab"),
        eagle3=_deepspec("eagle3_qwen3_8b_ttt7"),
    ),
    Entry(
        "qwen3-14b",
        "mlx-community/Qwen3-14B-8bit",
        "qwen3",
        dspark=_deepspec("dspark_qwen3_14b_block7"),
        dflash=_deepspec("dflash_qwen3_14b_block7"),
        eagle3=_deepspec("eagle3_qwen3_14b_ttt7"),
    ),
    Entry(
        "gemma-4-12b-it",
        "mlx-community/gemma-4-12B-it-8bit",
        "gemma4",
        dspark=_deepspec("dspark_gemma4_12b_block7"),
        dflash=Drafter("z-lab/gemma4-12B-it-DFlash", "z-lab"),
        eagle3=_deepspec("eagle3_gemma4_12b_ttt7"),
    ),
    Entry(
        "qwen3.6-27b",
        "mlx-community/Qwen3.6-27B-8bit",
        "qwen3_5",
        dspark=Drafter("satgeze/Qwen3.6-27B-DSpark", "deepspec"),  # block 15
    ),
    Entry(
        "qwen3.6-35b-a3b",
        "mlx-community/Qwen3.6-35B-A3B-4bit",
        "qwen3_5_moe",
        dspark=Drafter("Koopah/Qwen3.6-35B-A3B-NVFP4-DSPARK", "modelopt-nvfp4"),
    ),
    Entry(
        "qwen3.8-27b",
        "mlx-community/Qwen3.8-27B-4bit",
        "qwen3_5",
        dspark=Drafter("RedHatAI/Qwen3.8-27B-speculator.dspark", "speculators"),
        dflash=Drafter("incoai/Qwen3.8-27B-DFlash2", "z-lab dflash2"),
    ),
    Entry(
        "nvidia-nemotron-3.5-lightning-30b-a3b",
        "mlx-community/NVIDIA-Nemotron-3.5-Lightning-30B-A3B-4bit",
        "nemotron_h",
        dspark=Drafter(
            "mlx-community/NVIDIA-Nemotron-3.5-Lightning-30B-A3B-DSpark-bf16", "deepspec"
        ),
    ),
    Entry(
        "lfm2.5-1.2b-instruct",
        "LiquidAI/LFM2.5-1.2B-Instruct-MLX-bf16",
        "lfm2",
        dspark=Drafter("LiquidAI/LFM2.5-1.2B-Instruct-DSpark", "liquidai-lfm2"),
    ),
    Entry(
        "lfm2.5-2.6b",
        "LiquidAI/LFM2.5-2.6B-MLX-bf16",
        "lfm2",
        dspark=Drafter("LiquidAI/LFM2.5-2.6B-DSpark", "liquidai-lfm2"),
    ),
)

_QUANT_SUFFIX = re.compile(
    r"[-_](\d+bits?|bf16|fp16|fp32|f16|f32|mlx|dwq|awq|gptq|mxfp4|mxfp8|nvfp4|q\d(_k)?(_[msl])?"
    r"|int\d|quantized)$",
    re.IGNORECASE,
)


def normalize(name: str) -> str:
    """'mlx-community/Qwen3-4B-MLX-8bit' -> 'qwen3-4b'."""
    base = PurePath(name.rstrip("/")).name.lower()
    while True:
        stripped = _QUANT_SUFFIX.sub("", base)
        if stripped == base:
            return base
        base = stripped


def lookup(model: str) -> Entry | None:
    key = normalize(model)
    return next((e for e in REGISTRY if e.id == key), None)


def resolve_mode(model: str, mode: str, drafter: str | None) -> tuple[str, str | None]:
    """`auto` -> the first family with a known drafter (DSpark, DFlash, EAGLE3), else baseline.
    With an explicit `drafter` and `auto`, the drafter's own config decides (returned as 'auto').
    Returns (mode, drafter repo or path or None)."""
    if mode == "baseline":
        return mode, None
    if drafter is not None:
        return mode, drafter
    entry = lookup(model)
    if mode == "auto":
        for m in MODES:
            if entry is not None and entry.drafter(m):
                return m, entry.drafter(m)
        return "baseline", None
    return mode, entry.drafter(mode) if entry else None
