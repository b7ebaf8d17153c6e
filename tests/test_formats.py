"""Drafters in other checkpoint formats: vLLM speculators, z-lab DFlash 2, GGUF, SpecForge
EAGLE3, reduced draft vocabularies (d2t), and the one-line refusals of what we do not support.

Fixtures (tests/fixtures/formats, built by scripts/make_format_fixtures.py with the reference
packages) hold the reference's own outputs; the targets are the conformance fixtures'."""

from __future__ import annotations

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    FIXTURES,
    check_fixture_case,
    eagle3_config,
    load_reference,
    max_diff,
    run,
    target_config,
    write_drafter,
    write_target,
)
from test_sampling import (
    ALPHA,
    DRAFT_SAMPLES,
    SETTINGS,
    TAPS,
    V,
    drafts_pvalues,
    loop_pvalue,
    tiny_target,
)

from mlx_specdec import SpecDecError, load_pair
from mlx_specdec.drafters import eagle3
from mlx_specdec.drafters.base import Proposal
from mlx_specdec.loading import load_drafter, load_target
from mlx_specdec.sampling import SamplingParams

FORMATS = FIXTURES.parent / "formats"


def _reference(name: str) -> tuple[dict, dict[str, mx.array]]:
    root = FORMATS / name
    return json.loads((root / "reference.json").read_text()), mx.load(
        str(root / "reference.safetensors")
    )


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def speculators_pair():
    target = FIXTURES / "dspark_qwen3" / "target"
    return load_pair(
        str(target), str(FORMATS / "speculators_dspark_qwen3" / "drafter"), drafter_bits=16
    )


def test_speculators_dspark_block15_reproduces_the_reference(speculators_pair):
    """Every round of the reference loop over speculators' own forward: same drafts up to the
    first rejection, same acceptance, same committed tokens; and the output is greedy's."""
    target, _, drafter, config = speculators_pair
    assert config.drafter_format == "speculators" and drafter.kind == "dspark"
    assert drafter.max_draft == 15 and drafter.tap_ids == (1, 2, 4, 5, 6)  # hidden_states ids - 1
    assert config.shared_with_target == ["embed_tokens", "lm_head"]  # the verifier's, bound
    ref, _ = _reference("speculators_dspark_qwen3")
    assert _check_reference_trace(target, drafter, ref) == 24  # rounds whose acceptance compared


def test_gguf_dspark_reproduces_the_deepspec_trace():
    """The DeepSpec conformance drafter written by gguf's GGUFWriter: the DeepSpec trace."""
    root = FIXTURES / "dspark_qwen3"
    ref, _ = load_reference(root)
    gguf_file = FORMATS / "gguf_dspark_qwen3" / "drafter.gguf"
    target, _, drafter, config = load_pair(str(root / "target"), str(gguf_file), drafter_bits=16)
    assert config.drafter_format == "gguf"
    for case, at_least in zip(ref["cases"], (7, 7, 6, 4)):
        check_fixture_case(target, drafter, ref, case, at_least)


@pytest.fixture(scope="module")
def dflash2_pair():
    target = FIXTURES / "zlab_dflash_qwen3" / "target"
    return load_pair(str(target), str(FORMATS / "zlab_dflash2_qwen3" / "drafter"), drafter_bits=16)


def test_dflash2_reproduces_the_reference(dflash2_pair):
    """z-lab's dflash_generate with a DFlash2DraftModel: our tokens are its; round 0's chain
    through the candidate selector is its up to the first rejection; the unary logits agree."""
    target, _, drafter, config = dflash2_pair
    assert config.mode == "dflash" and type(drafter).__name__ == "DFlash2Drafter"
    ref, tensors = _reference("zlab_dflash2_qwen3")
    for case in ref["cases"]:
        tokens, rounds = run(target, drafter, case["prompt_ids"], 48, ref["stop_token_ids"])
        assert tokens == case["output_tokens"], case["name"]
        assert len(rounds[0].committed) == case["acceptance_lengths"][0], case["name"]
        r0 = case["round0"]
        ctx = tensors[f"{case['name']}.round0.ctx_features"]
        next_tokens = mx.array(case["prompt_ids"][1:] + [r0["anchor"]])
        proposal = drafter.propose(drafter.new_state(), ctx, next_tokens, 15, SamplingParams())
        upto = case["acceptance_lengths"][0]
        assert proposal.tokens.tolist()[:upto] == r0["proposed_tokens"][:upto], case["name"]
        block = mx.array([r0["anchor"]] + [496] * 15)
        logits = drafter.logits(block, ctx, drafter.new_state(), 15)
        assert max_diff(logits, tensors[f"{case['name']}.round0.draft_logits"]) < 2.0


