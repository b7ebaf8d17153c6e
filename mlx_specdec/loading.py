"""Finding, downloading and loading targets and drafters, with one-line errors for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import registry
from .drafters import dspark, family_of, formats
from .drafters.base import Drafter
from .drafters.formats import gguf
from .drafters.layers import quantize_drafter
from .drafters.lookup import LookupConfig, LookupDrafter
from .errors import SpecDecError
from .kernels import weight_sharing_copy
from .target import Target

DRAFTER_BITS = (4, 8, 16, 32)
_TARGET_FILES = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
_DRAFTER_FILES = ["*.json", "*.safetensors", "*.gguf"]


@dataclass
class PairConfig:
    """What `load_pair` resolved and loaded."""

    mode: str
    target: str
    drafter: str | None = None
    drafter_kind: str | None = None
    drafter_bits: int | None = None
    drafter_config: dict[str, Any] = field(default_factory=dict)
    drafter_format: str | None = None  # native, speculators, specforge or gguf
    shared_with_target: list[str] = field(default_factory=list)


def resolve_path(repo_or_path: str, what: str, allow_patterns: list[str]) -> Path:
    """A local folder as is; otherwise a Hugging Face repo, from the cache or downloaded (with a
    progress bar) through huggingface-hub."""
    path = Path(repo_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SpecDecError(f"{what} '{repo_or_path}' is a file; give its folder")
        return path
    looks_local = repo_or_path.startswith((".", "/", "~")) or repo_or_path.count("/") != 1
    if looks_local:
        raise SpecDecError(
            f"{what} '{repo_or_path}' is neither an existing folder nor a Hugging Face repo id "
            "(owner/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_or_path, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        raise SpecDecError(
            f"{what} '{repo_or_path}' is not in the Hugging Face cache and cannot be downloaded "
            "(offline?); connect once to download it, or pass a local folder"
        ) from None
    except GatedRepoError:
        raise SpecDecError(
            f"{what} '{repo_or_path}' is gated: accept its license on huggingface.co and log "
            "in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise SpecDecError(
            f"{what} '{repo_or_path}' does not exist on the Hugging Face Hub"
        ) from None
    except (OSError, ValueError) as e:
        raise SpecDecError(f"cannot download {what} '{repo_or_path}': {e}") from None


def read_config(path: Path, what: str) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise SpecDecError(f"{what} folder '{path}' has no config.json")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise SpecDecError(f"{what} config '{file}' is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SpecDecError(f"{what} config '{file}' is not a JSON object")
    return config


def read_safetensors(path: Path, what: str) -> dict[str, mx.array]:
    """All tensors of a single-file or sharded (`model.safetensors.index.json`) checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise SpecDecError(f"{what} index '{index}' is malformed ({e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise SpecDecError(f"{what} folder '{path}' has no *.safetensors weights")
    weights: dict[str, mx.array] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise SpecDecError(f"{what} shard '{file}' is missing; download the checkpoint again")
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # noqa: BLE001 - mlx raises several types for a bad file
            raise SpecDecError(
                f"{what} weights '{file}' cannot be read ({e}); the file is corrupt or "
                "incomplete: download it again"
            ) from None
    return weights


def _load_into(model: nn.Module, weights: dict[str, mx.array], what: str) -> None:
    """Strict load: the checkpoint must hold exactly the module's tensors, with their shapes."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))

    def few(names: list[str]) -> str:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more

    if missing:
        raise SpecDecError(f"{what} is missing tensors {few(missing)}")
    if extra:
        raise SpecDecError(f"{what} has tensors this architecture does not use: {few(extra)}")
    for name, w in weights.items():
        if w.shape != expected[name].shape:
            raise SpecDecError(
                f"{what} tensor '{name}' has shape {tuple(w.shape)}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())


def load_target(
    model: str,
    name: str | None = None,
    *,
    stand_ins: bool | None = None,
    padded_attention: bool | None = None,
) -> tuple[Target, Any]:
    """An mlx-lm model (repo id or folder) wrapped as a `Target`, and its tokenizer. The
    switches are `Target`'s (None: its defaults for this backend)."""
    from mlx_lm.utils import load as mlx_load

    path = resolve_path(model, "model", _TARGET_FILES)
    read_config(path, "model")  # a clear error before mlx-lm's own
    try:
        lm, tokenizer, config = mlx_load(str(path), return_config=True)
    except (FileNotFoundError, ValueError) as e:
        raise SpecDecError(f"cannot load model '{model}' with mlx-lm: {e}") from None
    target = Target(
        lm, config, name=name or model, stand_ins=stand_ins, padded_attention=padded_attention
    )
    return target, tokenizer


def _check_compatible(drafter: Drafter, config: dict, target: Target, what: str) -> None:
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size", -1))
    if hidden != target.hidden_size:
        raise SpecDecError(
            f"{what} has hidden size {hidden} but {target.name} has {target.hidden_size}: the "
            "drafter was made for another target"
        )
    vocab = int(text.get("vocab_size", -1))
    if vocab != target.vocab_size:
        raise SpecDecError(
            f"{what} has vocabulary size {vocab} but {target.name} has {target.vocab_size}: the "
            "drafter was made for another target"
        )
    n_target = config.get("num_target_layers")
    if n_target is not None and int(n_target) != target.num_layers:
        raise SpecDecError(
            f"{what} was made for a target with {n_target} layers, {target.name} has "
            f"{target.num_layers}"
        )
    target.set_taps(drafter.tap_ids)


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file a drafter path names: the file itself, or a folder's only *.gguf (when it
    has no config.json)."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if found and not (path / "config.json").is_file():
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise SpecDecError(
                f"drafter folder '{path}' has several GGUF files ({names}); name one"
            )
        return found[0]
    return None


