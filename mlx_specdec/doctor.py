"""`mlx-specdec doctor`: is a verify row bit-identical to the decode step, on this backend and
this model?

Speculative greedy output equals plain decoding's only if every row of a K-token verify is
computed exactly as the one-token decode step computes that position. The doctor checks it
twice, at a few widths K and context lengths:

- ops: this model's own matmuls, norm, attention and output projection, with its shapes and
  weights, each row computed alone (the decode step) and among K (a verify). This names the
  ops that are row-variant here (what `../shared/tools/row_invariance.py` measured, per op).
- model: after a prompt, a verify of K tokens against K decode steps of mlx-lm's own decoding:
  the layer outputs, the K/V each row writes, the logits, and the prompt's K/V; for the normal
  verify and for the exact one (`--exact`, `exact.py`).
- control: mlx-lm's own decoding run twice on the same prompt. On MLX CUDA in bf16 it was
  measured not to repeat itself bit for bit at some context lengths (docs/exactness.md); no
  verify can then match it, and the doctor says so instead of calling --exact a bug.

`serve` runs a short check at start-up and logs `Report.summary()`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from .divergence import dtype_name, ulp_distance
from .errors import SpecDecError
from .exact import ExactVerify, RowPlan, _calls_sdpa
from .target import Target

WIDTHS = (2, 3, 4, 8, 16)  # around the switches at 2 (GEMV / qmv), 4 (CUDA vector attention), 8
QUICK_WIDTHS = (2, 8)  # serve's start-up check
REPEAT = "control: mlx-lm's own decoding, run twice"


def default_positions(quick: bool = False) -> tuple[int, ...]:
    """Context lengths to check: on a GPU past cuDNN's 256-key decode switch and Metal's
    1024-key one; on the CPU no kernel depends on them, so short ones (fast to prefill)."""
    if mx.default_device() == mx.cpu:
        return (16,) if quick else (8, 300)
    return (300,) if quick else (8, 300, 1100)


@dataclass
class Check:
    """One thing compared, row alone vs row among K: the widths where it was bit-identical and,
    where not, the largest difference in ulps of its dtype."""

    name: str
    exact: list[int] = field(default_factory=list)
    differ: dict[int, int] = field(default_factory=dict)
    note: str = ""

    def record(self, width: int, a: mx.array, b: mx.array) -> None:
        if a.shape == b.shape and mx.array_equal(a, b).item():
            if width not in self.exact and width not in self.differ:
                self.exact.append(width)
            return
        if width in self.exact:
            self.exact.remove(width)
        ulps = int(ulp_distance(a, b, a.dtype).max()) if a.shape == b.shape else -1
        self.differ[width] = max(self.differ.get(width, 0), ulps)

    @property
    def ok(self) -> bool:
        return not self.differ

    def verdict(self) -> str:
        """Widths are K >= 1; a check made once (the prompt's K/V) records width 0."""
        if not self.exact and not self.differ:
            return "not checked" + (f" ({self.note})" if self.note else "")
        if self.ok:
            return "exact" if self.exact == [0] else "exact at every K"
        worst = max(self.differ.values())
        how = f"up to {worst} ulp{'s' * (worst != 1)}" if worst >= 0 else "shapes differ"
        how += f"; {self.note}" if self.note else ""
        ks = ", ".join(str(k) for k in sorted(self.differ) if k)
        return f"DIFFERS at K = {ks} ({how})" if ks else f"DIFFERS ({how})"


@dataclass
class Report:
    """What the doctor found: op checks, and model checks per path ("verify", "exact")."""

    title: str
    widths: list[int]
    positions: list[int]
    ops: list[Check]
    paths: dict[str, list[Check]]
    plan: str
    repeat: Check = field(default_factory=lambda: Check(REPEAT))

    def path_ok(self, path: str) -> bool:
        return all(c.ok for c in self.paths[path])

    @property
    def exact_bug(self) -> bool:
        """The exact path differs where plain decoding repeats itself: our bug."""
        return not self.path_ok("exact") and self.repeat.ok

    @property
    def variant_ops(self) -> list[str]:
        return [c.name.split(":")[0] for c in self.ops if not c.ok]

    def verdict(self) -> str:
        if self.path_ok("verify"):
            return (
                "verify is bit-exact on this backend and model at every K tested: speculative "
                "greedy output is plain decoding's, token for token (--exact not needed)"
            )
        if self.path_ok("exact"):
            return (
                f"verify differs from the decode step here ({self._cause()}), so greedy output "
                "can differ at near-ties; with --exact every row is bit-identical to the decode "
                "step at every K tested"
            )
        bad = ", ".join(c.name for c in self.paths["exact"] if not c.ok)
        if not self.repeat.ok:
            return (
                f"--exact differs here ({bad}), but so does mlx-lm's own decoding run twice on "
                "the same prompt: plain decoding is not reproducible bit for bit on this backend "
                "and model, so no verify can match it; --exact runs the decode step's kernels "
                "and shapes, and greedy output can differ only where plain decoding's own does"
            )
        return (
            f"--exact is NOT bit-exact here ({bad}): a bug on this backend or model, please "
            "report it with this output"
        )

    def _cause(self) -> str:
        ops = ", ".join(dict.fromkeys(self.variant_ops))
        if ops:
            return f"row-variant: {ops}"
        # Every op computes a row alone as among K: the keys a verify row attends over differ
        # (a sliding window's ring, read in ring order by plain decoding).
        return "no op is row-variant alone: the verify's cache presents other keys"

    def lines(self) -> list[str]:
        ks = ", ".join(map(str, self.widths))
        ctx = ", ".join(map(str, self.positions))
        out = [
            self.title,
            "Each check computes rows alone (the decode step, one token) and together (a",
            f"verify of K tokens) and compares them bit for bit. K = {ks}; contexts of {ctx}.",
            "",
            "ops (this model's own, with its shapes and weights)",
        ]
        width = max([len(c.name) for c in self.ops] + [len(c.name) for c in self.paths["verify"]])
        out += [f"  {c.name.ljust(width)}  {c.verdict()}" for c in self.ops]
        out += ["", "model: a verify of K tokens vs K steps of mlx-lm's own decoding"]
        for path, label in (("verify", "verify"), ("exact", "exact verify (--exact)")):
            out.append(f"  {label}")
            out += [f"    {c.name.ljust(width)}  {c.verdict()}" for c in self.paths[path]]
        out.append(f"  {self.repeat.name}: {self.repeat.verdict()}")
        return [*out, f"  (--exact plan: {self.plan})", "", f"verdict: {self.verdict()}"]

    def summary(self) -> str:
        """One line for a log."""
        ks = ",".join(map(str, self.widths))
        if self.path_ok("verify"):
            return f"exactness (doctor, K={ks}): verify bit-identical to the decode step"
        exact = "bit-identical" if self.path_ok("exact") else "NOT bit-identical (a bug)"
        if not self.path_ok("exact") and not self.repeat.ok:
            exact = "differs, as plain decoding run twice does"
        return (
            f"exactness (doctor, K={ks}): verify differs from the decode step "
            f"({self._cause()}); --exact: {exact}"
        )

    def to_json(self) -> dict[str, Any]:
        def checks(cs: list[Check]) -> list[dict[str, Any]]:
            return [{"name": c.name, "exact": c.exact, "differ": c.differ} for c in cs]

        return {
            "title": self.title,
            "widths": self.widths,
            "positions": self.positions,
            "ops": checks(self.ops),
            "paths": {p: checks(cs) for p, cs in self.paths.items()},
            "repeat": checks([self.repeat])[0],
            "verdict": self.verdict(),
        }


# ----------------------------------------------------------------------------- op checks
def rows_check(
    name: str, fn: Callable[[mx.array], mx.array], x: mx.array, widths: Sequence[int]
) -> Check:
    """`fn` on each row of `x` [1, W, ...] alone vs on the first K rows at once."""
    check = Check(name)
    alone = [fn(x[:, i : i + 1]) for i in range(max(widths))]
    mx.eval(alone)
    for k in widths:
        together = fn(x[:, :k])
        for i in range(k):
            check.record(k, together[:, i : i + 1], alone[i])
    return check


def _activation(target: Target) -> tuple[mx.Dtype, int]:
    """The dtype and width of the target's hidden states (an embedding row's)."""
    row = target.embed_tokens(mx.array([[0]]))
    return row.dtype, row.shape[-1]


def _matmuls(target: Target) -> list[tuple[str, nn.Module, int]]:
    """One module per kind of matmul the target runs (dense; quantized per bits and group),
    with its input width; the output projection is checked on its own."""
    seen: dict[Any, tuple[str, nn.Module, int]] = {}
    for name, m in target.inner.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            key = ("q", m.bits, m.group_size, getattr(m, "mode", "affine"))
            width = m.scales.shape[-1] * m.group_size
        elif isinstance(m, nn.Linear):
            key, width = ("dense", m.weight.dtype), m.weight.shape[1]
        else:
            continue
        seen.setdefault(key, (name, m, width))
    return list(seen.values())


def _label(name: str, m: nn.Module, width: int) -> str:
    shape = f"{width} -> {m.weight.shape[0]}"
    if isinstance(m, nn.QuantizedLinear):
        return f"quantized matmul ({m.bits}-bit, group {m.group_size}): {name}, {shape}"
    return f"matmul ({dtype_name(m.weight.dtype)}): {name}, {shape}"


def _first(obj: Any, *names: str) -> int | None:
    return next((int(getattr(obj, n)) for n in names if getattr(obj, n, None)), None)


def _attention_shape(target: Target) -> tuple[int, int, int] | None:
    """Query heads, KV heads and head size of the first attention layer, under the names
    mlx-lm's families give them (None: no attention layer found)."""
    layer = next((m for _, m in target.inner.named_modules() if _calls_sdpa(type(m))), None)
    if layer is None:
        return None
    heads = _first(layer, "n_heads", "num_heads", "num_attention_heads")
    kv = _first(layer, "n_kv_heads", "num_key_value_heads", "num_kv_heads") or heads
    dim = _first(layer, "head_dim")
    if dim is None and heads and hasattr(getattr(layer, "o_proj", None), "weight"):
        dim = layer.o_proj.weight.shape[-1] // heads  # dense o_proj: [hidden, heads * dim]
    return (heads, kv, dim) if heads and kv and dim else None


def attention_check(target: Target, widths: Sequence[int], positions: Sequence[int]) -> Check:
    """mlx-lm's attention call as the decode step makes it (one query over an mlx-lm KVCache,
    no mask) vs as a verify makes it (K queries, causal), at each context length."""
    shape = _attention_shape(target)
    if shape is None:
        return Check("attention", note="no attention layer found")
    heads, kv, dim = shape
    dtype, k_max = _activation(target)[0], max(widths)
    check = Check(f"attention: {heads} heads / {kv} kv, dim {dim}")

    def sdpa(q: mx.array, k: mx.array, v: mx.array, mask: Any) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, mask=mask)

    for n in positions:
        q = mx.random.normal((1, heads, k_max, dim)).astype(dtype)
        k = mx.random.normal((1, kv, n + k_max, dim)).astype(dtype)
        v = mx.random.normal((1, kv, n + k_max, dim)).astype(dtype)
        decode, alone = KVCache(), []
        decode.update_and_fetch(k[:, :, :n], v[:, :, :n])
        for i in range(k_max):
            keys, values = decode.update_and_fetch(
                k[:, :, n + i : n + i + 1], v[:, :, n + i : n + i + 1]
            )
            alone.append(sdpa(q[:, :, i : i + 1], keys, values, None))
            mx.eval(alone[-1], decode.state)
        for w in widths:
            verify = KVCache()
            verify.update_and_fetch(k[:, :, :n], v[:, :, :n])
            keys, values = verify.update_and_fetch(k[:, :, n : n + w], v[:, :, n : n + w])
            together = sdpa(q[:, :, :w], keys, values, "causal")
            for i in range(w):
                check.record(w, together[:, :, i : i + 1], alone[i])
    return check


