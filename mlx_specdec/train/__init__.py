"""`mlx-specdec train-drafter`: the drafter-training recipe of DeepSpec (as its public
repository's trainer implements it) at small scale, in MLX.

1. Training text is made by the target itself: its answers to chat prompts (`--prompts`) or its
   continuations of snippets of a text corpus (`--corpus`). Only the generated part is supervised.
2. Each step runs the frozen target over a batch of sequences once; that single pass gives both
   the taps the drafter reads and the target distribution it is taught to match.
3. Anchors are sampled per sequence; each anchor opens a block `[anchor, mask, ..., mask]` that
   sees the context strictly before the anchor and itself bidirectionally, exactly as at
   inference. All blocks of a batch run in one forward, through the drafter's own layers.
4. Losses per slot k, weighted by exp(-k/4): DSpark 0.1·CE + 0.9·L1(draft, target) + BCE of the
   confidence head against 1 - L1/2; DFlash CE only. AdamW, linear warm-up then cosine decay,
   gradient clipping at 1.0. Embedding and output head are frozen copies of the target's.

The result loads with `--drafter DIR` like a downloaded checkpoint: `--kind dspark` writes
DeepSpec's layout (config = target config + DSpark keys, flat tensor names, safetensors);
`--kind dflash` writes z-lab's `DFlashDraftModel` (no embedding or head of its own, the DFlash keys
in `dflash_config`, a block of the anchor row plus one mask row per draft, row k predicting the
token at anchor + k), or with `--layout deepspec` DeepSpec's DFlash (`Qwen3DSparkModel` with
`markov_rank` 0 and no confidence head). Both DFlash layouts train the same backbone; z-lab's
block has one more row (its anchor row predicts nothing).

Modules: `options` (TrainOptions, TrainResult), `data` (training text, batches), `model` (config,
init, target pass, training forward and loss), `checkpoint` (layouts, state, resume), `loop`
(`train_drafter`), `cli` (the subcommand).
"""

from .loop import train_drafter
from .model import block_forward, default_taps
from .options import TrainOptions, TrainResult

__all__ = [
    "TrainOptions",
    "TrainResult",
    "block_forward",
    "default_taps",
    "train_drafter",
]
