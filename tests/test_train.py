"""train-drafter on a tiny random Qwen3 target: the training forward is the inference forward,
the loss goes down, and the checkpoint loads with `load_pair` and decodes losslessly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from helpers import greedy_reference, target_config, write_target
from mlx_lm.generate import generate_step

from mlx_specdec.cli import main
from mlx_specdec.generate import encode_prompt, speculative_generate
from mlx_specdec.loading import load_drafter, load_pair, load_target
from mlx_specdec.train import TrainOptions
from mlx_specdec.train.checkpoint import write_checkpoint
from mlx_specdec.train.data import generate_answers
from mlx_specdec.train.model import (
    block_forward,
    default_taps,
    drafter_config,
    init_drafter,
    target_pass,
)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = target_config(tied=False, layers=4, max_position_embeddings=1024)
    return write_target(tmp_path_factory.mktemp("target"), config, seed=0)


@pytest.fixture(scope="module")
def trained(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A 60-step DSpark run through the CLI; returns (checkpoint folder, losses)."""
    work = tmp_path_factory.mktemp("train")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i} is"}) + "\n" for i in range(8)))
    out = work / "drafter"
    args = ["train-drafter", "--model", str(target_dir), "--out", str(out), "--prompts",
            str(prompts), "--steps", "60", "--samples", "8", "--gen-tokens", "48",
            "--batch-size", "4", "--anchors", "16", "--draft-layers", "1", "--markov-rank", "16",
            "--lr", "3e-3", "--save-every", "30", "--temperature", "0"]  # fmt: skip
    assert main(args) == 0
    progress = json.loads((out / "train_state" / "progress.json").read_text())
    return out, progress["losses"]


def test_default_taps_follow_deepspec() -> None:
    assert default_taps(36) == [1, 9, 17, 25, 33]
    assert default_taps(40) == [1, 10, 19, 28, 37]
    assert default_taps(4) == [0, 1, 2]


def test_generated_answers_are_greedy_decoding(target_dir: Path) -> None:
    """Prompts batched by length decode what mlx-lm's one-prompt greedy loop decodes."""
    target, _ = load_target(str(target_dir))
    prompts = [[5, 9, 11], [7, 3, 2], [4, 8], [30, 31, 32, 33, 34], [6, 6, 6]]

    def mlx_lm_greedy(prompt: list[int], eos: list[int]) -> list[int]:
        return greedy_reference(target.model, prompt, 12, set(eos))

    # A stop token the first prompt's answer meets midway: answers end there, stop included.
    eos = [mlx_lm_greedy(prompts[0], [])[4]]
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    answers = generate_answers(target, prompts, 12, greedy, eos, batch=2)
    assert len(answers[0]) <= 5 and answers[0][-1] == eos[0]
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == mlx_lm_greedy(prompt, eos)


ANCHORS = mx.array([[4, 11], [2, 16]], dtype=mx.int32)


def fresh_drafter_and_batch(target_dir: Path, seed: int, **options: Any) -> tuple:
    """(target, training config, fresh drafter, ids [2, 24], their taps) for a forward check."""
    target, tokenizer = load_target(str(target_dir))
    config = drafter_config(target, tokenizer, TrainOptions(model="", out="", **options))
    drafter = init_drafter(target, config)
    target.set_taps(drafter.tap_ids)
    mx.random.seed(seed)
    ids = mx.random.randint(0, 490, (2, 24)).astype(mx.int32)
    return target, config, drafter, ids, target_pass(target, ids)[1]


def test_training_forward_equals_inference_forward(target_dir: Path) -> None:
    """Blocks trained all at once with a mask see exactly what one block sees at inference."""
    _, config, drafter, ids, taps = fresh_drafter_and_batch(
        target_dir, 1, draft_layers=2, markov_rank=16
    )
    anchors = ANCHORS
    logits, _ = block_forward(drafter, taps, ids, anchors)
    mask = mx.full((6,), config["mask_token_id"], mx.int32)
    markov = drafter.markov_head
    for s in range(2):
        for a in range(2):
            p = anchors[s, a].item()
            h = drafter.backbone(mx.concatenate([ids[s, p : p + 1], mask]), taps[s, :p],
                                 drafter.new_state())  # fmt: skip
            z = drafter.lm_head(h) + markov.markov_w2(markov.markov_w1(ids[s, p : p + 7]))
            assert mx.allclose(z, logits[s, a], atol=1e-4).item(), (s, a)


def test_train_lowers_loss_and_writes_deepspec_layout(trained: tuple[Path, list]) -> None:
    out, losses = trained
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]
    assert config["num_target_layers"] == 4 and config["num_hidden_layers"] == 1
    assert config["mask_token_id"] == 496 and config["block_size"] == 7
    names = set(mx.load(str(out / "model.safetensors")))
    assert {"embed_tokens.weight", "lm_head.weight", "fc.weight", "markov_head.markov_w1.weight",
            "confidence_head.proj.bias", "layers.0.self_attn.q_proj.weight"} <= names  # fmt: skip
    assert not any(n.startswith("model.") for n in names)


def test_trained_drafter_is_lossless(target_dir: Path, trained: tuple[Path, list]) -> None:
    out, _ = trained
    target, tokenizer, drafter, config = load_pair(str(target_dir), str(out), drafter_bits=32)
    assert config.mode == "dspark" and drafter is not None
    ids = encode_prompt(tokenizer, "item 3 is")
    result = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=40)
    steps = generate_step(mx.array(ids), target.model, max_tokens=40)
    reference = []
    for token, _ in steps:
        if int(token) in tokenizer.eos_token_ids:
            break
        reference.append(int(token))
    assert result.tokens == reference
    # An untrained drafter of a 512-token vocabulary accepts ~nothing (1.0 per round); 60 steps
    # on the target's own answers must already get some drafts through.
    assert result.mean_accept_len > 1.05


