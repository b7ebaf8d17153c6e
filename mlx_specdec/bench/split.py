"""Benchmarks of a target split across processes: plain decoding against speculation, in
tokens per second and collective operations per generated token.

- `mlx-specdec bench --sharding tensor|pipeline` runs on every rank of an `mlx.launch`
  (`run_rank`): the same prompts through plain decoding (mlx-lm's, on the split model) and
  speculation, a lossless check, and the collectives each forward makes, counted in its graph.
- `mlx-specdec bench-split` starts the ranks itself on this machine (`run`), once per link
  latency, through relays that delay every message (`link.py`), and prints how the speed-up
  grows with the latency next to a model of it.

The drafter is replicated on every rank (`distributed.py`); the `rank0` placement, the
drafter on rank 0 with its drafts sent to the others each round, is here to be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..autocap import cache_file, machine_info
from ..cli import blas_line, cap_cache_folder, target_switches
from ..demo import DEMO_DIR
from ..distributed import (
    SHARDINGS,
    agreed_draft_cap,
    broadcast_int,
    load_pair_sharded,
    run_sharded,
    settle,
)
from ..drafters.base import Proposal
from ..errors import SpecDecError
from ..generate import encode_prompt
from ..sampling import SamplingParams
from .link import POLL_S, LinkEmulator, free_ports, write_hostfiles
from .prompts import load_prompts
from .report import fmt_table, machine_line, write_json
from .run import Row, Sample, lossless_verdict, parse_drafters, run_row, summarize

PLACEMENTS = ("replicated", "rank0")
_COLLECTIVES = {"AllReduce": "all-sum", "AllGather": "all-gather", "Send": "send", "Recv": "recv"}
DEMO_PROMPTS = str(DEMO_DIR / "prompts.jsonl")


# ================================================================================ counting
def collectives(*outputs: mx.array) -> Counter:
    """The distributed operations in the graph of `outputs` (not evaluated), by kind."""
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "graph.dot"
        mx.export_to_dot(str(file), *outputs)
        labels = re.findall(r'label ="([^"]*)"', file.read_text())
    return Counter(kind for label in labels for key, kind in _COLLECTIVES.items() if key in label)


def all_sum_ms(group: Any, reps: int = 100) -> float:
    """Median milliseconds of one small all-sum on this link (what a collective costs)."""
    x = mx.ones((64,))
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(1000 * (time.perf_counter() - began))
    return statistics.median(times)


def per_forward(target: Any, plain: bool) -> int:
    """Collective operations one forward makes across the whole launch: every all-sum and
    all-gather, and each point-to-point hop once (its send; the recv is the same message)."""
    from mlx_lm.models.cache import make_prompt_cache

    ids = mx.zeros((2,), mx.int32)
    if plain:  # mlx-lm's own forward, as its decoding runs it
        outputs = [target.model(ids[None], cache=make_prompt_cache(target.model))]
    else:
        outputs = [x for x in target(ids, target.make_cache()) if x is not None]
    mine = collectives(*outputs)
    hops = mx.distributed.all_sum(mx.array([mine["send"]], mx.int32), group=target.group)
    return mine["all-sum"] + mine["all-gather"] + int(hops.item())


# ================================================================================ placement
class RankZeroDrafter:
    """The drafter on rank 0 only: its drafts reach the other ranks in one all-sum per round,
    with a host sync there for their count (greedy only: the drafts' distributions stay on
    rank 0). Everything else is the wrapped drafter's."""

    def __init__(self, inner: Any, group: mx.distributed.Group):
        self.inner, self.group = inner, group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def new_state(self, padded: bool = False) -> Any:
        return self.inner.new_state(padded) if self.group.rank() == 0 else []

    def propose(self, state, context, next_tokens, n: int, params: SamplingParams) -> Proposal:
        if not params.greedy:
            raise SpecDecError("the rank0 placement is measured greedy only (--temperature 0)")
        message = mx.zeros((n + 1,), mx.int32)
        if self.group.rank() == 0:
            tokens = self.inner.propose(state, context, next_tokens, n, params).tokens
            count = mx.array([tokens.shape[0]], mx.int32)
            message = mx.concatenate([count, tokens, message[: n - tokens.shape[0]]])
        message = mx.distributed.all_sum(message, group=self.group)
        count = int(message[0].item())
        return Proposal(message[1 : 1 + count])


