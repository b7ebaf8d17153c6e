"""Drafter families. Each module exposes ARCHITECTURES (the config `architectures` names it
loads), MODE, `accepts_mode(config, mode)` and `build(config, what, **options) -> Drafter`
(a `base.Drafter`; DSpark's only option is `confidence_threshold`)."""

from __future__ import annotations

from types import ModuleType

from ..errors import SpecDecError
from . import dflash, dspark, eagle3

FAMILIES: tuple[ModuleType, ...] = (dspark, dflash, eagle3)

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
    plain = arch is None and "model_type" in config and "target_layer_ids" not in config
    if plain or (isinstance(arch, str) and arch.endswith("ForCausalLM")):
        raise SpecDecError(
            f"{what} is a plain language model ({arch or config['model_type']}), not a drafter; "
            f"drafters supported: {known}"
        )
    raise SpecDecError(f"{what} has unknown drafter architecture '{arch}'; supported: {known}")
