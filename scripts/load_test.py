"""Load an OpenAI-compatible server with concurrent streaming clients (not a CI test).

Two uses:

    # throughput: aggregate tok/s and time to first token for 1, 2, 4, 8 concurrent clients
    python scripts/load_test.py --url http://127.0.0.1:8080 --clients 1,2,4,8 --requests 4

    # soak: 32 clients for 5 minutes; zero errors, the server's memory, and every greedy answer
    # identical to the same request's answer when it runs alone on that server
    python scripts/load_test.py --url http://127.0.0.1:8080 --clients 32 --duration 300 \
        --check-solo --pid $(pgrep -f "mlx-specdec serve")

Each client sends the demo prompts (mlx_specdec/demo/prompts.jsonl) in turn as streamed
`/v1/completions`, greedy unless `--temperature`. Tokens are counted from the answer's usage
when the server streams it, else by the demo tokenizer. Works against `mlx-specdec serve` and
`mlx_lm.server` alike. Prints one Markdown row per client count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = Path(__file__).resolve().parents[1] / "mlx_specdec" / "demo" / "prompts.jsonl"


@dataclass
class Answer:
    prompt: str
    text: str
    tokens: int
    ttft: float
    seconds: float


@dataclass
class Tally:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def prompts(n: int | None) -> list[str]:
    lines = PROMPTS.read_text().splitlines()
    out = [json.loads(line)["prompt"] for line in lines if line.strip()]
    return out[:n] if n else out


def counter():  # noqa: ANN201 - the demo tokenizer's token count of a text
    from mlx_lm.tokenizer_utils import load

    from mlx_specdec.demo import demo_paths

    tokenizer = load(Path(demo_paths("baseline")[0]))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def ask(client: httpx.Client, args: argparse.Namespace, prompt: str, count) -> Answer:  # noqa: ANN001
    body = {
        "model": args.model,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    pieces.append(choice["text"])
    end = time.perf_counter()
    text = "".join(pieces)
    tokens = usage["completion_tokens"] if usage else count(text)
    return Answer(prompt, text, tokens, (first or end) - t0, end - t0)


def client_loop(
    args: argparse.Namespace, work: list[str], until: float, tally: Tally, count, start: int
) -> None:  # noqa: ANN001
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        i = start
        while True:
            if args.duration and time.perf_counter() >= until:
                return
            if not args.duration and i - start >= args.requests:
                return
            prompt = work[i % len(work)]
            i += 1
            try:
                answer = ask(client, args, prompt, count)
                with tally.lock:
                    tally.answers.append(answer)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with tally.lock:
                    tally.errors.append(f"{type(e).__name__}: {e}")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def run(
    args: argparse.Namespace, clients: int, work: list[str], count
) -> tuple[Tally, float, list]:  # noqa: ANN001
    tally = Tally()
    memory: list[float] = []
    t0 = time.perf_counter()
    until = t0 + (args.duration or 0)
    threads = [
        threading.Thread(target=client_loop, args=(args, work, until, tally, count, c))
        for c in range(clients)
    ]
    for t in threads:
        t.start()
    done = threading.Event()

    def sample_memory() -> None:  # the server's RSS once a second, beside the clients
        while not done.is_set():
            if (m := rss_mb(args.pid)) is not None:
                memory.append(m)
            done.wait(1.0)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0  # from the first request to the last answer
    done.set()
    sampler.join()
    return tally, seconds, memory


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--model", default="default_model", help="model field of the requests")
    p.add_argument("--api-key")
    p.add_argument("--clients", default="1,2,4,8", help="client counts, comma separated")
    p.add_argument("--requests", type=int, default=4, help="requests per client (no --duration)")
    p.add_argument("--duration", type=float, help="seconds each client keeps asking")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts", type=int, help="use the first N demo prompts (default all)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--pid", type=int, help="the server's process id, to report its memory")
    p.add_argument("--check-solo", action="store_true", help="compare with each prompt alone")
    p.add_argument("--label", default="", help="first column of the printed rows")
    args = p.parse_args()
    work = prompts(args.prompts)
    count = counter()
    solo: dict[str, str] = {}
    if args.check_solo:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as client:
            for prompt in work:
                solo[prompt] = ask(client, args, prompt, count).text
    print(
        "| server | clients | requests | errors | tok/s (aggregate) | TTFT p50 / p99 (s) | "
        "server RSS MB (start, peak, end) | solo-identical |"
    )
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for clients in [int(c) for c in args.clients.split(",")]:
        tally, seconds, memory = run(args, clients, work, count)
        tokens = sum(a.tokens for a in tally.answers)
        ttft = [a.ttft for a in tally.answers]
        same = "-"
        if solo:
            mismatched = [a for a in tally.answers if a.text != solo[a.prompt]]
            same = f"{len(tally.answers) - len(mismatched)}/{len(tally.answers)}"
            failed |= bool(mismatched)
        mem = f"{memory[0]:.0f}, {max(memory):.0f}, {memory[-1]:.0f}" if memory else "-"
        print(
            f"| {args.label} | {clients} | {len(tally.answers)} | {len(tally.errors)} | "
            f"{tokens / seconds:.1f} | {statistics.median(ttft) if ttft else 0:.2f} / "
            f"{percentile(ttft, 0.99):.2f} | {mem} | {same} |",
            flush=True,
        )
        for e in sorted(set(tally.errors))[:5]:
            print(f"  error: {e}", file=sys.stderr)
        failed |= bool(tally.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