def op_checks(target: Target, widths: Sequence[int], positions: Sequence[int]) -> list[Check]:
    (dtype, hidden), k_max = _activation(target), max(widths)

    def rows_of(width: int) -> mx.array:
        return mx.random.normal((1, k_max, width)).astype(dtype)

    out = [rows_check(_label(n, m, w), m, rows_of(w), widths) for n, m, w in _matmuls(target)]
    norm = next(
        (m for _, m in target.inner.named_modules() if type(m).__name__.endswith("RMSNorm")), None
    )
    if norm is not None:
        out.append(rows_check("rms norm", norm, rows_of(norm.weight.shape[0]), widths))
    out.append(attention_check(target, widths, positions))
    out.append(rows_check("output projection", target.head, rows_of(hidden), widths))
    return out


# ----------------------------------------------------------------------------- model checks
def _kv_layers(reference: list[Any], cache: list[Any]) -> list[int]:
    """Layers whose rows both caches keep in position order (mlx-lm's rotating cache does not
    once full; recurrent layers keep a state, not rows)."""
    return [
        i
        for i, (r, c) in enumerate(zip(reference, cache))
        if isinstance(r, KVCache) and not isinstance(r, RotatingKVCache) and hasattr(c, "keys")
    ]


def _kv_rows(cache: list[Any], layers: list[int], start: int, stop: int) -> list[mx.array]:
    return [a[..., start:stop, :] for i in layers for a in (cache[i].keys, cache[i].values)]