def test_dflash2_sampled_drafts_follow_the_reported_q(dflash2_pair):
    """q is the selector's softmax over its K candidates, scattered onto the vocabulary: each
    row is a distribution with K entries, and the draft is one of them."""
    target, _, drafter, _ = dflash2_pair
    ref, tensors = _reference("zlab_dflash2_qwen3")
    case = ref["cases"][0]
    ctx = tensors[f"{case['name']}.round0.ctx_features"]
    next_tokens = mx.array(case["prompt_ids"][1:] + [case["round0"]["anchor"]])
    proposal = drafter.propose(drafter.new_state(), ctx, next_tokens, 6, SamplingParams(1.0))
    q = np.array(proposal.q)
    assert np.allclose(q.sum(-1), 1, atol=1e-5) and ((q > 0).sum(-1) <= 4).all()
    assert (q[np.arange(6), np.array(proposal.tokens)] > 0).all()


# ----------------------------------------------------------------------------- SpecForge EAGLE3
def _specforge_copy(native: Path, path: Path, ids: list[int]) -> None:  # noqa: F821
    """A native EAGLE3 checkpoint (no q/k norms) re-laid as SpecForge's SGLang export: midlayer
    names, no embedding, a reduced head with d2t offsets and a t2d mask."""
    config = json.loads((native / "config.json").read_text())
    weights = mx.load(str(native / "model.safetensors"))
    out = {k.replace("layers.0.", "midlayer."): v for k, v in weights.items() if "embed" not in k}
    out["lm_head.weight"] = weights["lm_head.weight"][mx.array(ids)]
    out["d2t"] = mx.array(ids) - mx.arange(len(ids))
    out["t2d"] = mx.zeros((config["vocab_size"],), mx.bool_).at[mx.array(ids)].add(True)
    spec = {k: v for k, v in config.items() if k not in ("target_layer_ids", "qk_norm")}
    spec.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        draft_vocab_size=len(ids),
        eagle_config={"eagle_aux_hidden_state_layer_ids": config["target_layer_ids"]},
    )
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(spec))
    mx.save_safetensors(str(path / "model.safetensors"), out)


def test_specforge_eagle3_with_a_reduced_vocabulary(tmp_path):
    """A SpecForge head drafts what the same weights drafted natively, restricted to its draft
    vocabulary: with greedy drafts, the reduced head's pick is the full head's best draft-vocab
    token, mapped back to its target id."""
    tconfig = target_config(layers=6)
    target_dir = write_target(tmp_path / "target", tconfig)
    config = eagle3_config(tconfig, taps=(0, 2, 4), qk_norm=False, ttt_length=4)
    native = write_drafter(tmp_path / "native", config, seed=3)
    ids = list(range(0, 512, 2))  # every other token
    _specforge_copy(native, tmp_path / "specforge", ids)
    target, _ = load_target(str(target_dir))
    ours, cfg, shared = load_drafter(str(tmp_path / "specforge"), target, bits=32)
    assert cfg["checkpoint_format"] == "specforge" and "embed_tokens" in shared
    assert ours.tap_ids == (0, 2, 4) and ours.max_draft == 4
    ref, _, _ = load_drafter(str(native), target, bits=32)
    logits_ref = ref.logits(mx.ones((1, 1, 64)))
    best = mx.array(ids)[mx.argmax(logits_ref[:, mx.array(ids)], axis=-1)]
    assert mx.array_equal(mx.argmax(ours.logits(mx.ones((1, 1, 64))), axis=-1), best)
    _, rounds = run(target, ours, [5, 6, 7], 12)
    assert all(t % 2 == 0 for r in rounds for t in r.proposed)  # draft-vocab ids only


# ----------------------------------------------------------------------------- reference-written
# EAGLE3 (speculators, SpecForge) and speculators DFlash checkpoints written by the reference
# packages' own classes, with the trace of a torch loop over the reference forward.
def _check_reference_trace(target, drafter, ref: dict) -> int:
    """Our loop against the reference loop, case by case: the same output; per round the same
    drafts up to the first rejection (until the reference's draft margin is within bf16 noise),
    the same committed tokens, and the same accepted count where every draft up to the first
    rejection is clear of that noise and we drafted the full chain (ours stop at the budget).
    Returns how many rounds compared their acceptance."""
    compared = 0
    for case in ref["cases"]:
        tokens, rounds = run(target, drafter, case["prompt_ids"], 48, ref["stop_token_ids"])
        assert tokens == case["output_tokens"], case["name"]
        assert len(rounds) == len(case["rounds"]), case["name"]
        for ours, theirs in zip(rounds, case["rounds"]):
            margins = theirs["draft_margin"][: theirs["accepted"] + 1]
            robust = next((k for k, m in enumerate(margins) if m < 0.5), len(margins))
            upto = min(robust, len(ours.proposed))
            assert ours.proposed[:upto] == theirs["proposed_tokens"][:upto], case["name"]
            assert ours.committed == theirs["committed_tokens"], case["name"]
            if robust == len(margins) and len(ours.proposed) == len(theirs["proposed_tokens"]):
                assert ours.accepted == theirs["accepted"], case["name"]
                compared += 1
    return compared