def read_drafter(drafter: str, target_layers: int, what: str) -> formats.Checkpoint:
    """A drafter checkpoint of any known format (local or downloaded), in its family's layout."""
    local = Path(drafter).expanduser()
    path = local if local.is_file() and local.suffix == ".gguf" else None
    path = path or resolve_path(drafter, "drafter", _DRAFTER_FILES)
    file = _gguf_file(path)
    if file is not None:
        config, weights = gguf.translate(*gguf.read(file, what), what)
        checkpoint = formats.translate(config, weights, what, target_layers)
        checkpoint.format = "gguf"
        return checkpoint
    config = read_config(path, "drafter")
    return formats.translate(config, read_safetensors(path, "drafter"), what, target_layers)


def load_drafter(
    drafter: str,
    target: Target,
    *,
    bits: int = 4,
    mode: str = "auto",
    confidence_threshold: float = 0.0,
) -> tuple[Drafter, dict[str, Any], list[str]]:
    """Load a drafter checkpoint for `target`. Returns (drafter, its config, tensors shared
    with the target). `confidence_threshold` is DSpark's draft cut (other families have no
    confidence head and ignore it). The drafter runs the CPU stand-ins when the target does."""
    if bits not in DRAFTER_BITS:
        raise SpecDecError(f"--drafter-bits must be one of 4, 8, 16, 32, got {bits}")
    what = f"drafter '{drafter}'"
    checkpoint = read_drafter(drafter, target.num_layers, what)
    config = {**checkpoint.config, "checkpoint_format": checkpoint.format}
    family = family_of(config, what)
    if mode not in ("auto", family.MODE) and not family.accepts_mode(config, mode):
        raise SpecDecError(
            f"--mode {mode} needs a {mode} drafter, but {what} is a {family.MODE} drafter "
            f"({(config.get('architectures') or ['?'])[0]})"
        )
    options = {"confidence_threshold": confidence_threshold} if family is dspark else {}
    model = family.build(config, what, **options)
    _load_into(model, checkpoint.weights, what)
    if checkpoint.draft_ids is not None:
        if not hasattr(model, "map_draft_vocab"):
            raise SpecDecError(
                f"{what}: a reduced draft vocabulary is not supported for {family.MODE}"
            )
        model.map_draft_vocab(checkpoint.draft_ids)
    _check_compatible(model, config, target, what)
    shared = model.share_target_tensors(target)
    quantize_drafter(model, bits)
    mx.eval(model.parameters())
    if target.stand_ins:
        model = weight_sharing_copy(model, stand_ins=True)
    return model, config, shared


def default_drafter_bits() -> int:
    """4-bit drafters on a GPU; float32 on the CPU backend, where MLX's quantized and
    half-precision matmuls cost several times float32 (measured on the demo pair: 0.35x vs
    0.75x of plain decoding with the bundled BLAS, 0.34x vs 1.05x with OpenBLAS)."""
    return 32 if mx.default_device() == mx.cpu else 4