@dataclass
class _Decoded:
    """mlx-lm's own decoding after a prompt: logits, layer outputs and K/V of each step."""

    logits: mx.array  # [K, V]
    taps: mx.array  # [K, layers - 1, H]
    cache: list[Any]


def _prefill_as_mlx_lm(target: Target, ids: mx.array, cache: list[Any]) -> None:
    start = 0
    for end in ExactVerify.prefill_ends(ids.shape[0]):
        target(ids[start:end], cache, last_only=True)
        mx.eval([c.state for c in cache])
        start = end


def _decode(target: Target, prompt: mx.array, rows: mx.array) -> _Decoded:
    cache = make_prompt_cache(target.model)
    _prefill_as_mlx_lm(target, prompt, cache)
    logits, taps = [], []
    for i in range(rows.shape[0]):
        lg, tp = target(rows[i : i + 1], cache)
        mx.eval(lg, tp, [c.state for c in cache])
        logits.append(lg)
        taps.append(tp)
    return _Decoded(mx.concatenate(logits), _split_layers(mx.concatenate(taps), target), cache)


def _same_decoding(check: Check, a: _Decoded, b: _Decoded) -> None:
    """Record whether two runs of mlx-lm's decoding gave the same logits, layer outputs and K/V."""
    check.record(0, a.logits, b.logits)
    check.record(0, a.taps, b.taps)
    kv = _kv_layers(a.cache, b.cache)
    stop = max((a.cache[i].offset for i in kv), default=0)
    for x, y in zip(_kv_rows(a.cache, kv, 0, stop), _kv_rows(b.cache, kv, 0, stop)):
        check.record(0, x, y)


