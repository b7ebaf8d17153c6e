"""Loading: local folders in the Hugging Face layout, sharded checkpoints, tensor sharing with
the target, and one clear error for every broken or mismatched input."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import FIXTURES, dspark_config, target_config, write_drafter, write_target

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.registry import lookup, normalize, resolve_mode


def copy_drafter(tmp_path, tiny_pair):
    dst = tmp_path / "drafter"
    shutil.copytree(tiny_pair[1], dst)
    return dst


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def expect_error(match, target, drafter, **kw):
    with pytest.raises(SpecDecError, match=match):
        load_pair(str(target), None if drafter is None else str(drafter), **kw)


def test_missing_and_malformed_inputs(tmp_path, tiny_pair):
    target, _ = tiny_pair
    expect_error("neither an existing folder nor a Hugging Face repo id", tmp_path / "nope", "x")
    expect_error("not in the Hugging Face cache", "someone/not-cached-model", None)
    (tmp_path / "empty").mkdir()
    expect_error("has no config.json", target, tmp_path / "empty")
    bad = copy_drafter(tmp_path, tiny_pair)
    (bad / "config.json").write_text("{not json")
    expect_error("not valid JSON", target, bad)


def test_broken_weights(tmp_path, tiny_pair):
    target, _ = tiny_pair
    d = copy_drafter(tmp_path, tiny_pair)
    weights = mx.load(str(d / "model.safetensors"))
    del weights["fc.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    expect_error("missing tensors fc.weight", target, d)

    weights["fc.weight"] = mx.zeros((64, 10))
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    expect_error(r"tensor 'fc.weight' has shape \(64, 10\)", target, d)

    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    expect_error("corrupt or incomplete", target, d)

    (d / "model.safetensors").unlink()
    expect_error("no \\*.safetensors weights", target, d)


def test_drafter_for_another_target(tmp_path, tiny_pair):
    target, _ = tiny_pair
    d = copy_drafter(tmp_path, tiny_pair)
    edit_config(d, target_layer_ids=[0, 2, 9])
    expect_error("taps target layer 9, but .* has 6 layers", target, d)
    edit_config(d, target_layer_ids=[0, 2, 4], num_target_layers=36)
    expect_error("made for a target with 36 layers", target, d)

    other = target_config(tied=False)
    other.update(hidden_size=32, head_dim=8)
    wrong = write_drafter(tmp_path / "wrong_h", dspark_config(other))
    expect_error("hidden size 32 but .* has 64", target, wrong)


def test_unknown_or_refused_architectures(tmp_path, tiny_pair):
    target, _ = tiny_pair
    d = copy_drafter(tmp_path, tiny_pair)
    edit_config(d, architectures=["MysteryDraftModel"])
    expect_error("unknown drafter architecture 'MysteryDraftModel'", target, d)
    edit_config(d, architectures=["DFlash2DraftModel"])
    expect_error("DFlash-2 checkpoints .* not supported", target, d)
    expect_error("plain language model", target, target)
    edit_config(d, architectures=["Qwen3DSparkModel"], markov_head_type="rnn")
    expect_error("markov_head_type 'rnn' is not supported", target, d)


def test_mode_and_flag_errors(tiny_pair):
    target, drafter = tiny_pair
    expect_error("--mode eagle3 needs a eagle3 drafter", target, drafter, mode="eagle3")
    expect_error("--drafter-bits must be one of", target, drafter, drafter_bits=3)
    expect_error("--mode must be one of", target, drafter, mode="fast")
    expect_error("no dspark drafter is known", target, None, mode="dspark")


def test_sharded_checkpoint_and_shared_tensors(tmp_path):
    root = FIXTURES / "dspark_qwen3"
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(root / "drafter" / "config.json", d)
    weights = mx.load(str(root / "drafter" / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file, keys in shards.items():
        mx.save_safetensors(str(d / file), {k: weights[k] for k in keys})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _, _, drafter, config = load_pair(str(root / "target"), str(d), drafter_bits=4)
    # The fixture's drafter copies the target's (tied) embedding: both copies are dropped.
    assert config.shared_with_target == ["embed_tokens", "lm_head"]
    assert "embed_tokens" not in drafter and "lm_head" not in drafter


def test_untied_random_drafter_keeps_its_own_copies(tiny_pair):
    _, _, drafter, config = load_pair(*map(str, tiny_pair), drafter_bits=8)
    assert config.shared_with_target == []
    assert isinstance(drafter.fc, nn.QuantizedLinear) and drafter.fc.bits == 8


def test_quantized_target_shares_with_a_full_precision_drafter(tmp_path):
    """An 8-bit target (like mlx-community's) still shares tensors with a bf16 drafter copy."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from mlx_specdec.loading import load_target

    config = target_config(tied=True)
    full = write_target(tmp_path / "full", config, seed=5)
    target, _ = load_target(str(full))
    drafter_config = dspark_config(config)
    d = write_drafter(tmp_path / "d", drafter_config)
    weights = mx.load(str(d / "model.safetensors"))
    weights["embed_tokens.weight"] = weights["lm_head.weight"] = target.embed_tokens.weight
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    model, qconfig = quantize_model(target.model, dict(config), group_size=64, bits=8)
    q = tmp_path / "q8"
    shutil.copytree(full, q)
    save_model(q, model)
    save_config(qconfig, q / "config.json")
    _, _, _, pair = load_pair(str(q), str(d))
    assert pair.shared_with_target == ["embed_tokens", "lm_head"]


@pytest.mark.parametrize(
    "name,key",
    [
        ("mlx-community/Qwen3-4B-8bit", "qwen3-4b"),
        ("mlx-community/Qwen3-4B-MLX-4bit", "qwen3-4b"),
        ("Qwen/Qwen3-8B", "qwen3-8b"),
        ("/models/Qwen3-14B-bf16/", "qwen3-14b"),
        ("mlx-community/gemma-4-12B-it-8bit", "gemma-4-12b-it"),
    ],
)
def test_registry_is_quantization_agnostic(name, key):
    assert normalize(name) == key and lookup(name).id == key


def test_registry_does_not_match_other_models():
    assert lookup("mlx-community/Qwen3-4B-Instruct-2507-4bit") is None
    assert resolve_mode("someone/unknown-model", "auto", None) == ("baseline", None)
    assert resolve_mode("mlx-community/Qwen3-8B-4bit", "auto", None)[0] == "dspark"
