"""Benchmark prompts: ten built-in ones each for chat, code and math, written for this project,
or a JSONL file.

The built-in ones are short and self-contained so that one run measures decoding, not prefill;
pass a JSONL file (`{"prompt": ..., "domain": ...}` per line) to `mlx-specdec bench --prompts`
for standard sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecDecError

CHAT: tuple[str, ...] = (
    "Explain to a ten-year-old why the sky looks blue during the day and red at sunset.",
    "I have a job interview for a junior librarian position tomorrow. What should I prepare?",
    "Write a short, friendly message declining a wedding invitation from an old colleague.",
    "What are the main differences between a crocodile and an alligator?",
    "Suggest a three-day itinerary for a first visit to Lisbon on a modest budget.",
    "Why do people get jet lag, and what actually helps to recover from it faster?",
    "Summarize the plot of a heist story in which nobody ends up stealing anything.",
    "Give me five ideas for a rainy Sunday afternoon with two young children at home.",
    "How does composting work, and what should I never put in a home compost bin?",
    "Describe the pros and cons of working remotely compared with working in an office.",
)

CODE: tuple[str, ...] = (
    "Write a Python function that returns the n-th Fibonacci number using iteration.",
    "Write a Python function that checks whether two strings are anagrams of each other.",
    "Implement binary search over a sorted Python list and return the index or -1.",
    "Write a SQL query that lists the three customers with the highest total order value.",
    "Write a Python class for a stack with push, pop, peek and is_empty methods.",
    "Write a JavaScript function that removes duplicate values from an array, keeping order.",
    "Write a Python function that parses a CSV line with quoted fields into a list of strings.",
    "Write a bash script that counts the lines of every .py file under the current directory.",
    "Write a Python function that merges two sorted lists into one sorted list in linear time.",
    "Write a C function that reverses a null-terminated string in place.",
)

MATH: tuple[str, ...] = (
    "A train covers 180 km in 2 hours and 15 minutes. What is its average speed in km/h?",
    "Solve for x: 3x + 7 = 2x - 5. Show each step.",
    "A rectangle has a perimeter of 36 cm and its length is twice its width. Find its area.",
    "What is the sum of all integers from 1 to 250? Explain the method you use.",
    "A shop discounts a jacket by 20% and then by a further 15%. What is the total discount?",
    "Find the greatest common divisor of 462 and 1071 using the Euclidean algorithm.",
    "Two dice are rolled. What is the probability that the sum is 8? Show your reasoning.",
    "Compute the derivative of f(x) = x^3 * sin(x) and simplify the result.",
    "If 5 workers build a wall in 12 days, how long would 8 workers take at the same rate?",
    "Solve the system: x + y = 10 and 2x - y = 5. Show each step.",
)

BUILTIN: dict[str, tuple[str, ...]] = {"chat": CHAT, "code": CODE, "math": MATH}


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    domain: str


def read_jsonl(path: Path) -> list[BenchPrompt]:
    """`{"prompt": str, "domain": str}` per line (domain defaults to "custom"); blanks skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SpecDecError(f"cannot read prompt file '{path}': {e.strerror or e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SpecDecError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SpecDecError(f'{path}:{n}: each line must be an object with a "prompt" string')
        domain = row.get("domain", "custom")
        if not isinstance(domain, str) or not domain:
            raise SpecDecError(f'{path}:{n}: "domain" must be a non-empty string')
        if not row["prompt"].strip():
            raise SpecDecError(f"{path}:{n}: the prompt is empty")
        prompts.append(BenchPrompt(row["prompt"], domain))
    if not prompts:
        raise SpecDecError(f"prompt file '{path}' holds no prompts")
    return prompts


def load_prompts(spec: str, limit: int | None = None) -> list[BenchPrompt]:
    """`chat,code,math` (any of the built-in sets) or a JSONL file; `limit` prompts per domain."""
    path = Path(spec).expanduser()
    if spec.endswith(".jsonl") or path.is_file():
        prompts = read_jsonl(path)
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [s for s in names if s not in BUILTIN]
        if unknown or not names:
            raise SpecDecError(
                f"--prompts: unknown set '{','.join(unknown) or spec}'; use any of "
                f"{', '.join(BUILTIN)} or a .jsonl file"
            )
        prompts = [BenchPrompt(t, name) for name in names for t in BUILTIN[name]]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.domain] = seen.get(p.domain, 0) + 1
            if seen[p.domain] <= limit:
                kept.append(p)
        prompts = kept
    return prompts
