"""The embedded demo pair: a small Qwen3 target trained from scratch on the Python standard
library, generated arithmetic and docstrings, with its own tokenizer and its drafters, shipped
inside the package so everything runs offline. Built by `scripts/make_demo.py`."""

from __future__ import annotations

from pathlib import Path

from .errors import SpecDecError

DEMO_DIR = Path(__file__).parent / "demo"
KINDS = ("dspark", "dflash")


def demo_paths(mode: str = "auto", drafter: str | None = None) -> tuple[str, str | None]:
    """(target folder, drafter folder or None) of the demo pair for `mode`; an explicit
    `drafter` is kept as given."""
    target = DEMO_DIR / "target"
    if not (target / "model.safetensors").is_file():
        raise SpecDecError(
            "no model given and the demo pair is not installed; pass --model REPO_OR_PATH "
            "(or build the demo with scripts/make_demo.py)"
        )
    if drafter is not None or mode == "baseline":
        return str(target), drafter
    kind = "dspark" if mode == "auto" else mode
    path = DEMO_DIR / kind
    if kind not in KINDS or not (path / "model.safetensors").is_file():
        raise SpecDecError(
            f"the demo pair has no {kind} drafter (it has {', '.join(KINDS)}); pass --model"
        )
    return str(target), str(path)


def draft_lm_path() -> str:
    """The demo's tiny plain LM (same tokenizer), for mlx-lm's classic `--draft-model`."""
    return str(DEMO_DIR / "draft-lm")
