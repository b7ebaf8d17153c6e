"""JSON from untrusted text, with its nesting bounded before it is parsed.

Python's parser recurses: text nested a few thousand levels deep raises `RecursionError` (not a
`ValueError`), and objects nested a few hundred deep break whatever recurses over them later
(templates, `json.dumps`). The depth is measured without parsing, in linear time.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# A JSON string, or an unterminated one up to the end: either way the scan moves past it, so the
# whole pass stays linear.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_OPEN = np.frombuffer(b"[{", np.uint8)
_CLOSE = np.frombuffer(b"]}", np.uint8)


def nesting_depth(text: str) -> int:
    """How deep the brackets of `text` nest, outside its strings (an upper bound when the text
    is not valid JSON)."""
    outside = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    b = np.frombuffer(outside, np.uint8)
    step = np.isin(b, _OPEN).astype(np.int64) - np.isin(b, _CLOSE).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def loads(text: str | bytes, *, max_depth: int) -> Any:
    """`json.loads` that raises `ValueError` for text nested deeper than `max_depth` or not
    UTF-8, instead of recursing into it."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if nesting_depth(text) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return json.loads(text)


def object_depth(value: Any, limit: int) -> int:
    """How deep dicts and lists nest in an already parsed value, counting at most to `limit + 1`
    (iterative, so deep input cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, (list, tuple)):
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        todo += [(child, depth + 1) for child in item]
    return deepest
