"""What a training run is asked to do (`TrainOptions`) and what it did (`TrainResult`), read by
every module of the package; and the optional progress bar."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainOptions:
    model: str
    out: str
    kind: str = "dspark"
    layout: str | None = None  # checkpoint layout: see checkpoint.LAYOUTS (default: the kind's)
    prompts: str | None = None
    corpus: str | None = None
    steps: int = 1000
    resume: bool = False
    data: str | None = None  # a train_data.jsonl written by an earlier run: skip generating
    samples: int = 512  # generated training sequences
    gen_tokens: int = 192  # tokens the target generates per sequence
    prompt_tokens: int = 64  # corpus mode: length of each snippet the target continues
    temperature: float = 0.7  # generation sampling (DeepSpec: Qwen3's T 0.7, top-p 0.8, top-k 20)
    top_p: float = 0.8
    top_k: int = 20
    gen_batch: int = 64  # sequences the target generates at once
    batch_size: int = 8  # sequences per step
    anchors: int = 32  # blocks per sequence
    block_size: int = 7
    draft_layers: int = 5
    # The draft layers' own attention heads, KV heads and MLP width (default: the target's).
    draft_heads: int | None = None
    draft_kv_heads: int | None = None
    draft_intermediate: int | None = None
    markov_rank: int = 256
    taps: list[int] | None = None
    mask_token_id: int | None = None
    lr: float = 6e-4
    ce_weight: float = 0.1  # DSpark: ce_weight * CE + (1 - ce_weight) * L1 (+ confidence BCE)
    warmup: float = 0.04
    save_every: int = 200
    dtype: str = "bfloat16"  # of the written checkpoint (DeepSpec writes bf16)
    seed: int = 0
    progress: bool = True
    compile: bool = True  # mx.compile the training step
    log_every: int = 0  # without a progress bar: print a line every this many steps (0: never)


@dataclass
class TrainResult:
    out: Path
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    accepts: list[float] = field(default_factory=list)  # greedy accept length per step (this run)


def progress_bar(
    it: Any, enabled: bool, desc: str, total: int | None = None, initial: int = 0
) -> Any:
    """`it` wrapped in a tqdm bar if `enabled`, else `it` itself."""
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, dynamic_ncols=True)