def _split_layers(taps: mx.array, target: Target) -> mx.array:
    return taps.reshape(taps.shape[0], len(target.tap_ids), -1)


def _model_path(
    target: Target, prompt: mx.array, rows: mx.array, ref: _Decoded, widths: Sequence[int]
) -> list[Check]:
    """`target`'s own prefill and verify (normal or exact) against mlx-lm's decoding."""
    names = ("prefill K/V", "layer outputs", "K/V written", "logits")
    prefill, layers_, written, logits_ = (Check(n) for n in names)
    cache = target.make_cache()
    target.prefill(prompt, cache)
    n = prompt.shape[0]
    kv = _kv_layers(ref.cache, cache)
    for a, b in zip(_kv_rows(cache, kv, 0, n), _kv_rows(ref.cache, kv, 0, n)):
        prefill.record(0, a, b)
    for w in widths:
        lg, tp = target(rows[:w], cache)
        tp = _split_layers(tp, target)
        mx.eval(lg, tp, [c.state for c in cache])
        logits_.record(w, lg, ref.logits[:w])
        for layer in range(tp.shape[1]):
            before = w in layers_.differ
            layers_.record(w, tp[:, layer], ref.taps[:w, layer])
            if w in layers_.differ and not before and not layers_.note:
                layers_.note = f"first at layer {layer}"
        for a, b in zip(_kv_rows(cache, kv, n, n + w), _kv_rows(ref.cache, kv, n, n + w)):
            written.record(w, a, b)
        Target.rollback(cache, w)
    if not kv:
        prefill.note = written.note = "no layer keeps K/V rows"
    return [prefill, layers_, written, logits_]