def _eagle3_round0_logits(drafter, case: dict, ctx: mx.array) -> mx.array:
    """Round 0's chain logits, fed the reference's own drafts (so a near-tie cannot fork it)."""
    r0 = case["rounds"][0]
    cache = drafter.new_state()[0]
    h = drafter.out(drafter.extend(cache, ctx, mx.array(case["prompt_ids"][1:] + [r0["anchor"]])))
    rows = []
    for k in range(len(r0["proposed_tokens"])):
        if k:
            h = drafter.out(drafter.step(cache, mx.array([r0["proposed_tokens"][k - 1]]), h))
        rows.append(drafter.logits(h).reshape(-1))
    return mx.stack(rows)


def _eagle3_pair(name: str):
    target = FIXTURES / "eagle3_qwen3" / "target"
    return load_pair(str(target), str(FORMATS / name / "drafter"), drafter_bits=16)


def _check_eagle3_fixture(name: str, fmt: str, taps: tuple[int, ...], rounds: int) -> None:
    target, _, drafter, config = _eagle3_pair(name)
    ref, tensors = _reference(name)
    assert config.drafter_format == fmt and drafter.kind == "eagle3"
    assert drafter.tap_ids == taps and drafter.max_draft == ref["ttt_length"] == 7
    ids = mx.array(ref["draft_vocab"])
    assert mx.array_equal(drafter._draft_ids, ids)  # d2t, read back as target ids
    assert _check_reference_trace(target, drafter, ref) == rounds
    for case in ref["cases"]:
        ctx = tensors[f"{case['name']}.round0.ctx_features"]
        logits = _eagle3_round0_logits(drafter, case, ctx)
        want = tensors[f"{case['name']}.round0.draft_logits"]  # over the draft vocabulary
        assert max_diff(logits[:, ids], want) < 0.75, case["name"]
        assert max_diff(logits[:1, ids], want[:1]) < 0.35, case["name"]
        outside = np.ones(logits.shape[-1], bool)
        outside[np.array(ids)] = False
        assert (np.array(logits.astype(mx.float32))[:, outside] == -np.inf).all()


def test_speculators_eagle3_reduced_vocab_reproduces_the_reference():
    """`Eagle3DraftModel.save_pretrained` (qwen3 layer with q/k norms, 5 taps as hidden-state
    ids, a 64-token draft vocabulary with d2t/t2d, its own embedding): the trace of a loop over
    speculators' `forward` (TTT steps, teacher-forced with the drafts) and round 0's logits."""
    _check_eagle3_fixture("speculators_eagle3_qwen3", "speculators", (1, 2, 3, 4, 5), 37)


def test_specforge_eagle3_reproduces_the_reference():
    """SpecForge's `LlamaForCausalLMEagle3` exported as `export_to_sglang` does (no embedding,
    `midlayer.*`, d2t/t2d, no eagle_config: the default taps [1, N/2 - 1, N - 4], no ttt length:
    7): the trace of a loop over its `backbone` + `compute_logits` chain and round 0's logits."""
    _check_eagle3_fixture("specforge_eagle3_qwen3", "specforge", (1, 2, 3), 31)


def test_specforge_norm_output_true_is_the_default_head(tmp_path):
    """SpecForge's `norm_output` (default true) means logits from norm(h), the raw h fed on: not
    speculators' EAGLE 3.1 `norm_output`. A config that spells it out drafts the same."""
    path = tmp_path / "d"
    shutil.copytree(FORMATS / "specforge_eagle3_qwen3" / "drafter", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "norm_output": True}))
    target, _, drafter, _ = load_pair(
        str(FIXTURES / "eagle3_qwen3" / "target"), str(path), drafter_bits=16
    )
    ref, _ = _reference("specforge_eagle3_qwen3")
    assert _check_reference_trace(target, drafter, ref) == 31
    assert not drafter.config.norm_output