# ================================================================================ one rank
def _rows(args: argparse.Namespace, target: Any, drafter: Any, kind: str) -> list[Row]:
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    if bad := [p for p in placements if p not in PLACEMENTS]:
        raise SpecDecError(f"--placements: unknown '{bad[0]}'; use {', '.join(PLACEMENTS)}")
    rows = [Row("baseline")]
    folder = cache_file(cap_cache_folder())
    for cap in [c.strip() for c in args.max_draft.split(",") if c.strip()]:
        wanted = "auto" if cap == "auto" else int(cap)
        n = agreed_draft_cap(target, drafter, wanted, cap_cache=folder) or drafter.max_draft
        for place in placements:
            d = drafter if place == "replicated" else RankZeroDrafter(drafter, target.group)
            label = f"{kind}@{n}" + ("" if place == "replicated" else " rank0")
            rows.append(Row(kind, n, d, label=label))
    return rows


def _set_link(group: Any, control: Path | None, latency: str | None) -> None:
    """Rank 0 tells the launcher's relays the next link latency; every rank then waits for
    the others, so the generations that follow all run at it."""
    if control is None or latency is None:
        return
    if group.rank() == 0:
        control.write_text(latency)
        time.sleep(2 * POLL_S)  # the relays read it within POLL_S
    broadcast_int(group, 0)


def _name(row: Row, latency: str | None) -> str:
    return row.name if latency is None else f"{row.name} +{latency}ms"


def run_rank(args: argparse.Namespace) -> int:
    """`bench --sharding`: one rank's part; rank 0 prints the table and writes --json. Under
    `bench-split` each prompt runs at every link latency in turn, so that the latencies are
    compared under the same load (a shared machine's drifts)."""
    refs = parse_drafters(args.drafter)
    ref = refs.get(None) or next(iter(refs.values()), None)
    target, tokenizer, drafter, config = load_pair_sharded(
        args.sharding,
        args.model,
        ref,
        mode="auto",
        drafter_bits=args.drafter_bits,
        rank_timeout=args.rank_timeout,
        **target_switches(),
    )
    if drafter is None:
        raise SpecDecError("bench --sharding races plain decoding against a drafter: pass one")
    if line := blas_line():
        print(line, file=sys.stderr)
    prompts = load_prompts(args.prompts, args.limit)
    ids = [encode_prompt(tokenizer, p.text, chat=not args.no_chat) for p in prompts]
    params = SamplingParams(args.temperature, seed=args.seed)
    rows = _rows(args, target, drafter, config.mode)
    control = Path(args.link_control) if getattr(args, "link_control", None) else None
    latencies = getattr(args, "link_latencies", None) or [None]
    samples: list[Sample] = []
    for row in rows:  # warm-up, excluded
        run_row(row, target, tokenizer, ids[0], args.max_new_tokens, params)
    for trial in range(args.trials):
        for i, (prompt, x) in enumerate(zip(prompts, ids, strict=True)):
            for latency in latencies:
                _set_link(target.group, control, latency)
                for row in rows:
                    result = run_row(row, target, tokenizer, x, args.max_new_tokens, params)
                    name = _name(row, latency)
                    samples.append(Sample.of(name, prompt.domain, i, trial, result))
    settle()
    target.set_taps(drafter.tap_ids)
    counts = {"plain": per_forward(target, True), "verify": per_forward(target, False)}
    report = _report(args, rows, latencies, samples, counts, params)
    report["all_sum_ms"] = {}
    for latency in latencies:
        _set_link(target.group, control, latency)
        report["all_sum_ms"][str(latency)] = all_sum_ms(target.group)
    _print(report)
    if args.json:
        write_json(args.json, report)
    return 0 if report["lossless"]["lossless"] is not False else 1


