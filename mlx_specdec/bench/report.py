"""What `mlx-specdec bench` prints and writes: Markdown tables, the cost-model tables, loop
efficiency, the lossless verdict line, the plot, the JSON report and the machine line."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..autocap import CostModel
from ..errors import SpecDecError


def machine_line(m: dict[str, str]) -> str:
    """`autocap.machine_info()` on one line."""
    return (
        f"machine: {m['chip']} | CPU {m['cpu']} | MLX backend {m['backend']} | BLAS {m['blas']} "
        f"| mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, Python {m['python']}"
    )


def fmt_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (so printed output pastes into docs as is)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(results: list[dict[str, Any]]) -> str:
    header = [
        "mode",
        "cap",
        "domain",
        "accept",
        "decode tok/s",
        "e2e tok/s",
        "TTFT ms",
        "speed-up",
        "e2e speed-up",
    ]
    rows = [
        [
            r["row"],
            r["cap"],
            r["domain"],
            r["accept_len"],
            r["decode_tps"],
            r["e2e_tps"],
            r["ttft_ms"],
            r.get("speedup"),
            r.get("e2e_speedup"),
        ]
        for r in results
    ]
    return fmt_table(header, rows)


def cost_tables(costs: CostModel, survival: Sequence[float], label: str) -> str:
    ks = sorted(costs.verify_ms)
    curve = fmt_table(
        ["K"] + [str(k) for k in ks], [["verify ms"] + [costs.verify_ms[k] for k in ks]]
    )
    body = [
        [
            r["cap"],
            r["draft_ms"],
            r["verify_ms"],
            r["draft_ms"] + r["verify_ms"],
            r["accept_len"],
            r["tok_s"],
            r["speedup"],
        ]
        for r in costs.table(survival)
    ]
    caps = fmt_table(
        [
            "cap",
            "draft ms",
            "verify ms (cap+1)",
            "round ms",
            "E[accept]",
            "pred tok/s",
            "pred speed-up",
        ],
        body,
    )
    best = costs.best_cap(survival) if costs.draft_ms else None
    return (
        f"cost model {label} (context {costs.context_len} tokens; plain decode step "
        f"{costs.verify_ms[1]:.2f} ms = {costs.baseline_tps:.1f} tok/s)\n{curve}\n\n{caps}\n"
        + (f"best cap: {best}\n" if best else "")
    )


def efficiency_rows(rows_stats: list[dict[str, Any]], costs: dict[str, CostModel]) -> str:
    body = []
    for r in rows_stats:
        cm = costs.get(r["mode"])
        if cm is None or r["cap"] is None or r["cap"] not in cm.draft_ms:
            continue
        pred = cm.predicted_tps(r["cap"], r["accept_len"])
        r["predicted_tps"], r["efficiency"] = pred, r["decode_tps"] / pred
        body.append(
            [r["row"], r["domain"], r["accept_len"], r["decode_tps"], pred, r["efficiency"]]
        )
    if not body:
        return ""
    return (
        "loop efficiency = measured decode tok/s / predicted from the measured component "
        "times at the measured accept length (aim >= 0.95)\n"
        + fmt_table(
            ["row", "domain", "accept", "measured tok/s", "predicted tok/s", "efficiency"], body
        )
        + "\n"
    )


def plot(path: str, stats: list[dict[str, Any]], costs: dict[str, CostModel], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecDecError("--plot needs matplotlib: pip install 'mlx-specdec[bench]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in dict.fromkeys(s["row"] for s in stats if s.get("speedup") is not None)]
    domains = list(dict.fromkeys(s["domain"] for s in stats))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        ys = [
            next((s["speedup"] for s in stats if s["row"] == row and s["domain"] == d), 0)
            for d in domains
        ]
        ax1.bar([j + i * width for j in range(len(domains))], ys, width, label=row)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(domains))], domains)
    ax1.set_ylabel("decode speed-up over mlx-lm")
    ax1.legend(fontsize=8)
    for name, cm in costs.items():
        ks = sorted(cm.verify_ms)
        ax2.plot(ks, [cm.verify_ms[k] for k in ks], marker="o", label=f"verify ({name})")
        if cm.draft_ms:
            cs = sorted(cm.draft_ms)
            ax2.plot(
                [c + 1 for c in cs],
                [cm.draft_ms[c] for c in cs],
                marker="x",
                ls="--",
                label=f"{name} drafter round (cap = K-1)",
            )
    ax2.set_xlabel("tokens per target forward K")
    ax2.set_ylabel("ms")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise SpecDecError(f"cannot write the plot '{path}': {e.strerror or e}") from None
    plt.close(fig)


def write_json(path: str, report: dict[str, Any]) -> None:
    try:
        Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n")
    except OSError as e:
        raise SpecDecError(f"cannot write the JSON report '{path}': {e.strerror or e}") from None


def command_line() -> str:
    args = sys.argv[1:]
    return "mlx-specdec bench " + " ".join(args[1:] if args[:1] == ["bench"] else args)


def verdict_line(v: dict[str, Any]) -> str:
    if not v["checked"]:
        return f"lossless: verdict {v['note']}"
    if v["lossless"]:
        return (
            f"lossless: yes, {v['compared']} greedy outputs identical to {v['reference']} "
            "token by token"
        )
    mismatches = v["mismatches"]
    first = mismatches[0]
    where = (
        f"first: {first['row']} on prompt {first['prompt']}, from token {first['first_difference']}"
    )
    head = (
        f"lossless: NO, {len(mismatches)} of {v['compared']} outputs differ from {v['reference']}"
    )
    if "near_ties" not in v:
        return f"{head} ({where})"
    ties, real = v["near_ties"], len(mismatches) - v["near_ties"]
    # Show a real mismatch first: it is the one that needs a look.
    shown = next((m for m in mismatches if not _near_tie(m)), first) if real else first
    why = shown.get("divergence") or {}
    detail = (
        f"{shown['row']} on prompt {shown['prompt']} from token {shown['first_difference']}: "
        + _divergence_words(why)
    )
    split = f"{ties} at near-ties of the target's logits (kernel rounding: see --exact)"
    if real:
        split += f", {real} REAL MISMATCH{'ES' if real > 1 else ''} (a bug)"
    return f"{head}: {split}; e.g. {detail}"


def _near_tie(m: dict[str, Any]) -> bool:
    return bool(m.get("divergence") and m["divergence"]["near_tie"])


def _divergence_words(d: dict[str, Any]) -> str:
    if not d:
        return "no divergence found on replay"
    a, b = d["compared"]
    what = f"{d['margin_ulps']} {d['dtype']} ulps"
    if d["near_tie"]:
        return f"a near-tie, tokens {a} and {b} {what} apart"
    return f"a real mismatch, token {a} ahead of {b} by {what}"
