"""mlx-specdec: lossless speculative decoding (DSpark, DFlash, EAGLE3) on MLX."""

from .errors import SpecDecError
from .generate import (
    GenerationChunk,
    GenerationResult,
    baseline_generate,
    speculative_generate,
    stream_speculative_generate,
)
from .loading import PairConfig, load_drafter, load_pair, load_target
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .speculate import Round, speculate
from .target import Target

__version__ = "0.1.0"


def load_dflash_pair(model: str | None = None, drafter: str | None = None, **kwargs):
    """`load_pair` with `mode="dflash"`."""
    return load_pair(model, drafter, mode="dflash", **kwargs)


def dflash_generate(target, tokenizer, drafter, prompt, **kwargs) -> GenerationResult:
    """`speculative_generate` for a DFlash drafter (same arguments, same result object)."""
    return speculative_generate(target, tokenizer, drafter, prompt, **kwargs)


__all__ = [
    "GenerationChunk",
    "GenerationResult",
    "PairConfig",
    "PrefixCache",
    "Round",
    "SamplingParams",
    "SpecDecError",
    "Target",
    "baseline_generate",
    "dflash_generate",
    "load_dflash_pair",
    "load_drafter",
    "load_pair",
    "load_target",
    "speculate",
    "speculative_generate",
    "stream_speculative_generate",
]
