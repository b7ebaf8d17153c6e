"""Speculative decoding over a target split across processes with MLX distributed.

Every rank (a process started by `mlx.launch`) runs the same program on the same inputs:

- The target is loaded by mlx-lm's `sharded_load`: `tensor` through each model's `shard()`,
  `pipeline` through its `PipelineMixin` stages. `ShardedTarget` returns the same logits and
  taps on every rank, so the verify loop (`speculate.py`) runs unchanged on each of them.
- The drafter is replicated: every rank loads it and drafts from the same taps, so drafts need
  no message. Verification and sampling then see identical logits and the same seed
  (`shared_seed`), so every rank commits the same tokens, round after round.
- Rank 0 prints, streams and serves; the others follow silently (`run_sharded`).

Messages per verify round, beyond plain decoding's per forward: none in tensor mode (the taps
are outputs of all-summed layers, already on every rank); in pipeline mode one all-sum, which
carries each rank's taps to every rank (each tap slot filled by its owner, zeros elsewhere,
so the sum is exact). The drafter itself sends nothing.

Faults: loading is agreed (`agree`) before the first collective and after the last, so a bad
set-up on any rank (a world size the model cannot be split by, a missing drafter) stops every
rank with the same line; a `Watchdog` ends a rank whose main thread sits in one call (a
collective whose peer died or hangs) for `rank_timeout` seconds; a peer that closed its
connection becomes one line too (`run_sharded`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import registry
from .autocap import auto_max_draft, resolve_max_draft
from .demo import demo_paths
from .drafters.base import Drafter
from .errors import SpecDecError
from .loading import load_pair, read_config, read_drafter, resolve_path
from .target import Target

SHARDINGS = ("tensor", "pipeline")
# Config sizes `shard()` divides by the world size (attention heads, MLP and expert widths,
# linear-attention heads); one that does not divide would leave a rank with a fraction.
TENSOR_SPLIT_KEYS = (
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "linear_num_key_heads",
    "linear_num_value_heads",
)
_MESSAGE_BYTES = 1024  # room for one rank's error line in `agree`
_PEER_ERRORS = ("[ring]", "[mpi]", "[jaccl]", "[nccl]")  # MLX's distributed backends


# ================================================================================ the world
def world() -> mx.distributed.Group:
    """The group of every process `mlx.launch` started (any backend MLX supports)."""
    try:
        group = mx.distributed.init()
    except RuntimeError as e:
        raise SpecDecError(f"cannot join the other ranks: {e}") from None
    if group.size() < 2:
        raise SpecDecError(
            "--sharding needs several processes: start them with mlx.launch, e.g. "
            "`mlx.launch --backend ring -n 2 mlx-specdec generate --sharding tensor ...` "
            "(docs/distributed.md)"
        )
    return group


def settle() -> None:
    """Wait for the work in flight on mlx-lm's generation stream: its decoding leaves a step
    running when it stops, and collectives of two streams would pair up across ranks in
    whatever order the streams reach them."""
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)


def broadcast_int(group: mx.distributed.Group, value: int) -> int:
    """Rank 0's `value` on every rank (an all-sum to which the others add zero)."""
    settle()
    mine = value if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([mine], mx.int32), group=group).item())


def broadcast_bytes(group: mx.distributed.Group, data: bytes = b"") -> bytes:
    """Rank 0's `data` on every rank: its length, then its bytes (two all-sums)."""
    size = broadcast_int(group, len(data))
    if size == 0:
        return b""
    mine = np.frombuffer(data, np.uint8) if group.rank() == 0 else np.zeros(size, np.uint8)
    return bytes(np.array(mx.distributed.all_sum(mx.array(mine), group=group)))


def shared_seed(group: mx.distributed.Group, seed: int | None) -> int:
    """One seed for every rank, so that they draw the same random numbers: rank 0's `seed`, or
    one rank 0 draws when none was given."""
    return broadcast_int(group, secrets.randbits(31) if seed is None else seed)


def _exchange(group: mx.distributed.Group, text: str) -> list[str]:
    """Every rank's `text` (at most `_MESSAGE_BYTES` of UTF-8) on every rank: one all-gather."""
    settle()
    data = text.encode()[:_MESSAGE_BYTES]
    row = np.zeros((1, _MESSAGE_BYTES), np.uint8)
    row[0, : len(data)] = np.frombuffer(data, np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(row), group=group))
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]