def test_speculators_dflash_reproduces_the_reference():
    """`DFlashDraftModel.save_pretrained` (speculators' default dflash: sample_from_anchor
    false, block 16, 15 drafts from rows 1..; no embedding or head: the verifier's): the trace of
    a loop over its `_backbone_forward` and round 0's block logits."""
    target = FIXTURES / "zlab_dflash_qwen3" / "target"
    name = "speculators_dflash_qwen3"
    target, _, drafter, config = load_pair(
        str(target), str(FORMATS / name / "drafter"), drafter_bits=16
    )
    assert config.drafter_format == "speculators" and drafter.kind == "dflash"
    assert drafter.max_draft == 15 and drafter.tap_ids == (1, 3, 4, 6)
    assert config.shared_with_target == ["embed_tokens", "lm_head"]
    ref, tensors = _reference(name)
    assert _check_reference_trace(target, drafter, ref) == 11
    for case in ref["cases"]:
        ctx = tensors[f"{case['name']}.round0.ctx_features"]
        block = mx.array([case["rounds"][0]["anchor"]] + [496] * 15)
        logits = drafter._head(drafter.backbone(block, ctx, drafter.new_state()))[1:]
        assert max_diff(logits, tensors[f"{case['name']}.round0.draft_logits"]) < 1.5


@pytest.mark.parametrize(
    "name,change,message",
    [
        ("specforge", lambda c: c.update(norm_output=False), "norm_output = false"),
        ("specforge", lambda c: c.update(fc_norm=True), "fc_norm = true"),
        (
            "specforge",
            lambda c: c.update(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2]}),
            "must list 3 layers",
        ),
        ("specforge", lambda c: c.update(target_hidden_size=128), "target_hidden_size 128"),
        ("specforge", lambda c: c.update(draft_vocab_size=100), "d2t has 64 entries"),
        ("speculators", lambda c: c.update(norm_before_fc=True), "norm_before_fc = true"),
        ("speculators", lambda c: c.update(draft_vocab_size=32), "d2t has 64 entries"),
        (
            "speculators",
            lambda c: c.update(eagle_aux_hidden_state_layer_ids=[2, 3, 4, 5, 7]),
            "entry 7",
        ),
    ],
)
def test_unsupported_or_foreign_eagle3_drafter_is_one_line(tmp_path, name, change, message):
    path = tmp_path / "d"
    shutil.copytree(FORMATS / f"{name}_eagle3_qwen3" / "drafter", path)
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    target, _ = load_target(str(FIXTURES / "eagle3_qwen3" / "target"))
    with pytest.raises(SpecDecError, match=message) as e:
        load_drafter(str(path), target, bits=16)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- reduced vocabulary
DRAFT_IDS = [0, 2, 4]  # the draft vocabulary: 3 of the tiny target's 5 tokens


def reduced_eagle3(target, seed: int = 4):
    config = eagle3_config(target.config, taps=TAPS, ttt_length=3, draft_vocab_size=3)
    mx.random.seed(seed)
    drafter = eagle3.build(config, "reduced drafter")
    drafter.lm_head.weight = drafter.lm_head.weight * 3
    drafter.map_draft_vocab(mx.array(DRAFT_IDS))
    mx.eval(drafter.parameters())
    target.set_taps(drafter.tap_ids)
    return drafter


def misplaced_q(p: Proposal) -> Proposal:
    """A wrong map for q alone: the mass of draft token j reported on the next target id."""
    return Proposal(p.tokens, mx.roll(p.q, 1, axis=-1))


@pytest.fixture(scope="module")
def reduced_pair():
    target = tiny_target()
    return target, reduced_eagle3(target)


def test_reduced_vocab_drafts_follow_the_mapped_q(reduced_pair):
    target, drafter = reduced_pair
    params = SETTINGS["t0.8-all"]
    pvalues = drafts_pvalues(target, drafter, params, samples=DRAFT_SAMPLES)
    assert min(pvalues) > ALPHA / len(pvalues), pvalues
    wrong = drafts_pvalues(target, drafter, params, DRAFT_SAMPLES, wrap=misplaced_q)
    assert min(wrong) < ALPHA / len(wrong), wrong


@pytest.mark.slow
def test_reduced_vocab_loop_follows_the_target_law(reduced_pair, monkeypatch):
    target, drafter = reduced_pair
    pvalue, rounds = loop_pvalue(target, drafter, SETTINGS["t1"], tokens=1000)
    assert pvalue > ALPHA, pvalue
    assert all(t in DRAFT_IDS for r in rounds for t in r.proposed)
    assert any(r.accepted >= 1 for r in rounds)
    propose = drafter.propose
    monkeypatch.setattr(drafter, "propose", lambda *a: misplaced_q(propose(*a)))
    pvalue, _ = loop_pvalue(target, drafter, SETTINGS["t1"], tokens=1000)
    assert pvalue < ALPHA, pvalue