def test_resume_continues_from_the_saved_step(
    target_dir: Path, trained: tuple[Path, list], tmp_path: Path
) -> None:
    out, losses = trained
    copy = tmp_path / "drafter"
    shutil.copytree(out, copy)
    args = ["train-drafter", "--model", str(target_dir), "--out", str(copy), "--resume",
            "--steps", "64", "--batch-size", "4", "--anchors", "16", "--lr", "3e-3"]  # fmt: skip
    assert main(args) == 0
    progress = json.loads((copy / "train_state" / "progress.json").read_text())
    assert progress["step"] == 64
    assert progress["losses"][:60] == losses


def test_resume_without_state_is_a_clear_error(target_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train-drafter", "--model", str(target_dir), "--out", str(tmp_path / "x"), "--resume"]
    assert main(args) == 2
    assert "holds no training state" in capsys.readouterr().err


def test_zlab_training_forward_equals_zlab_inference(target_dir: Path, tmp_path: Path) -> None:
    """A DFlash drafter written in z-lab's layout, loaded as z-lab's DFlashDraftModel, drafts what
    its training forward computed: block rows 1..7 are the drafts for anchor + 1..7."""
    target, config, trained, ids, taps = fresh_drafter_and_batch(
        target_dir, 2, kind="dflash", draft_layers=2
    )
    anchors = ANCHORS
    logits, _ = block_forward(trained, taps, ids, anchors, zlab=True)
    assert logits.shape[2] == 7
    write_checkpoint(trained, config, tmp_path, "float32", "zlab")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["DFlashDraftModel"] and written["block_size"] == 8
    assert written["dflash_config"]["mask_token_id"] == config["mask_token_id"]
    names = set(mx.load(str(tmp_path / "model.safetensors")))
    assert "fc.weight" in names and not {"embed_tokens.weight", "lm_head.weight"} & names
    drafter, _, _ = load_drafter(str(tmp_path), target, bits=32)
    assert drafter.kind == "dflash" and drafter.max_draft == 7
    masks = mx.full((7,), config["mask_token_id"], mx.int32)
    for s in range(2):
        for a in range(2):
            p = anchors[s, a].item()
            block = mx.concatenate([ids[s, p : p + 1], masks])
            got = drafter.logits(block, taps[s, :p], drafter.new_state(), 7)
            assert mx.allclose(got, logits[s, a], atol=1e-4).item(), (s, a)
    # The DeepSpec reading of the same weights (no leading row) is another model.
    deepspec, _ = block_forward(trained, taps, ids, anchors)
    assert not mx.allclose(deepspec, logits, atol=1e-2).item()


def test_train_dflash_writes_zlab_layout_and_is_lossless(
    target_dir: Path, tmp_path: Path, capsys
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i} is"}) + "\n" for i in range(8)))
    out = tmp_path / "dflash"
    args = ["train-drafter", "--model", str(target_dir), "--kind", "dflash", "--out", str(out),
            "--prompts", str(prompts), "--steps", "40", "--samples", "8", "--gen-tokens", "48",
            "--batch-size", "4", "--anchors", "16", "--draft-layers", "1", "--lr", "3e-3",
            "--temperature", "0"]  # fmt: skip
    assert main(args) == 0
    losses = json.loads((out / "train_state" / "progress.json").read_text())["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    target, tokenizer, drafter, config = load_pair(str(target_dir), str(out), drafter_bits=32)
    assert config.mode == "dflash"
    ids = encode_prompt(tokenizer, "item 5 is")
    result = speculative_generate(target, tokenizer, drafter, ids, max_new_tokens=40)
    reference = [int(t) for t, _ in generate_step(mx.array(ids), target.model, max_tokens=40)]
    stop = next((i for i, t in enumerate(reference) if t in tokenizer.eos_token_ids), 40)
    assert result.tokens == reference[:stop]
    assert result.mean_accept_len > 1.05
    resume = ["train-drafter", "--model", str(target_dir), "--kind", "dflash", "--out", str(out),
              "--resume", "--steps", "50", "--layout", "deepspec"]  # fmt: skip
    assert main(resume) == 2
    assert "was trained for the zlab layout, not deepspec" in capsys.readouterr().err
    assert main(resume[:-2]) == 0  # the saved layout, unsaid
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]


def test_layout_must_fit_the_kind(target_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train-drafter", "--model", str(target_dir), "--out", str(tmp_path / "x"),
            "--layout", "zlab"]  # fmt: skip
    assert main(args) == 2
    assert "--layout zlab is not a dspark layout" in capsys.readouterr().err


def test_earlier_state_is_never_overwritten_or_mixed(
    target_dir: Path, trained: tuple[Path, list], capsys
) -> None:
    out, _ = trained
    base = ["train-drafter", "--model", str(target_dir), "--out", str(out)]
    assert main(base) == 2  # a fresh run would overwrite the saved state
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main([*base, "--resume", "--kind", "dflash"]) == 2
    assert "holds a dspark drafter; pass --kind dspark" in capsys.readouterr().err


def test_draft_heads_must_divide(target_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train-drafter", "--model", str(target_dir), "--out", str(tmp_path / "x"),
            "--draft-heads", "3", "--draft-kv-heads", "2"]  # fmt: skip
    assert main(args) == 2
    assert "must be a multiple of --draft-kv-heads" in capsys.readouterr().err
    assert main([*args[:-4], "--draft-intermediate", "0"]) == 2
    assert "--draft-intermediate must be >= 1, got 0" in capsys.readouterr().err