def _merge(into: list[Check], more: list[Check]) -> None:
    for a, b in zip(into, more):
        for w in b.exact:
            if w not in a.differ and w not in a.exact:
                a.exact.append(w)
        for w, u in b.differ.items():
            if w in a.exact:
                a.exact.remove(w)
            a.differ[w] = max(a.differ.get(w, 0), u)
        a.note = a.note or b.note


def _twin(target: Target, exact: bool | RowPlan) -> Target:
    """A Target on the same mlx-lm model (sharing its weights), with taps on every layer, and
    exact verify as `Target.use_exact(exact)` sets it (each Target hooks its own copy, so the
    twins never mix)."""
    twin = Target(
        target.model,
        target.config,
        target.name,
        stand_ins=target.stand_ins,
        padded_attention=target.padded_attention,
    )
    if exact:
        twin.use_exact(exact)
    twin.set_taps(range(twin.num_layers - 1))
    return twin


def run_doctor(
    target: Target,
    widths: Sequence[int] = WIDTHS,
    positions: Sequence[int] | None = None,
    *,
    plan: RowPlan | None = None,
    seed: int = 0,
) -> Report:
    """Check `target` (its mlx-lm model; `target` itself is not changed). `plan`: the exact
    path's row plan (None: this backend's, `default_plan`; tests force one on the CPU)."""
    widths = sorted({int(w) for w in widths})
    positions = default_positions() if positions is None else positions
    if not widths or widths[0] < 1:
        raise SpecDecError(f"widths must be >= 1, got {widths}")
    if target.max_context:
        positions = [p for p in positions if p + widths[-1] < target.max_context]
    positions = sorted({int(p) for p in positions if p >= 1})
    if not positions:
        raise SpecDecError("no context length fits the model; pass smaller --positions")
    mx.random.seed(seed)
    normal = _twin(target, False)
    exact = _twin(target, True if plan is None else plan)
    paths: dict[str, list[Check]] = {}
    repeat = Check(REPEAT)
    for p in positions:
        ids = mx.random.randint(0, target.vocab_size, (p + widths[-1],)).astype(mx.int32)
        prompt, rows = ids[:p], ids[p:]
        ref = _decode(normal, prompt, rows)
        _same_decoding(repeat, ref, _decode(normal, prompt, rows))
        for name, t in (("verify", normal), ("exact", exact)):
            checks = _model_path(t, prompt, rows, ref, widths)
            if name in paths:
                _merge(paths[name], checks)
            else:
                paths[name] = checks
    assert exact.exact is not None
    row_plan = exact.exact.plan
    described = row_plan.describe() if row_plan else "this backend needs no row plan"
    title = (
        f"mlx-specdec doctor: {target.name} ({target.model_type}, "
        f"{dtype_name(_activation(target)[0])}, {target.num_layers} layers) on "
        f"{_backend()}, mlx {mx.__version__}"
    )
    ops = op_checks(normal, widths, positions)
    return Report(title, widths, positions, ops, paths, described, repeat)


def _backend() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


# ----------------------------------------------------------------------------- command line
def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a comma list of integers, got '{text}'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="target: Hugging Face repo id or local folder (default: demo)")
    p.add_argument(
        "--widths", type=_ints, default=list(WIDTHS), help="verify widths K (default 2,3,4,8,16)"
    )
    p.add_argument(
        "--positions",
        type=_ints,
        help="context lengths before the verify (default: 8,300,1100 on a GPU, 8,300 on the CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the report; 1 when the exact path is not bit-exact where plain decoding repeats
    itself (a bug), else 0."""
    from .cli import target_switches
    from .demo import demo_paths
    from .loading import load_target

    model = args.model or demo_paths("baseline")[0]
    target, _ = load_target(model, name=args.model or "demo target", **target_switches())
    report = run_doctor(target, args.widths, args.positions, seed=args.seed)
    print("\n".join(report.lines()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
    sys.stdout.flush()
    return 1 if report.exact_bug else 0


def startup_check(target: Target) -> str:
    """`serve`'s start-up line: a short doctor run (K = 2 and 8, one context length), or why
    it was skipped. It never stops the server."""
    try:
        report = run_doctor(target, QUICK_WIDTHS, default_positions(quick=True))
    except Exception as e:  # noqa: BLE001 - a check that fails must not keep the server down
        return f"exactness check skipped ({type(e).__name__}: {e})"
    return report.summary()