def load_pair(
    model: str | None = None,
    drafter: str | None = None,
    *,
    mode: str = "auto",
    drafter_bits: int | None = None,
    confidence_threshold: float = 0.0,
    lookup: bool | LookupConfig = False,
    stand_ins: bool | None = None,
    padded_attention: bool | None = None,
    target_loader: Callable[..., tuple[Target, Any]] | None = None,
    exact: bool = False,
) -> tuple[Target, Any, Drafter | None, PairConfig]:
    """Load a target and its drafter: `(target, tokenizer, drafter, config)`.

    `mode` is `auto` (DSpark if the registry knows one, else DFlash, else EAGLE3, else plain
    decoding), `dspark`, `dflash`, `eagle3`, `lookup` or `baseline`; `drafter` overrides the
    registry. `lookup` needs no drafter: drafts are copied from n-gram matches in the prompt and
    the output (`drafters.lookup.LookupDrafter`). `lookup=True` wraps the trained drafter so that
    rounds with a long match use the lookup draft instead (no drafter known: lookup alone); a
    `LookupConfig` does so with its settings.
    `drafter_bits` defaults to `default_drafter_bits()`. `confidence_threshold` as in
    `load_drafter`; `stand_ins` and `padded_attention` as in `Target` (None: the defaults).
    With no `model`, the embedded demo pair. `target_loader` replaces `load_target` (same
    arguments), e.g. `distributed.load_sharded_target` for a target split across processes.
    `exact` turns on `Target.use_exact` (verify rows bit-identical to plain decoding).
    """
    if drafter_bits is None:
        drafter_bits = default_drafter_bits()
    if model is None:  # the embedded demo pair, offline
        from .demo import demo_paths

        model, drafter = demo_paths("baseline" if mode == "lookup" else mode, drafter)
    valid = ("auto", "baseline", "lookup", *registry.MODES)
    if mode not in valid:
        raise SpecDecError(f"--mode must be one of {', '.join(valid)}, got '{mode}'")
    _check_lookup(mode, drafter, lookup)
    settings = lookup if isinstance(lookup, LookupConfig) else None
    lookup = bool(lookup) or mode == "lookup"
    resolved_mode, drafter_ref = registry.resolve_mode(
        model, "baseline" if mode == "lookup" else mode, drafter
    )
    if resolved_mode != "baseline" and drafter_ref is None:
        raise SpecDecError(
            f"no {resolved_mode} drafter is known for '{model}'; pass --drafter REPO_OR_PATH, or "
            "use --mode auto (see `mlx-specdec models`)"
        )
    load = target_loader or load_target
    target, tokenizer = load(model, stand_ins=stand_ins, padded_attention=padded_attention)
    if exact:
        target.use_exact()
    config = PairConfig(mode=resolved_mode, target=model)
    if drafter_ref is None:
        if not lookup:
            return target, tokenizer, None, config
        config.mode = config.drafter_kind = "lookup"
        return target, tokenizer, LookupDrafter(target.vocab_size, config=settings), config
    loaded, drafter_config, shared = load_drafter(
        drafter_ref,
        target,
        bits=drafter_bits,
        mode=resolved_mode,
        confidence_threshold=confidence_threshold,
    )
    config.mode = loaded.kind if resolved_mode == "auto" else resolved_mode
    config.drafter, config.drafter_kind = drafter_ref, loaded.kind
    config.drafter_bits, config.drafter_config = drafter_bits, drafter_config
    config.drafter_format = drafter_config.get("checkpoint_format")
    config.shared_with_target = shared
    if lookup:
        loaded = LookupDrafter(target.vocab_size, loaded, settings)
        config.mode = loaded.kind
    return target, tokenizer, loaded, config


def _check_lookup(mode: str, drafter: str | None, lookup: bool | LookupConfig) -> None:
    if mode == "lookup" and drafter is not None:
        raise SpecDecError(
            "--mode lookup drafts from the text itself and takes no --drafter; to let a "
            "drafter's rounds use lookup drafts, give its mode and --lookup"
        )
    if mode == "baseline" and lookup:
        raise SpecDecError("--lookup needs a speculative mode, not baseline")