def test_reduced_vocab_greedy_is_target_greedy():
    target = tiny_target()
    drafter = reduced_eagle3(target)
    tokens, rounds = run(target, drafter, [1, 3], 20)
    from helpers import greedy_reference

    assert tokens == greedy_reference(target.model, [1, 3], 20, set())
    assert all(t in DRAFT_IDS for r in rounds for t in r.proposed)
    assert V == 5


# ----------------------------------------------------------------------------- bad input
def _edited(tmp_path, name: str, change) -> str:
    path = tmp_path / name
    shutil.copytree(FORMATS / "speculators_dspark_qwen3" / "drafter", path)
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def qwen3_target():
    return load_target(str(FIXTURES / "dspark_qwen3" / "target"))[0]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c["speculators_config"].update(algorithm="mtp"), "algorithm 'mtp'"),
        (
            lambda c: c["transformer_layer_config"].update(
                layer_types=["sliding_attention"] * 3, use_sliding_window=True
            ),
            "transformer_layer_config.layer_types",
        ),
        (lambda c: c.update(aux_hidden_state_layer_ids=[0, 3, 5, 6, 7]), "entry 0"),
        (lambda c: c.update(aux_hidden_state_layer_ids=[2, 3, 5, 6, 9]), "entry 9"),
        (lambda c: c.update(markov_head_type="rnn"), "markov_head_type 'rnn'"),
        (lambda c: c.update(draft_vocab_size=100), "no d2t"),
    ],
)
def test_unsupported_or_foreign_speculators_drafter_is_one_line(
    tmp_path, qwen3_target, change, message
):
    with pytest.raises(SpecDecError, match=message) as e:
        load_drafter(_edited(tmp_path, "d", change), qwen3_target, bits=16)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(hidden_size=32, intermediate_size=64, head_dim=8), "hidden size 64 but"),
        (dict(vocab_size=640), "vocabulary size 512 but"),
    ],
)
def test_speculators_drafter_for_another_target_is_one_line(tmp_path, over, message):
    target, _ = load_target(str(write_target(tmp_path / "t", target_config(layers=8, **over))))
    drafter = FORMATS / "speculators_dspark_qwen3" / "drafter"
    with pytest.raises(SpecDecError, match=message):
        load_drafter(str(drafter), target, bits=16)


def _gguf_bytes(kind: int) -> bytes:
    """A minimal GGUF v3 file: dspark architecture, one 32-element tensor of ggml type `kind`."""

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    meta = string("general.architecture") + struct.pack("<I", 8) + string("dspark")
    info = string("dspark.fc.weight") + struct.pack("<IQQIQ", 2, 32, 1, kind, 0)
    body = header + meta + info
    return body + b"\0" * (-len(body) % 32) + b"\0" * 64


def test_gguf_with_a_quantized_tensor_is_one_line(tmp_path, qwen3_target):
    file = tmp_path / "q.gguf"
    file.write_bytes(_gguf_bytes(2))  # Q4_0
    with pytest.raises(SpecDecError, match="'dspark.fc.weight' is Q4_0; only F32, F16 and BF16"):
        load_drafter(str(file), qwen3_target, bits=16)


def test_gguf_log_snr_conditioning_is_refused(tmp_path, qwen3_target):
    from mlx_specdec.drafters.formats import gguf

    with pytest.raises(SpecDecError, match="log_snr_conditioning = true"):
        gguf.translate(
            {"general.architecture": "dspark", "dspark.dspark.log_snr_conditioning": True}, {}, "d"
        )


def test_bad_d2t_maps_are_refused():
    from mlx_specdec.drafters.formats import draft_vocab_ids

    dup = {"d2t": mx.array([0, 0, -1])}  # ids 0, 1, 1
    with pytest.raises(SpecDecError, match="same target id"):
        draft_vocab_ids(dup, 3, 5, "d")
    out = {"d2t": mx.array([0, 4, 4])}  # id 6 of 5
    with pytest.raises(SpecDecError, match="outside the target"):
        draft_vocab_ids(out, 3, 5, "d")
    mask = {"d2t": mx.array([0, 1, 2]), "t2d": mx.array([True, True, True, False, False])}
    with pytest.raises(SpecDecError, match="disagree"):
        draft_vocab_ids(mask, 3, 5, "d")
