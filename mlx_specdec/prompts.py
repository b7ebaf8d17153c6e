"""Chat prompts as token ids, with what the client wrote always read as text.

A chat template wraps every message in the model's control tokens (`<|im_start|>`, `<|im_end|>`,
...). Tokenizing the rendered text in one piece would also read those strings *inside* a message
as control tokens, so a user, or text a tool returned, could close its own turn and open a system
turn. So every control-token string in the conversation's text (message fields, tools, template
variables) is wrapped in two markers, random per call, before rendering; the rendered text is
then tokenized piece by piece: the template's own text as usual, each wrapped string as plain
text. The template still sees the strings themselves (`'</think>' in content` still holds); only
a string method that strips next to one (`.split('</think>')[-1].lstrip()`) meets the marker
first and strips nothing. A conversation without such strings is rendered and tokenized in one
piece, exactly as before.

The control tokens are the tokenizer's special added tokens, plus the added tokens its chat
template writes (as transformers' `sanitize_control_tokens` defines them, which not every
supported transformers version has).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SpecDecError

MAX_DEPTH = 64  # how deeply a conversation's values may nest (tool schemas, arguments)
# Text per token is bounded by the longest token's spelling; twice that leaves room for
# normalizers that shrink text (NFKC), so the byte bound never refuses a prompt that fits.
BYTES_MARGIN = 2
# Names a client may not set as template variables: apply_chat_template's own parameters.
RESERVED_TEMPLATE_NAMES = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
        # the special tokens transformers passes to every template
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
    }
)


class PromptError(SpecDecError):
    """A conversation that cannot become a prompt; the message names the part at fault."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # the rendered conversation, as the model reads it
    ids: list[int]


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    raw_special: bool = False,
    max_bytes: int | None = None,
) -> ChatPrompt:
    """The conversation through the tokenizer's chat template, with a generation prompt.

    Control-token strings in `messages`, `tools` and `template_kwargs` stay text unless
    `raw_special` (the caller then trusts its input with the template's own tokens). A
    conversation whose text is over `max_bytes` (UTF-8) is refused before anything is rendered.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template: send plain text instead")
    kwargs = dict(template_kwargs or {})
    _check_template_names(tokenizer, kwargs)
    marks = None if raw_special else _Marks.new(tokenizer)
    scan = _Scan(marks)
    messages = _map_strings(list(messages), "messages", scan)
    tools = _map_strings(tools, "tools", scan)
    kwargs = _map_strings(kwargs, "chat_template_kwargs", scan)
    if max_bytes is not None and scan.nbytes > max_bytes:
        raise PromptTooLong("messages", scan.nbytes, max_bytes)
    text = _render(tokenizer, messages, tools, kwargs)
    if marks is None or not scan.marked:
        return ChatPrompt(text, list(tokenizer.encode(text, add_special_tokens=False)))
    return ChatPrompt(marks.unmark(text), marks.encode(tokenizer, text))


class PromptTooLong(PromptError):
    def __init__(self, where: str, nbytes: int, limit: int) -> None:
        super().__init__(
            f"{where}: {nbytes} bytes of text, more than the {limit} bytes this model's context "
            "can take; shorten it"
        )


def text_size(text: str, where: str | Callable[[], str]) -> int:
    """UTF-8 bytes of `text`; text that is not valid Unicode is refused, naming `where`."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        place = where() if callable(where) else where
        raise PromptError(f"{place}: is not valid Unicode text (a lone surrogate)") from None


