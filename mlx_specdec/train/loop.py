"""The training run: generate the data once, then AdamW steps (linear warm-up, cosine decay,
gradient clipping at 1.0) over batches of the target's own text, saving the state and the
checkpoint as it goes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..errors import SpecDecError
from ..target import Target
from .checkpoint import (
    LAYOUTS,
    STATE_DIR,
    load_state,
    save_config,
    save_state,
    saved_config,
    write_checkpoint,
)
from .data import DATA_FILE, generate_data, make_batch, read_data, write_data
from .model import block_loss, drafter_config, init_drafter, target_pass
from .options import TrainOptions, TrainResult, progress_bar


def schedule(opts: TrainOptions) -> Callable[[mx.array], mx.array]:
    warm = max(1, round(opts.warmup * opts.steps))
    return optim.join_schedules(
        [
            optim.linear_schedule(opts.lr / warm, opts.lr, warm),
            optim.cosine_decay(opts.lr, max(1, opts.steps - warm), 0.0),
        ],
        [warm],
    )


def train_drafter(
    opts: TrainOptions, target: Target | None = None, tokenizer: Any = None
) -> TrainResult:
    """Generate data (once), train, and write the checkpoint to `opts.out`."""
    if opts.kind not in ("dspark", "dflash"):
        raise SpecDecError(f"--kind must be dspark or dflash, got '{opts.kind}'")
    if min(opts.steps, opts.batch_size, opts.anchors, opts.gen_batch) < 1 or opts.block_size < 2:
        raise SpecDecError(
            "--steps, --batch-size, --anchors, gen_batch must be >= 1 and --block-size >= 2"
        )
    out = Path(opts.out)
    layout = opts.layout or LAYOUTS[opts.kind][0]
    if layout not in LAYOUTS[opts.kind]:
        raise SpecDecError(
            f"--layout {layout} is not a {opts.kind} layout; use {' or '.join(LAYOUTS[opts.kind])}"
        )
    resuming = opts.resume and (out / STATE_DIR / "progress.json").is_file()
    if opts.resume and not resuming:
        raise SpecDecError(f"--resume: '{out}' holds no training state ({STATE_DIR}/)")
    if not opts.resume and (out / STATE_DIR / "progress.json").is_file():
        raise SpecDecError(
            f"'{out}' holds the state of an earlier run: pass --resume to continue it, or "
            "choose another --out"
        )
    if resuming:
        config, layout = saved_config(out, opts)
    # A compiled step cannot read the CPU stand-ins' shared RoPE tables: the target runs
    # mlx's own norm and RoPE here.
    if target is None:
        from ..loading import load_target

        target, tokenizer = load_target(opts.model, stand_ins=False)
    elif target.stand_ins:
        target = Target(target.model, target.config, name=target.name, stand_ins=False)
    if not resuming:
        config = drafter_config(target, tokenizer, opts)
        save_config(out, config, layout)
    mx.random.seed(opts.seed)
    drafter = init_drafter(target, config)
    target.set_taps(drafter.tap_ids)

    data_file = out / DATA_FILE
    if opts.data or (data_file.is_file() and opts.resume):
        data = read_data(Path(opts.data) if opts.data else data_file)
    else:
        data = generate_data(target, tokenizer, opts)
        write_data(data_file, data)
    if not any(sum(d["mask"]) > 1 for d in data):
        raise SpecDecError("the target generated no usable training text (every answer was empty)")

    opt = optim.AdamW(learning_rate=schedule(opts), weight_decay=0.0)
    step, losses = 0, []
    if resuming:
        step, losses = load_state(out, drafter, opt)
    else:
        write_checkpoint(drafter, config, out, opts.dtype, layout)

    loss_and_grad = nn.value_and_grad(drafter, block_loss)
    zlab = layout == "zlab"
    # The target's weights as its forward reads them: those of its weight-sharing copy (the
    # arrays are `target.model`'s, but compile swaps inputs in the containers it is given).
    state = [drafter.state, opt.state, mx.random.state, target.state]

    def train_step(*batch: mx.array) -> tuple[mx.array, mx.array]:
        ids = batch[0]
        logits, taps = target_pass(target, ids)
        (loss, accept), grads = loss_and_grad(drafter, taps, logits, *batch, opts.ce_weight, zlab)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(drafter, grads)
        return loss, accept

    if opts.compile:  # one graph per padded batch shape: far fewer kernel launches
        train_step = mx.compile(train_step, inputs=state, outputs=state)

    rng = np.random.default_rng(opts.seed + step)
    order: list[int] = []
    bar = progress_bar(
        range(step, opts.steps), opts.progress, f"training {opts.kind}", opts.steps, step
    )
    tokens, t0 = 0, time.perf_counter()
    accepts: list[float] = []
    for step in bar:
        if len(order) < opts.batch_size:
            order += list(rng.permutation(len(data)))
        rows, order = order[: opts.batch_size], order[opts.batch_size :]
        batch = make_batch(data, rows, opts.anchors, rng)
        loss, accept = train_step(*batch)
        mx.eval(loss, accept, drafter.parameters(), opt.state)
        losses.append(float(loss.item()))
        accepts.append(float(accept.item()))
        tokens += int(batch[0].size)
        done = step + 1
        if opts.progress or (opts.log_every and done % opts.log_every == 0):
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            recent = accepts[-20:]
            shown = {
                "loss": f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                "accept": f"{sum(recent) / len(recent):.2f}",
                "tok_s": f"{rate:.0f}",
            }
            if opts.progress:
                bar.set_postfix(shown)
            else:
                print(f"  {opts.kind} step {done}/{opts.steps} "
                      + " ".join(f"{k} {v}" for k, v in shown.items()), flush=True)  # fmt: skip
        if done % opts.save_every == 0 or done == opts.steps:
            save_state(out, drafter, opt, done, losses, opts)
            write_checkpoint(drafter, config, out, opts.dtype, layout)
    return TrainResult(out=out, losses=losses, steps_done=opts.steps, accepts=accepts)
