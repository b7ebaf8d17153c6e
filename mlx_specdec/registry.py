"""Known targets and the drafters made for them.

A target matches a row when its repo or folder name, with any quantization suffix removed
(`-8bit`, `-4bit`, `-bf16`, `-MLX`, ...), equals the row's id: every mlx-community quantization
of a model resolves the same drafters, while fine-tunes with other names (e.g. `-Instruct-2507`)
do not silently get a drafter trained for another model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

MODES = ("dspark", "dflash", "eagle3")


@dataclass(frozen=True)
class Entry:
    id: str
    target: str
    dspark: str | None = None
    dflash: str | None = None
    eagle3: str | None = None

    def drafter(self, mode: str) -> str | None:
        return getattr(self, mode)


REGISTRY: tuple[Entry, ...] = (
    Entry(
        "qwen3-4b",
        "mlx-community/Qwen3-4B-8bit",
        dspark="deepseek-ai/dspark_qwen3_4b_block7",
        dflash="z-lab/Qwen3-4B-DFlash-b16",
        eagle3="deepseek-ai/eagle3_qwen3_4b_ttt7",
    ),
    Entry(
        "qwen3-8b",
        "mlx-community/Qwen3-8B-8bit",
        dspark="deepseek-ai/dspark_qwen3_8b_block7",
        dflash="z-lab/Qwen3-8B-DFlash-b16",
        eagle3="deepseek-ai/eagle3_qwen3_8b_ttt7",
    ),
    Entry(
        "qwen3-14b",
        "mlx-community/Qwen3-14B-8bit",
        dspark="deepseek-ai/dspark_qwen3_14b_block7",
        dflash="deepseek-ai/dflash_qwen3_14b_block7",
        eagle3="deepseek-ai/eagle3_qwen3_14b_ttt7",
    ),
    Entry(
        "gemma-4-12b-it",
        "mlx-community/gemma-4-12B-it-8bit",
        dspark="deepseek-ai/dspark_gemma4_12b_block7",
        dflash="z-lab/gemma4-12B-it-DFlash",
        eagle3="deepseek-ai/eagle3_gemma4_12b_ttt7",
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
