"""Benchmark prompts: ten built-in ones each for chat, code, math and edit, written for this
project, or a JSONL file.

The built-in ones are short and self-contained so that one run measures decoding, not prefill;
pass a JSONL file (`{"prompt": ..., "domain": ...}` per line) to `mlx-specdec bench --prompts`
for standard sets. `edit` is where copying matters (lookup speculation): a conversation in which
the assistant has written a function and the user asks for it again with a change, a renamed
function or a new docstring, as a coding agent does.
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

# Functions (written for this project) for the edit set: source, its name, a new name.
EDITED: tuple[tuple[str, str, str], ...] = (
    (
        'def read_lines(path, encoding="utf-8"):\n'
        '    """Return the lines of a text file, without their newlines."""\n'
        "    with open(path, encoding=encoding) as f:\n"
        '        return [line.rstrip("\\n") for line in f]\n',
        "read_lines",
        "load_lines",
    ),
    (
        "def chunked(items, size):\n"
        '    """Split a list into lists of at most size items."""\n'
        "    if size < 1:\n"
        '        raise ValueError("size must be at least 1")\n'
        "    return [items[i:i + size] for i in range(0, len(items), size)]\n",
        "chunked",
        "split_into_chunks",
    ),
    (
        "def word_counts(text):\n"
        '    """Count how often each word occurs in text."""\n'
        "    counts = {}\n"
        "    for word in text.lower().split():\n"
        "        counts[word] = counts.get(word, 0) + 1\n"
        "    return counts\n",
        "word_counts",
        "count_words",
    ),
    (
        "def clamp(value, low, high):\n"
        '    """Limit value to the range [low, high]."""\n'
        "    if low > high:\n"
        '        raise ValueError("low must not exceed high")\n'
        "    return max(low, min(value, high))\n",
        "clamp",
        "limit",
    ),
    (
        "def flatten(nested):\n"
        '    """Return the items of a list of lists as one list."""\n'
        "    result = []\n"
        "    for inner in nested:\n"
        "        result.extend(inner)\n"
        "    return result\n",
        "flatten",
        "concat_lists",
    ),
    (
        "def is_palindrome(text):\n"
        '    """Whether text reads the same backwards, ignoring case and spaces."""\n'
        "    letters = [c.lower() for c in text if not c.isspace()]\n"
        "    return letters == letters[::-1]\n",
        "is_palindrome",
        "reads_backwards",
    ),
    (
        'def parse_pairs(line, sep=","):\n'
        '    """Parse "key=value" items separated by sep into a dict."""\n'
        "    result = {}\n"
        "    for item in line.split(sep):\n"
        '        key, _, value = item.partition("=")\n'
        "        result[key.strip()] = value.strip()\n"
        "    return result\n",
        "parse_pairs",
        "parse_items",
    ),
    (
        "def retry(func, attempts=3):\n"
        '    """Call func until it succeeds, at most attempts times."""\n'
        "    for attempt in range(attempts):\n"
        "        try:\n"
        "            return func()\n"
        "        except OSError:\n"
        "            if attempt == attempts - 1:\n"
        "                raise\n",
        "retry",
        "call_with_retries",
    ),
    (
        "def moving_average(values, window):\n"
        '    """The mean of each run of window consecutive values."""\n'
        "    if window < 1:\n"
        '        raise ValueError("window must be at least 1")\n'
        "    return [sum(values[i:i + window]) / window\n"
        "            for i in range(len(values) - window + 1)]\n",
        "moving_average",
        "rolling_mean",
    ),
    (
        "def first_duplicate(items):\n"
        '    """The first item that occurs twice, or None."""\n'
        "    seen = set()\n"
        "    for item in items:\n"
        "        if item in seen:\n"
        "            return item\n"
        "        seen.add(item)\n"
        "    return None\n",
        "first_duplicate",
        "find_repeat",
    ),
)


@dataclass(frozen=True)
class BenchPrompt:
    text: str  # the (last) user message
    domain: str
    history: tuple[tuple[str, str], ...] = ()  # earlier turns, (role, content), oldest first

    def prompt(self, chat: bool = True) -> str | list[dict[str, str]]:
        """What `encode_prompt` takes: the conversation with chat on, its turns joined with
        blank lines with chat off."""
        if not self.history:
            return self.text
        turns = [*self.history, ("user", self.text)]
        if chat:
            return [{"role": role, "content": content} for role, content in turns]
        return "\n\n".join(content for _, content in turns)


def edit_prompts() -> list[BenchPrompt]:
    """The user asked for a function (its first line), the assistant wrote it; now the user
    asks for it again, renamed (even items) or with a new docstring (odd items)."""
    prompts = []
    for i, (source, old, new) in enumerate(EDITED):
        head = source.splitlines()[0]
        if i % 2 == 0:
            ask = f"Rename {old} to {new} and show the whole function.\n{head.replace(old, new)}"
        else:
            ask = f"Show the whole function again with a shorter docstring.\n{head}"
        prompts.append(BenchPrompt(ask, "edit", (("user", head), ("assistant", source))))
    return prompts


BUILTIN: dict[str, tuple[str, ...]] = {"chat": CHAT, "code": CODE, "math": MATH}


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
        unknown = [s for s in names if s not in BUILTIN and s != "edit"]
        if unknown or not names:
            raise SpecDecError(
                f"--prompts: unknown set '{','.join(unknown) or spec}'; use any of "
                f"{', '.join(BUILTIN)}, edit or a .jsonl file"
            )
        prompts = []
        for name in names:
            if name == "edit":
                prompts += edit_prompts()
            else:
                prompts += [BenchPrompt(t, name) for t in BUILTIN[name]]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.domain] = seen.get(p.domain, 0) + 1
            if seen[p.domain] <= limit:
                kept.append(p)
        prompts = kept
    return prompts
