"""Shared test helpers: tiny real MLX targets and drafters written to disk in the Hugging Face
layout, and plain mlx-lm greedy decoding as the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import save_config, save_model

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_SOURCE = FIXTURES / "dspark_qwen3" / "target"  # 496-token byte-level BPE, ChatML
VOCAB = 512  # embedding rows (the tokenizer's 496 + padding rows, like Qwen3)
MASK_ID = 496


def target_config(family: str = "qwen3", tied: bool = True, layers: int = 6) -> dict:
    config = dict(
        model_type=family,
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=tied,
        eos_token_id=[493],
    )
    if family == "llama":
        config["architectures"] = ["LlamaForCausalLM"]
    return config


def write_target(path: Path, config: dict, seed: int = 0) -> Path:
    """A random mlx-lm model of `config`, saved with the fixture tokenizer."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SOURCE / name, path / name)
    return path


def dspark_config(target: dict, markov_rank: int = 16, confidence: bool = True) -> dict:
    """A DeepSpec-style drafter config: the target's config plus the DSpark keys."""
    config = dict(target)
    config.update(
        architectures=["Qwen3DSparkModel"],
        num_hidden_layers=2,
        num_target_layers=target["num_hidden_layers"],
        block_size=7,
        mask_token_id=MASK_ID,
        target_layer_ids=[0, 2, 4],
        markov_rank=markov_rank,
        enable_confidence_head=confidence,
        tie_word_embeddings=False,
    )
    if markov_rank:
        config.update(markov_head_type="vanilla", confidence_head_with_markov=confidence)
    return config


def write_dspark(path: Path, config: dict, seed: int = 1) -> Path:
    """A random DSpark drafter checkpoint in the DeepSpec layout (flat names, safetensors)."""
    from mlx_specdec.drafters.dspark import build

    mx.random.seed(seed)
    model = build(config, "test drafter")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Plain mlx-lm greedy decoding, stopping after an eos token (included)."""
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_new_tokens):
        out.append(int(token))
        if out[-1] in eos:
            break
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random untied Qwen3 target and a random DSpark drafter for it, on disk."""
    root = tmp_path_factory.mktemp("tiny_pair")
    config = target_config(tied=False)
    target = write_target(root / "target", config)
    drafter = write_dspark(root / "drafter", dspark_config(config))
    return target, drafter