def _report(args, rows, latencies, samples, counts, params) -> dict[str, Any]:
    results = []
    for latency in latencies:
        base = summarize(samples, _name(rows[0], latency), "all")
        for row in rows:
            st = summarize(samples, _name(row, latency), "all")
            forward = counts["plain"] if row.mode == "baseline" else counts["verify"]
            forward += isinstance(row.drafter, RankZeroDrafter)  # its drafts' all-sum
            st.update(
                row=row.name,
                link_ms=latency,
                cap=row.cap,
                collectives_per_forward=forward,
                collectives_per_token=forward / st["accept_len"],
                speedup=st["decode_tps"] / base["decode_tps"] if base["decode_tps"] else None,
            )
            results.append(st)
    return {
        "kind": "bench-sharded",
        "sharding": args.sharding,
        "ranks": mx.distributed.init().size(),
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "results": results,
        "lossless": lossless_verdict(samples, _name(rows[0], latencies[0]), params.greedy),
    }


def _print(report: dict[str, Any]) -> None:
    header = ["link +ms", "mode", "accept", "tok/s", "speed-up", "collectives/forward", "/token"]
    keys = ["link_ms", "row", "accept_len", "decode_tps", "speedup", "collectives_per_forward"]
    rows = [[r[k] for k in keys] + [r["collectives_per_token"]] for r in report["results"]]
    print(f"\n{report['sharding']} parallel over {report['ranks']} ranks")
    print(fmt_table(header, rows))
    verdict = report["lossless"]
    if verdict["checked"]:
        same = "yes" if verdict["lossless"] else "NO"
        print(f"lossless: {same} ({verdict['compared']} greedy outputs against plain decoding)")
    where = lambda x: "this link" if x == "None" else f"link +{x} ms"  # noqa: E731
    pings = ", ".join(f"{ms:.3f} ms ({where(x)})" for x, ms in report["all_sum_ms"].items())
    print(f"one all-sum of 64 floats, median: {pings}")
    print(machine_line(report["machine"]))


# ================================================================================ bench-split
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="target (default: the demo pair, rewritten to split)")
    p.add_argument("--drafter", help="drafter (default: from the registry, or the demo's)")
    p.add_argument(
        "--split",
        default="tensor,pipeline",
        help="comma list of tensor, pipeline (default: both)",
    )
    p.add_argument("--ranks", type=int, default=2, help="processes on this machine")
    p.add_argument(
        "--pin",
        action="store_true",
        help="Linux: pin rank r to core r, so that ranks do not take each other's cores (as "
        "on one machine per rank)",
    )
    p.add_argument(
        "--link-latency",
        default="0,0.1,1",
        help="milliseconds added to every message between ranks, comma list; each prompt runs "
        "at each in turn (0: the relays alone)",
    )
    p.add_argument("--placements", default="replicated", help="replicated and/or rank0")
    p.add_argument("--prompts", help="as bench (default: the demo's code prompts)")
    p.add_argument("--limit", type=int, default=4, help="prompts per domain")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-draft", default="7", help="caps, as bench")
    p.add_argument("--drafter-bits", type=int, default=32, choices=[4, 8, 16, 32])
    p.add_argument("--json", metavar="OUT", help="write every launch's report as JSON")


def _pinned(rank: int) -> Any:
    """For the child of `rank`: run on core `rank` only."""
    if not hasattr(os, "sched_setaffinity"):
        raise SpecDecError("--pin needs Linux (sched_setaffinity)")
    core = rank % (os.cpu_count() or 1)
    return lambda: os.sched_setaffinity(0, {core})