def agree(group: mx.distributed.Group, step: Callable[[], Any]) -> Any:
    """Run `step` on every rank, then compare notes (one all-gather): if it failed with a
    `SpecDecError` on any rank, every rank raises the first failing rank's error. Ranks stay in
    step only if `step` makes no collective after the point where it can fail on one rank."""
    try:
        result, error = step(), ""
    except SpecDecError as e:
        result, error = None, str(e) or "failed"
    for rank, message in enumerate(_exchange(group, error)):
        if message:
            raise SpecDecError(f"rank {rank}: {message}")
    return result


# ================================================================================ the target
class ShardedTarget(Target):
    """A `Target` over an mlx-lm model split by `sharded_load` across `group`: the same
    logits and taps on every rank. In pipeline mode the layers keep their global numbers
    (`layers[i]` is None where another rank holds layer i) and the taps are gathered."""

    def __init__(
        self,
        model: Any,
        config: dict,
        name: str,
        *,
        group: mx.distributed.Group,
        sharding: str,
        **switches: Any,
    ):
        self.group, self.sharding = group, sharding
        self.watchdog: Watchdog | None = None
        super().__init__(model, config, name, **switches)
        if sharding == "pipeline":
            # PipelineMixin keeps the numbering up to this stage's last layer, None before it.
            total = int(self._text_config["num_hidden_layers"])
            stage = list(self.inner.layers)
            self.layers = stage + [None] * (total - len(stage))
            self.num_layers = total

    def prefill(self, ids: mx.array, cache: list[Any]) -> tuple[mx.array, mx.array | None]:
        settle()  # a run starts after mlx-lm's last step, on every rank
        return super().prefill(ids, cache)

    def _forward(self, ids: mx.array, cache: list[Any] | None) -> tuple[mx.array, mx.array | None]:
        if self.watchdog is not None:
            self.watchdog.beat()
        if self.sharding != "pipeline":
            return super()._forward(ids, cache)  # tensor: every tapped layer is all-summed
        # A stage's receive depends on nothing, so a rank could wait in it before drafting;
        # drafting first (queued now) overlaps this rank's drafts with the earlier stages.
        mx.async_eval(ids)
        if not self.tap_ids:
            return super()._forward(ids, cache)
        self._sink.values.clear()
        h = self.inner(ids, cache=cache)
        held = self._sink.values
        blank = mx.zeros(h.shape, h.dtype)
        taps = mx.concatenate([held.get(i, blank) for i in self.tap_ids], axis=-1)
        held.clear()
        # One all-sum gives every rank every tap: each slot has one owner and zeros elsewhere,
        # so the sum is exact. Ordered after the model's own all-gather (`depends`), and the
        # hidden states depend on it, so every rank runs its collectives in the same order
        # within the round that made them.
        taps = mx.distributed.all_sum(mx.depends(taps, h), group=self.group)
        return mx.depends(h, taps), taps


def check_split(config: dict, sharding: str, size: int, model: str) -> None:
    """One line when `size` ranks cannot split this model the `sharding` way."""
    text = config.get("text_config", config)
    if sharding not in SHARDINGS:
        raise SpecDecError(f"--sharding must be one of {', '.join(SHARDINGS)}, got '{sharding}'")
    if sharding == "pipeline":
        layers = int(text.get("num_hidden_layers", 0))
        if size > layers:
            raise SpecDecError(
                f"--sharding pipeline over {size} ranks: '{model}' has only {layers} layers"
            )
        return
    for key in TENSOR_SPLIT_KEYS:
        value = text.get(key)
        if isinstance(value, int) and value % size:
            raise SpecDecError(
                f"--sharding tensor over {size} ranks: '{model}' has {key} = {value}, which "
                f"{size} ranks cannot split evenly; use a number of ranks that divides it, or "
                "--sharding pipeline"
            )


def load_sharded_target(
    model: str,
    *,
    sharding: str,
    group: mx.distributed.Group,
    name: str | None = None,
    stand_ins: bool | None = None,
    padded_attention: bool | None = None,
) -> tuple[ShardedTarget, Any]:
    """mlx-lm's `sharded_load` of `model` over `group`, as a `ShardedTarget`, and its
    tokenizer (the arguments of `loading.load_target`, plus how to split it)."""
    from mlx_lm.utils import sharded_load

    pipeline, tensor = (group, None) if sharding == "pipeline" else (None, group)
    try:
        lm, tokenizer, config = sharded_load(model, pipeline, tensor, return_config=True)
    except (FileNotFoundError, ValueError) as e:
        raise SpecDecError(
            f"cannot load model '{model}' split by --sharding {sharding} (mlx-lm's "
            f"sharded_load: {e})"
        ) from None
    target = ShardedTarget(
        lm,
        config,
        name or model,
        group=group,
        sharding=sharding,
        stand_ins=stand_ins,
        padded_attention=padded_attention,
    )
    return target, tokenizer


