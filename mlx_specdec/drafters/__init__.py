"""Drafter families. Each module exposes ARCHITECTURES (the config `architectures` names it
loads), MODE, `accepts_mode(config, mode)` and `build(config, what) -> Drafter`."""

from __future__ import annotations

from types import ModuleType

from ..errors import SpecDecError
from . import dspark

FAMILIES: tuple[ModuleType, ...] = (dspark,)

_REFUSED = {
    "DFlash2DraftModel": "DFlash-2 checkpoints (candidate selector + dynamic convolutions) are "
    "not supported; use a DFlash-1 (DFlashDraftModel) checkpoint",
}


def family_of(config: dict, what: str) -> ModuleType:
    arch = (config.get("architectures") or [None])[0]
    for family in FAMILIES:
        if arch in family.ARCHITECTURES:
            return family
    if arch in _REFUSED:
        raise SpecDecError(f"{what}: {_REFUSED[arch]}")
    known = ", ".join(a for f in FAMILIES for a in f.ARCHITECTURES)
    if isinstance(arch, str) and arch.endswith("ForCausalLM"):
        raise SpecDecError(
            f"{what} is a plain language model ({arch}), not a drafter; drafters supported: {known}"
        )
    raise SpecDecError(f"{what} has unknown drafter architecture '{arch}'; supported: {known}")