def _launch(args: argparse.Namespace, sharding: str, folder: Path) -> dict:
    """One launch of this module's `main` on `args.ranks` local ranks, joined through relays
    that `--link-latency` drives; rank 0's report."""
    out, control = folder / f"{sharding}.json", folder / f"{sharding}.link"
    command = [sys.executable, "-m", "mlx_specdec.bench.split", "--sharding", sharding]
    command += ["--json", str(out), "--trials", str(args.trials), "--limit", str(args.limit)]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--max-draft", args.max_draft]
    command += ["--placements", args.placements, "--drafter-bits", str(args.drafter_bits)]
    command += ["--link-latency", args.link_latency, "--link-control", str(control)]
    command += ["--prompts", args.prompts or (DEMO_PROMPTS if not args.model else "code")]
    for flag in ("model", "drafter"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    first = free_ports(args.ranks)
    ports = list(range(first, first + args.ranks))
    with LinkEmulator(0.0, control) as link:
        files = write_hostfiles(folder, ports, [link.relay(p) for p in ports])
        procs = [
            subprocess.Popen(
                command,
                env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(files[r])},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_pinned(r) if args.pin else None,
            )
            for r in range(args.ranks)
        ]
        errors = [p.communicate()[1] for p in procs]
    if not out.is_file():
        lines = [x for e in errors for x in e.splitlines() if "error" in x] or errors[0][-500:]
        raise SpecDecError(f"bench-split: the {sharding} launch failed: {lines[0]}")
    print(f"  {sharding}: done", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def latency_model(report: dict) -> list[list[Any]]:
    """Per link latency: the time one collective adds, fitted on plain decoding
    (t(L) = t(0) + c * l), and the speed-up it predicts for each drafter row from that row's
    time and collectives at the first latency, next to the one measured."""
    by_link: dict[Any, list[dict]] = {}
    for r in report["results"]:
        by_link.setdefault(r["link_ms"], []).append(r)
    (plain0, *spec0), *_ = by_link.values()
    rows = []
    for latency, (plain, *spec) in by_link.items():
        per_token = plain0["collectives_per_token"]
        added = (1 / plain["decode_tps"] - 1 / plain0["decode_tps"]) / per_token
        t_plain = 1 / plain0["decode_tps"] + per_token * added
        ping = report["all_sum_ms"][latency]
        for s, s0 in zip(spec, spec0, strict=True):
            t_spec = 1 / s0["decode_tps"] + s0["collectives_per_token"] * added
            rows.append([latency, s["row"], ping, 1000 * added, t_plain / t_spec, s["speedup"]])
    return rows


def run(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if bad := [s for s in splits if s not in SHARDINGS]:
        raise SpecDecError(f"--split: unknown '{bad[0]}'; use {', '.join(SHARDINGS)}")
    if args.ranks < 2:
        raise SpecDecError(f"--ranks must be at least 2, got {args.ranks}")
    for x in args.link_latency.split(","):
        if not re.fullmatch(r"\d+(\.\d+)?", x.strip()):
            raise SpecDecError(f"--link-latency takes milliseconds, got '{x}'")
    with tempfile.TemporaryDirectory() as tmp:
        reports = {s: _launch(args, s, Path(tmp)) for s in splits}
    header = ["split", "link +ms", "mode", "accept", "tok/s", "speed-up", "collectives/token"]
    keys = ["link_ms", "row", "accept_len", "decode_tps", "speedup", "collectives_per_token"]
    table = [[s, *(r[k] for k in keys)] for s, rep in reports.items() for r in rep["results"]]
    print(fmt_table(header, table))
    print("\nlatency model: t(L) = t(0) + collectives per token * l, l fitted on plain decoding")
    model = [[s, *row] for s, rep in reports.items() for row in latency_model(rep)]
    header = ["split", "link +ms", "mode", "all-sum ms", "l ms", "predicted", "measured"]
    print(fmt_table(header, model))
    for s, rep in reports.items():
        verdict = rep["lossless"]
        print(f"{s}: lossless {'yes' if verdict['lossless'] else 'NO'} ({verdict['compared']})")
    print(machine_line(next(iter(reports.values()))["machine"]))
    if args.json:
        write_json(args.json, {"kind": "bench-split", "launches": reports})
    return 0 if all(r["lossless"]["lossless"] is not False for r in reports.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """One rank of a `bench-split` launch: `bench`'s flags, and the link's latencies and
    control file (written by rank 0, read by the launcher's relays)."""
    from .cli import add_arguments as add_bench_arguments

    parser = argparse.ArgumentParser(prog="python -m mlx_specdec.bench.split")
    add_bench_arguments(parser)
    parser.add_argument("--link-latency", required=True)
    parser.add_argument("--link-control", required=True)
    args = parser.parse_args(argv)
    args.link_latencies = [x.strip() for x in args.link_latency.split(",") if x.strip()]
    try:
        return run_sharded(run_rank, args)
    except SpecDecError as e:
        print(f"mlx-specdec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