def split_demo(mode: str = "auto", drafter: str | None = None) -> tuple[str, str | None]:
    """`demo.demo_paths` for a split target: the demo target rewritten so that mlx-lm can
    split it both ways (written to a temporary folder, removed at exit). Its single KV head is
    stored twice (the same attention, over two heads: tensor parallel gives each rank one) and
    it is declared `qwen3_moe` with no experts, the same layers in mlx-lm's Qwen3 family that
    has pipeline stages. The demo drafters fit it unchanged."""
    from mlx_lm.utils import save_config

    source, drafter = demo_paths(mode, drafter)
    config = read_config(Path(source), "model")
    heads = int(config["num_key_value_heads"])
    config.update(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_key_value_heads=2 * heads,
        num_experts=0,
        num_experts_per_tok=1,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=config["intermediate_size"],
        norm_topk_prob=False,
    )
    weights = mx.load(str(Path(source) / "model.safetensors"))
    for name in [n for n in weights if n.endswith(("k_proj.weight", "v_proj.weight"))]:
        rows = weights[name].reshape(heads, -1, weights[name].shape[-1])
        weights[name] = mx.concatenate([rows, rows], axis=1).reshape(-1, rows.shape[-1])
    folder = Path(tempfile.mkdtemp(prefix="mlx-specdec-split-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    # One file and its index: pipeline stages read the index to find their layers.
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(weights), "model.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_config(config, folder / "config.json")
    for file in Path(source).iterdir():
        if file.name.startswith("tokenizer") or file.suffix == ".jinja":
            shutil.copy(file, folder / file.name)
    return str(folder), drafter


def _check_launch(sharding: str, size: int, model: str, drafter: str | None, mode: str) -> None:
    """What a rank can check alone, before the first collective: the model's config and
    split, and that the drafter is here and readable."""
    _, drafter_ref = registry.resolve_mode(model, mode, drafter)
    config = read_config(resolve_path(model, "model", ["*.json"]), "model")
    check_split(config, sharding, size, model)
    if drafter_ref is not None:
        layers = int(config.get("text_config", config).get("num_hidden_layers", 0))
        read_drafter(drafter_ref, layers, f"drafter '{drafter_ref}'")


def load_pair_sharded(
    sharding: str,
    model: str | None = None,
    drafter: str | None = None,
    *,
    mode: str = "auto",
    rank_timeout: float | None = None,
    **options: Any,
) -> tuple[ShardedTarget, Any, Drafter | None, Any]:
    """`loading.load_pair` on every rank of the launch, the target split `sharding` ways:
    `(target, tokenizer, drafter, config)`, the drafter replicated; with no `model`, the demo
    pair (`split_demo`). Any rank's failure stops every rank with its line. With
    `rank_timeout`, a `Watchdog` then guards this thread."""
    group = world()
    if model is None:
        model, drafter = agree(group, lambda: split_demo(mode, drafter))
    agree(group, lambda: _check_launch(sharding, group.size(), model, drafter, mode))
    loader = partial(load_sharded_target, sharding=sharding, group=group)
    pair = agree(
        group, lambda: load_pair(model, drafter, mode=mode, target_loader=loader, **options)
    )
    if rank_timeout is not None:
        pair[0].watchdog = Watchdog(rank_timeout, group.rank())
    return pair


# ================================================================================ the draft cap
class _WouldMeasure(Exception):
    """Raised by `_cached_cap`'s notifier: the cap is not cached, measuring would start."""


def _cached_cap(target: Target, drafter: Drafter, cap_cache: str | Path | None) -> int:
    """The cached auto cap for this pair, or 0 when it would have to be measured (stopped
    before the first forward: alone, this rank must not make collectives)."""

    def refuse(_line: str) -> None:
        raise _WouldMeasure

    try:
        return auto_max_draft(target, drafter, notify=refuse, cap_cache=cap_cache)
    except _WouldMeasure:
        return 0


def agreed_draft_cap(
    target: ShardedTarget,
    drafter: Drafter | None,
    max_draft: int | str | None,
    *,
    cap_cache: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
) -> int | None:
    """`--max-draft` on a split target: every rank must verify the same number of drafts.
    `auto` is rank 0's cached cap; without one, every rank times the same forwards (fixed
    repeats, so their collectives pair up) and rank 0's choice is kept."""
    if max_draft != "auto" or drafter is None:
        return resolve_max_draft(target, drafter, max_draft)
    group = target.group
    cap = broadcast_int(group, _cached_cap(target, drafter, cap_cache) if group.rank() == 0 else 0)
    how = "cached"
    if cap == 0:
        if notify:
            notify("mlx-specdec: calibrating the draft cap over all ranks (once, then cached)")
        with tempfile.TemporaryDirectory() as scratch:  # only rank 0's choice is kept
            where = cap_cache if group.rank() == 0 else Path(scratch) / "max_draft.json"
            mine = auto_max_draft(target, drafter, refresh=True, budget_s=None, cap_cache=where)
        cap, how = broadcast_int(group, mine), "measured"
    if notify:
        notify(f"[auto] --max-draft {cap} (of {drafter.max_draft}; {how} for this split model)")
    return cap


# ================================================================================ faults
class Watchdog:
    """Ends this process with one line when the watched thread sits in one call for `timeout`
    seconds: a collective whose peer died or hangs never returns, and MLX has no timeout of
    its own. The thread is sampled 20 times a second (its innermost frame and instruction) and
    `beat()` counts forwards, so a loop that waits most of its time in one place still shows
    progress. `idle()` covers waits with no bound (a server waiting for its next request)."""

    PERIOD = 0.05

    def __init__(self, timeout: float, rank: int, thread: threading.Thread | None = None):
        self.timeout, self.rank = timeout, rank
        self._ident = (thread or threading.current_thread()).ident
        self._beats = 0
        self._idle = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="mlx-specdec-watchdog", daemon=True).start()

    def watch(self, thread: threading.Thread) -> None:
        """Guard `thread` from now on (the one that runs generations)."""
        self._ident = thread.ident

    def beat(self) -> None:
        self._beats += 1

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        self._idle += 1
        try:
            yield
        finally:
            self._idle -= 1

    def stop(self) -> None:
        self._stop.set()

    def _where(self) -> tuple[int, int, int] | None:
        frame = sys._current_frames().get(self._ident)
        return None if frame is None else (self._beats, id(frame), frame.f_lasti)

    def _run(self) -> None:
        last, since = None, time.monotonic()
        while not self._stop.wait(self.PERIOD):
            where, now = self._where(), time.monotonic()
            if self._idle or where is None or where != last:
                last, since = where, now
            elif now - since >= self.timeout:
                print(
                    f"mlx-specdec: error: rank {self.rank}: no progress for {self.timeout:g} s "
                    "(waiting for another rank that died or hangs; its own error, if any, says "
                    "which); giving up (--rank-timeout)",
                    file=sys.__stderr__,
                    flush=True,
                )
                os._exit(2)


@contextlib.contextmanager
def _peer_errors(rank: int) -> Iterator[None]:
    """MLX's error for a peer that closed its connection, as one line."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith(_PEER_ERRORS):
            raise
        raise SpecDecError(
            f"rank {rank}: lost another rank ({e}); its own error, if any, says why"
        ) from None


@contextlib.contextmanager
def _follower(rank: int) -> Iterator[None]:
    """Ranks other than 0 run everything and show nothing (errors are printed after this)."""
    if rank == 0:
        yield
        return
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        yield


def run_sharded(command: Callable[[Any], int], args: Any) -> int:
    """Run a CLI `command` on this rank of a launch: one seed for all ranks, output on rank 0
    only, files written by rank 0 only, a lost peer as one line."""
    group = world()
    rank = group.rank()
    if hasattr(args, "seed"):
        args.seed = shared_seed(group, args.seed)
    if rank != 0:
        for name in ("json", "plot"):  # bench reports: one writer
            if getattr(args, name, None):
                setattr(args, name, None)
    with _peer_errors(rank), _follower(rank):
        code = command(args)
    # No rank leaves before the others have run the step mlx-lm's decoding left in flight; a
    # rank already gone (serve's rank 0 ends by its signal) needs no wait.
    with contextlib.suppress(RuntimeError):
        broadcast_int(group, code)
    return code
