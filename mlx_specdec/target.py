"""The target: an mlx-lm model with layer taps and exact rollback.

One forward returns the logits *and* the taps (the residual-stream outputs of the decoder layers
a drafter listens to) from the same pass. Taps are captured by swapping the class of the tapped
layers for a subclass that records its output, so parameter names, quantization and
`load_weights` are untouched and no family's forward loop is copied here. Recurrent layers
(Gated DeltaNet, Mamba-2, short convolutions) roll back through `recurrent.py`.
The forward runs a weight-sharing copy of the model (on the CPU with compiled stand-ins for
mx.fast's norm and RoPE, bit-identical, `kernels.py`); `Target.model` stays as mlx-lm made it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import (
    ArraysCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from .cache import PaddedKVCache, padded_by_default
from .errors import SpecDecError
from .exact import ExactRotatingKVCache, ExactVerify, RowPlan, default_plan
from .kernels import stand_ins_available, weight_sharing_copy
from .recurrent import RecurrentCache, armed, prepare

PREFILL_STEP = 512


class _TapSink:
    """Holds the tapped layer outputs of the current forward (a plain object, not a parameter)."""

    def __init__(self) -> None:
        self.values: dict[int, mx.array] = {}


_TAPPED_CLASSES: dict[type, type] = {}


def _tapped_class(base: type) -> type:
    if base not in _TAPPED_CLASSES:

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = base.__call__(self, *args, **kwargs)
            # Gemma-4 layers return (h, shared_kv, offset); the residual stream is first.
            self._tap_sink.values[self._tap_id] = out[0] if isinstance(out, tuple) else out
            return out

        _TAPPED_CLASSES[base] = type(f"Tapped{base.__name__}", (base,), {"__call__": __call__})
    return _TAPPED_CLASSES[base]


class Target:
    """An mlx-lm causal LM seen as `ids -> (logits, taps)` with a rollback-able cache."""

    def __init__(
        self,
        model: nn.Module,
        config: dict | None = None,
        name: str = "target",
        *,
        stand_ins: bool | None = None,
        padded_attention: bool | None = None,
    ):
        self.model = model  # as mlx-lm made it: mlx-lm's own decoding of it is the baseline
        self.config = config or {}
        self.name = name
        # Our forward runs (and taps) a copy sharing the model's weights, so the caller's model
        # is never changed. `stand_ins` (default: where they work) swaps in the CPU stand-ins
        # for mx.fast's norm and RoPE (bit-identical results, see kernels.py). The copy holds
        # the arrays the model holds now: change dtypes or weights before making the Target.
        self.stand_ins = stand_ins_available() if stand_ins is None else stand_ins
        ours = weight_sharing_copy(model, stand_ins=self.stand_ins)
        language = getattr(ours, "language_model", ours)
        self._language = language
        # The decoder stack: `model` in most families, `backbone` in Nemotron-H.
        self.inner = getattr(language, "model", None) or language.backbone
        # Recurrent layers keep, during a verify forward, what exact rollback needs.
        self.recurrent_layers = prepare(ours)
        self.layers = ours.layers
        self.num_layers = len(self.layers)
        self._sink = _TapSink()
        self.tap_ids: tuple[int, ...] = ()
        # Verify over padded KV (`PaddedKVCache`), for the target and the drafter's state alike;
        # decided once here (default: where it pays).
        self.padded_attention = (
            padded_by_default() if padded_attention is None else padded_attention
        )
        self._check_head()
        self.exact: ExactVerify | None = None  # see `use_exact`

    # ----------------------------------------------------------------------------- structure
    @property
    def embed_tokens(self) -> nn.Module:
        return getattr(self.inner, "embed_tokens", None) or self.inner.embeddings

    @property
    def _text_config(self) -> dict:
        return self.config.get("text_config", self.config)

    @property
    def hidden_size(self) -> int:
        return int(self._text_config["hidden_size"])

    @property
    def vocab_size(self) -> int:
        """Rows of the logits (the embedding table, padding rows included)."""
        return int(self.embed_tokens.weight.shape[0])

    @property
    def max_context(self) -> int | None:
        """The context length the model was made for (None when its config does not say)."""
        n = self._text_config.get("max_position_embeddings")
        return int(n) if n else None

    @property
    def model_type(self) -> str:
        return str(self._text_config.get("model_type", self.config.get("model_type", "")))

    @property
    def embed_scale(self) -> float:
        """The factor mlx-lm multiplies token embeddings by (Gemma: sqrt(H), not rounded)."""
        return float(getattr(self.inner, "embed_scale", 1.0))

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self._language, "final_logit_softcapping", None)

    @property
    def head_module(self) -> nn.Module:
        """The module holding the output projection (the embedding when tied)."""
        return getattr(self._language, "lm_head", None) or self.embed_tokens

    def project(self, h: mx.array) -> mx.array:
        """The output projection alone (no soft-cap): tied embedding or lm_head."""
        module = self.head_module
        return module.as_linear(h) if module is self.embed_tokens else module(h)

    def head(self, h: mx.array) -> mx.array:
        """Final-normed hidden states -> logits, exactly as the model's own forward does."""
        out = self.project(h)
        cap = self.logit_softcap
        if cap:
            out = mx.tanh(out / cap) * cap
        return out

    def _check_head(self) -> None:
        # Our forward is `head(inner(x))` so prefill can skip the vocab projection of all but
        # the last row. Refuse families where that is not the model's own forward.
        probe = mx.array([[1, 2, 3]])
        try:
            ours = self.head(self.inner(probe, cache=None))
            mx.eval(ours)  # one forward at a time: a split model's collectives pair up in order
            theirs = self.model(probe)
        except Exception as e:  # noqa: BLE001 - any failure here means an unsupported layout
            raise SpecDecError(
                f"{self.name}: model type '{self.model_type}' has a layout mlx-specdec does not "
                f"support for speculation ({type(e).__name__}: {e}); use --mode baseline"
            ) from None
        if ours.shape != theirs.shape or not mx.allclose(
            ours.astype(mx.float32), theirs.astype(mx.float32), atol=1e-3, rtol=1e-3
        ):
            raise SpecDecError(
                f"{self.name}: model type '{self.model_type}' computes its logits in a way "
                "mlx-specdec does not reproduce; use --mode baseline"
            )

    def use_exact(self, exact: bool | RowPlan = True) -> None:
        """Exact verify (exact.py): every verify row through the kernels of the decode step at
        its position, and prefill in mlx-lm's chunks. True: this backend's plan; a `RowPlan`:
        that one (tests force the GPU's on the CPU); False: off. Caches made before keep their
        kind: make new ones."""
        plan = default_plan() if exact is True else exact
        self.exact = ExactVerify.prepare(self.inner, plan, self.head_module) if plan else None

    # ----------------------------------------------------------------------------- taps
    def set_taps(self, layer_ids: Sequence[int]) -> None:
        """Capture the outputs of these decoder layers (0-based, concatenated in this order)."""
        ids = tuple(int(i) for i in layer_ids)
        for i in ids:
            if not 0 <= i < self.num_layers - 1:
                raise SpecDecError(
                    f"drafter taps target layer {i}, but {self.name} has {self.num_layers} layers "
                    f"(taps must be in 0..{self.num_layers - 2}); the drafter was made for "
                    "another target"
                )
        for i in ids:
            layer = self.layers[i]  # our copy's layer: the caller's model is never tapped
            if layer is None:  # another rank's pipeline stage (distributed.ShardedTarget)
                continue
            if type(layer) not in _TAPPED_CLASSES.values():
                layer.__class__ = _tapped_class(type(layer))
            layer._tap_sink = self._sink
            layer._tap_id = i
        self.tap_ids = ids

    # ----------------------------------------------------------------------------- forward
    def _forward(self, ids: mx.array, cache: list[Any] | None) -> tuple[mx.array, mx.array | None]:
        """ids [S, T] -> (final-normed hidden states [S, T, H], taps [S, T, m*H] or None)."""
        self._sink.values.clear()
        h = self.inner(ids, cache=cache)
        taps = None
        if self.tap_ids:
            taps = mx.concatenate([self._sink.values[i] for i in self.tap_ids], axis=-1)
            self._sink.values.clear()
        return h, taps

    def __call__(
        self, ids: mx.array, cache: list[Any], *, last_only: bool = False
    ) -> tuple[mx.array, mx.array | None]:
        """Forward `ids` ([T] int) on top of `cache`: (logits [T or 1, V], taps [T, m*H]).
        Any of these T positions can be rolled back afterwards (`rollback`)."""
        with armed(cache), ExactVerify.rows_of(self.exact):
            return self._logits(ids, cache, last_only)

    def _logits(
        self, ids: mx.array, cache: list[Any] | None, last_only: bool
    ) -> tuple[mx.array, mx.array | None]:
        h, taps = self._forward(ids[None], cache)
        if last_only:
            h = h[:, -1:]
        return self.head(h)[0], (None if taps is None else taps[0])

    def forward_batch(self, ids: mx.array) -> tuple[mx.array, mx.array | None]:
        """A cache-free causal forward of sequences `ids` [S, T] (right padding leaves the real
        rows exact): (logits [S, T, V], taps [S, T, m*H]). What drafter training reads."""
        h, taps = self._forward(ids, None)
        return self.head(h), taps

    @property
    def state(self) -> list[Any]:
        """The arrays our forward reads (for `mx.compile(inputs=...)`)."""
        return [self.inner.state, self.head_module.state]

    def prefill(self, ids: mx.array, cache: list[Any]) -> tuple[mx.array, mx.array | None]:
        """Process a prompt in chunks; returns (logits of the last row [V], taps of all rows).

        With recurrent layers the last token is a chunk of its own, as mlx-lm's `generate_step`
        does it: a Mamba-2 layer computes a chunk in a closed form whose rounding depends on
        where chunks end, and this keeps its state after the prompt bitwise mlx-lm's. Chunks
        also end where a recurrent cache wants its state kept (`RecurrentCache.keep`, for
        prefix snapshots). Prefill positions cannot be rolled back."""
        n = ids.shape[0]
        ends = list(range(PREFILL_STEP, n, PREFILL_STEP)) + [n]
        recurrent = [c for c in cache if isinstance(c, RecurrentCache)]
        if n > 1 and recurrent:
            base = recurrent[0].offset
            stops = {n - 1} | {p - base for p in recurrent[0].wanted if 0 < p - base < n}
            ends = sorted({*ends, *stops})
        if self.exact:  # exactly mlx-lm's chunks: the prompt's K/V and first logits are its own
            ends = self.exact.prefill_ends(n)
        taps: list[mx.array] = []
        logits, start = None, 0
        for end in ends:
            logits, t = self._logits(ids[start:end], cache, last_only=True)
            if t is not None:
                taps.append(t)
            mx.eval([c.state for c in cache] + taps[-1:] + ([logits] if end == n else []))
            start = end
        assert logits is not None
        return logits[-1], (mx.concatenate(taps, axis=0) if taps else None)

    # ----------------------------------------------------------------------------- cache
    def make_cache(self, padded: bool | None = None) -> list[Any]:
        """A cache every layer of which can be rolled back exactly.

        Sliding-window layers get a plain `KVCache` instead of mlx-lm's `RotatingKVCache`: the
        rotating buffer cannot be trimmed once full, which silently corrupts speculation. The
        attention masks still honour the window; the cost is keeping the whole context for
        those layers (O(context) memory instead of O(window)). `padded` (default: the
        target's `padded_attention`) gives every layer a `PaddedKVCache` instead. Recurrent
        layers get a `RecurrentCache`; a recurrent layer type `recurrent.py` does not know is
        refused by name.
        """
        cache = make_prompt_cache(self.model)
        padded = self.padded_attention if padded is None else padded
        out = []
        for i, c in enumerate(cache):
            if type(c) in (KVCache, RotatingKVCache) and self.exact:
                c = self.exact.kv_cache(c)  # mlx-lm's kinds and buffer sizes: no padding
            elif type(c) in (KVCache, RotatingKVCache) and padded:
                c = PaddedKVCache()
            elif isinstance(c, RotatingKVCache):
                c = KVCache()
            elif type(c) is ArraysCache:
                c = RecurrentCache(len(c.cache))
            if not isinstance(
                c, KVCache | QuantizedKVCache | RecurrentCache | ExactRotatingKVCache
            ):
                raise SpecDecError(self._refusal(i, type(c).__name__, len(cache)))
            out.append(c)
        held = sum(isinstance(c, RecurrentCache) for c in out)
        if held != self.recurrent_layers:
            i = next(i for i, c in enumerate(out) if isinstance(c, RecurrentCache))
            raise SpecDecError(self._refusal(i, "ArraysCache", len(cache)))
        return out

    def _refusal(self, i: int, cache_type: str, n_caches: int) -> str:
        what = f"{cache_type} layers"
        if n_caches == self.num_layers:  # cache i is layer i's (some families skip layers)
            layer = self.layers[i]
            ours = ("mlx.", "mlx_specdec.")  # norms, linears, stand-ins: not the recurrent part
            parts = [
                type(m).__name__
                for name, m in layer.named_modules()
                if name and "." not in name and not type(m).__module__.startswith(ours)
            ]
            what = f"{type(layer).__name__} layers ({', '.join(parts) or cache_type})"
        return (
            f"{self.name}: its {what} keep a recurrent state that mlx-specdec cannot roll back "
            "exactly, so speculation would change the output; use --mode baseline"
        )

    @staticmethod
    def rollback(cache: list[Any], n: int) -> None:
        """Drop the last `n` positions of every layer: a KV cache moves its offset; a recurrent
        layer takes the state and conv window it kept at that position during the last
        forward (`Target.__call__`), which must have added at least `n` positions. Call it
        after every forward, even with n = 0: that frees what the recurrent layers kept."""
        for c in cache:
            if isinstance(c, RecurrentCache):
                c.rollback(n)
            elif n > 0:
                c.trim(n)
