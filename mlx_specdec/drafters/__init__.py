"""Drafter families. Each module exposes ARCHITECTURES (the config `architectures` names it
loads), MODE, `accepts_mode(config, mode)` and `build(config, what, **options) -> Drafter`
(a `base.Drafter`; DSpark's only option is `confidence_threshold`). Checkpoints in other
formats reach these families through `formats`, which translates them first."""

from __future__ import annotations

from types import ModuleType

from ..errors import SpecDecError
from . import dflash, dflash2, dspark, eagle3

FAMILIES: tuple[ModuleType, ...] = (dspark, dflash, dflash2, eagle3)

_REFUSED = {
    "Qwen35DSparkModel": "Qwen3.5-native DSpark heads (gated q_proj, offset norms) are not "
    "supported; DeepSpec's Qwen3DSparkModel for the same target is",
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