def prompt_byte_limit(tokenizer: Any, context: int | None) -> int | None:
    """The UTF-8 bytes of text beyond which a prompt cannot fit in `context` tokens (None: no
    known context), so that an over-long prompt is refused without tokenizing it."""
    if not context:
        return None
    longest = max((len(t.encode("utf-8")) for t in tokenizer.get_vocab()), default=1)
    return context * longest * BYTES_MARGIN


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The strings that stay text when a client writes them (longest first)."""
    return _controls(tokenizer)[0]


# ------------------------------------------------------------------------------ the pieces
def _hf(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer (mlx-lm wraps it)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


@functools.lru_cache(maxsize=8)
def _controls(tokenizer: Any) -> tuple[tuple[str, ...], re.Pattern[str] | None]:
    """`(strings, pattern)`: the control tokens and a regex matching any of them."""
    hf = _hf(tokenizer)
    template = getattr(hf, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = "\0".join(template.values())
    added = (getattr(hf, "added_tokens_decoder", None) or {}).values()
    found = {
        t.content
        for t in added
        if t.content and (t.special or (t.content in template and not t.content.isspace()))
    }
    strings = tuple(sorted(found, key=len, reverse=True))
    return strings, (re.compile(_trie_pattern(strings)) if strings else None)


def _trie_pattern(strings: Sequence[str]) -> str:
    """A regex matching any of `strings`, longest first, as a trie: a plain alternation tries
    every string at every position, far too slow on megabytes of text with thousands of special
    tokens (Gemma's `<unused...>`)."""
    trie: dict[str, dict] = {}
    for s in strings:
        node = trie
        for ch in s:
            node = node.setdefault(ch, {})
        node[""] = {}  # a string ends here

    def build(node: dict[str, dict]) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def _check_template_names(tokenizer: Any, kwargs: dict[str, Any]) -> None:
    special = set(getattr(_hf(tokenizer), "special_tokens_map", None) or {})
    for name in kwargs:
        if not (isinstance(name, str) and name.isidentifier()):
            raise PromptError("chat_template_kwargs: keys must be template variable names")
        if name in RESERVED_TEMPLATE_NAMES or name in special:
            raise PromptError(f"chat_template_kwargs.{name}: cannot be set by a request")


def _render(tokenizer: Any, messages: list, tools: list | None, kwargs: dict[str, Any]) -> str:
    import jinja2

    if tools is not None:
        kwargs = {**kwargs, "tools": tools}
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except jinja2.TemplateError as e:  # the template's own words (`raise_exception`, ...)
        raise PromptError(f"the chat template rejected this conversation: {e}") from None
    except Exception:  # noqa: BLE001 - templates raise anything on conversations they do not expect
        raise PromptError("the chat template could not render this conversation") from None


class _Scan:
    """Applied to every string of the conversation: counts its UTF-8 bytes (which also refuses
    text that is not valid Unicode) and wraps its control tokens."""

    def __init__(self, marks: _Marks | None) -> None:
        self.marks, self.nbytes, self.marked = marks, 0, False

    def __call__(self, text: str, where: Callable[[], str]) -> str:
        self.nbytes += text_size(text, where)
        if self.marks is None:
            return text
        marked = self.marks.wrap(text)
        self.marked = self.marked or marked is not text
        return marked


def _map_strings(value: Any, path: str, fn: Callable[[str, Callable[[], str]], str]) -> Any:
    """`value` with `fn(string, where)` applied to every string in it (dict keys too); `where()`
    names the string's place, e.g. `messages[1].content`. Nesting is bounded by `MAX_DEPTH`."""

    def walk(item: Any, where: Callable[[], str], depth: int) -> Any:
        if isinstance(item, str):
            return fn(item, where)
        if depth > MAX_DEPTH and isinstance(item, (dict, list, tuple)):
            raise PromptError(f"{where()}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            return {
                walk(k, where, depth): walk(v, _child(where, f".{k}"), depth + 1)
                for k, v in item.items()
            }
        if isinstance(item, (list, tuple)):
            return [walk(v, _child(where, f"[{i}]"), depth + 1) for i, v in enumerate(item)]
        return item

    return walk(value, lambda: path, 0)


def _child(where: Callable[[], str], step: str) -> Callable[[], str]:
    return lambda: where() + step  # built only when an error names it


@dataclass(frozen=True)
class _Marks:
    """The two markers of one call; a client cannot forge them, as it never sees them."""

    open: str
    close: str
    wrapped: re.Pattern[str]  # a marked control token (group 1), or a lone marker
    controls: re.Pattern[str]

    @classmethod
    def new(cls, tokenizer: Any) -> _Marks | None:
        _, pattern = _controls(tokenizer)
        if pattern is None:
            return None
        nonce = secrets.token_hex(8)  # ASCII letters and digits: templates' filters keep them
        open_, close = f"MLXSDo{nonce}", f"MLXSDc{nonce}"
        wrapped = re.compile(f"{open_}({pattern.pattern}){close}|{open_}|{close}")
        return cls(open_, close, wrapped, pattern)

    def wrap(self, text: str) -> str:
        """`text` itself when it holds no control token (so callers can tell by identity)."""
        if self.controls.search(text) is None:
            return text
        return self.controls.sub(lambda m: f"{self.open}{m.group()}{self.close}", text)

    def unmark(self, text: str) -> str:
        return self.wrapped.sub(lambda m: m.group(1) or "", text)

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of rendered text: wrapped control tokens as plain text, the rest as usual.
        A lone marker (a template string method cut a pair apart) is dropped, but still
        separates the text on its sides, so they cannot join into a control token."""
        pieces = self.wrapped.split(text)  # text, token or None, text, token or None, ...
        ids = list(tokenizer.encode(pieces[0], add_special_tokens=False))
        newline = list(tokenizer.encode("\n", add_special_tokens=False))
        controls = {tokenizer.convert_tokens_to_ids(t) for t in control_tokens(tokenizer)}
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            encode = functools.partial(_encode_plain, tokenizer) if as_text else tokenizer.encode
            piece_ids = _encode_middle(encode, piece, newline)
            if as_text and controls.intersection(piece_ids):
                raise PromptError(f"this model cannot read {piece!r} as plain text")
            ids += piece_ids
        return ids


def _encode_middle(encode: Callable[..., Any], piece: str, newline: list[int]) -> list[int]:
    """Ids of a piece from the middle of a prompt. Encoded after a newline, which is then taken
    off, so that a tokenizer that marks the start of a text (SentencePiece's prefix space) does
    not mark this piece."""
    ids = list(encode("\n" + piece, add_special_tokens=False))
    if ids[: len(newline)] == newline:
        return ids[len(newline) :]
    return list(encode(piece, add_special_tokens=False))


def _encode_plain(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of `text` with no added token matched, special or not (the backend's pipeline run
    without its added vocabulary)."""
    hf = _hf(tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: special tokens split, the best it offers
        return list(hf.encode(text, add_special_tokens=False, split_special_tokens=True))
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [text]
    if backend.pre_tokenizer is not None:
        splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [t.id for s in splits for t in backend.model.tokenize(s)]
