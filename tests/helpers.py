"""What the tests share: tiny random models (configs, builders, checkpoints on disk in the Hugging
Face layout), plain mlx-lm greedy decoding as the reference, and the one check of a run against a
conformance fixture's reference trace.

Builders (one per kind; every parameter a caller needs is a keyword):
- `target_config` (Qwen3 / Llama) and `gemma4_text_config` (+ `GEMMA4_TARGETS`): target configs;
  `build_model` makes the random mlx-lm model, `write_target` saves it with the fixture tokenizer
  (`save_target`: any model).
- `dspark_config`, `dflash_config`, `eagle3_config`: drafter configs for a target config (Qwen3
  or Gemma-4 text); `build_drafter` makes the random drafter, `write_drafter` saves it.

Fixtures: `load_reference` reads one; `run` collects a verify-loop run; `check_fixture_case` runs
a case and checks its tokens, its stop and (`check_trace`) its rounds, asserting how many rounds
were compared at least.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes, save_config, save_model

from mlx_specdec import speculate
from mlx_specdec.sampling import SamplingParams, probs
from mlx_specdec.speculate import Round

FIXTURES = Path(__file__).parent / "fixtures" / "conformance"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_SOURCE = FIXTURES / "dspark_qwen3" / "target"  # 496-token byte-level BPE, ChatML
VOCAB = 512  # embedding rows (the tokenizer's 496 + padding rows, like Qwen3)
MASK_ID = 496  # the Qwen3 drafters' mask token: the first padding row
GEMMA4_MASK_ID = 4  # the Gemma-4 drafters' mask token (Gemma's <mask>)
GEMMA4_WINDOW = 8  # the tiny Gemma-4 targets' sliding window


# ----------------------------------------------------------------------------- targets
def target_config(family: str = "qwen3", tied: bool = True, layers: int = 6, **over) -> dict:
    """A tiny Qwen3 (or Llama) config over the fixture tokenizer's vocabulary; `over` replaces
    or adds keys."""
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
    config.update(over)
    return config


def gemma4_text_config(**over) -> dict:
    """A tiny gemma4_text: 12B-like global layers (K=V, 1 KV head, head dim 32, proportional
    RoPE) between sliding layers with an 8-token window."""
    config = dict(
        model_type="gemma4_text",
        hidden_size=64,
        num_hidden_layers=6,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        rms_norm_eps=1e-6,
        vocab_size=512,
        vocab_size_per_layer_input=512,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        sliding_window=GEMMA4_WINDOW,
        layer_types=["sliding_attention"] * 2
        + ["full_attention"]
        + ["sliding_attention"] * 2
        + ["full_attention"],
        final_logit_softcapping=30.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1e6,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        },
        eos_token_id=[1],
    )
    config.update(over)
    return config


# E2B-like: per-layer inputs, the last 2 layers reuse earlier layers' K/V, double-wide MLPs.
GEMMA4_E2B_LIKE = dict(
    hidden_size_per_layer_input=8,
    num_kv_shared_layers=2,
    use_double_wide_mlp=True,
    attention_k_eq_v=False,
    tie_word_embeddings=False,
)

# The Gemma-4 target kinds the lossless tests run on: name -> config.
GEMMA4_TARGETS: dict[str, Callable[[], dict]] = {
    "text_12b_like": lambda: gemma4_text_config(),
    "text_e2b_like": lambda: gemma4_text_config(**GEMMA4_E2B_LIKE),
    "wrapper_kv_shared": lambda: dict(
        model_type="gemma4",
        vocab_size=512,
        eos_token_id=[1],
        text_config=gemma4_text_config(num_kv_shared_layers=2),
    ),
}


def build_model(config: dict, seed: int = 0) -> nn.Module:
    """A random mlx-lm model of `config`."""
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def write_target(path: Path, config: dict, seed: int = 0) -> Path:
    """A random mlx-lm model of `config`, saved with the fixture tokenizer."""
    return save_target(path, build_model(config, seed), config)


def save_target(path: Path, model: nn.Module, config: dict) -> Path:
    """`model` of `config` saved with the fixture tokenizer: a folder `load_pair` reads."""
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SOURCE / name, path / name)
    return path


# ----------------------------------------------------------------------------- drafters
def _is_gemma4(target: dict) -> bool:
    return str(target.get("model_type", "")).startswith("gemma4")


def _mask_id(target: dict) -> int:
    return GEMMA4_MASK_ID if _is_gemma4(target) else MASK_ID


def dspark_config(target: dict, markov_rank: int = 16, confidence: bool = True, **over) -> dict:
    """A DeepSpec-style DSpark drafter config (build_draft_config): the target's (text) config
    plus the DSpark keys; Gemma-4 targets get the Gemma4DSparkModel and its mask token."""
    gemma = _is_gemma4(target)
    config = dict(target)
    config.update(
        architectures=["Gemma4DSparkModel" if gemma else "Qwen3DSparkModel"],
        num_hidden_layers=2,
        num_target_layers=target["num_hidden_layers"],
        block_size=7,
        mask_token_id=_mask_id(target),
        target_layer_ids=[0, 2, 4],
        markov_rank=markov_rank,
        enable_confidence_head=confidence,
        tie_word_embeddings=False,
    )
    if markov_rank:
        config.update(markov_head_type="vanilla", confidence_head_with_markov=confidence)
    if gemma:
        config.update(
            layer_types=["full_attention"] * 2,
            hidden_size_per_layer_input=0,  # the reference drafter asserts these off
            num_kv_shared_layers=0,
        )
    config.update(over)
    return config


def dflash_config(
    target: dict,
    *,
    layers: int = 3,
    block_size: int = 8,
    mask_id: int | None = None,
    taps: tuple[int, ...] = (0, 2, 4),
    softcap: float | None = None,
    **over,
) -> dict:
    """A z-lab style DFlash drafter config: Qwen3-style layers of the target's sizes, the DFlash
    keys (block, mask token, taps, soft-cap) in `dflash_config`; `over` replaces top-level keys
    (sizes, `layer_types`, `sliding_window`, ...)."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    keys += ("head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings")
    dflash = dict(
        block_size=block_size,
        mask_token_id=mask_id if mask_id is not None else _mask_id(target),
        target_layer_ids=list(taps),
    )
    if softcap is not None:
        dflash["final_logit_softcapping"] = softcap
    config = dict(
        architectures=["DFlashDraftModel"],
        model_type="qwen3",
        num_hidden_layers=layers,
        rope_theta=target.get("rope_theta", 1e6),
        **{key: target[key] for key in keys},
        dflash_config=dflash,
    )
    config.update(over)
    return config


def eagle3_config(
    target: dict, *, taps: tuple[int, ...] = (0, 2, 4), ttt_length: int = 7, **over
) -> dict:
    """DeepSpec's build_draft_config for EAGLE3: the target's (text) config, one layer, its own
    head; Gemma-4 targets get the Gemma4Eagle3Model."""
    gemma = _is_gemma4(target)
    config = dict(target)
    config.update(
        architectures=["Gemma4Eagle3Model" if gemma else "Qwen3Eagle3Model"],
        num_hidden_layers=1,
        target_layer_ids=list(taps),
        ttt_length=ttt_length,
        tie_word_embeddings=False,
    )
    if gemma:
        config.update(
            layer_types=["full_attention"], hidden_size_per_layer_input=0, num_kv_shared_layers=0
        )
    config.update(over)
    return config


def build_drafter(
    config: dict,
    seed: int,
    *,
    copies: dict[str, mx.array] | None = None,
    vectors_off_one: bool = False,
) -> nn.Module:
    """A random drafter of `config` (the family from its architecture). `copies`: tensors to hold
    as they are (EAGLE3's frozen copies of the target's embedding and head). `vectors_off_one`:
    vector weights (norms, layer_scalar) moved off 1, so a missing norm or scalar shows."""
    from mlx_specdec.drafters import dflash, dspark, eagle3

    architecture = config["architectures"][0]
    family = next(
        module
        for word, module in (("DSpark", dspark), ("DFlash", dflash), ("Eagle3", eagle3))
        if word in architecture
    )
    mx.random.seed(seed)
    model = family.build(config, "test drafter")

    def perturb(name: str, p: mx.array) -> mx.array:
        if copies and name in copies:
            return copies[name]
        return 1 + 0.3 * mx.random.normal(p.shape) if vectors_off_one and p.ndim == 1 else p

    if copies or vectors_off_one:
        model.update(tree_map_with_path(perturb, model.parameters()))
    mx.eval(model.parameters())
    return model


def write_drafter(path: Path, config: dict, seed: int = 1, **kw) -> Path:
    """A random drafter checkpoint (`build_drafter`), flat names in one safetensors file."""
    model = build_drafter(config, seed, **kw)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def broken_drafter(
    fixture: Path,
    tmp_path: Path,
    config_change: Callable[[dict], None] | None = None,
    drop_tensor: str | None = None,
) -> str:
    """A copy of a fixture's drafter with its config edited or one tensor removed."""
    path = tmp_path / "drafter"
    shutil.copytree(fixture / "drafter", path)
    if config_change:
        config = json.loads((path / "config.json").read_text())
        config_change(config)
        (path / "config.json").write_text(json.dumps(config))
    if drop_tensor:
        weights = mx.load(str(path / "model.safetensors"))
        del weights[drop_tensor]
        mx.save_safetensors(str(path / "model.safetensors"), weights)
    return str(path)


# ----------------------------------------------------------------------------- decoding
def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Plain mlx-lm greedy decoding, stopping after an eos token (included)."""
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_new_tokens):
        out.append(int(token))
        if out[-1] in eos:
            break
    return out


def run(target, drafter, prompt, max_new, eos=(), **kw) -> tuple[list[int], list[Round]]:
    """The verify loop's tokens and rounds."""
    tokens, rounds = [], []
    for step in speculate(target, drafter, prompt, max_new_tokens=max_new, eos_ids=set(eos), **kw):
        tokens += step.tokens
        if step.round is not None:
            rounds.append(step.round)
    return tokens, rounds


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


# ----------------------------------------------------------------------------- fixtures
def load_reference(fixture: Path) -> tuple[dict, dict[str, mx.array]]:
    """A conformance fixture's reference.json and its tensors."""
    return json.loads((fixture / "reference.json").read_text()), mx.load(
        str(fixture / "reference.safetensors")
    )


def check_trace(
    rounds: list[Round],
    reference: list[dict],
    at_least: int,
    *,
    whole_proposals: bool = False,
    none_because: str = "",
) -> int:
    """Our rounds against the reference's: as many rounds (the reference's last one may commit
    nothing: it drafts once more after the budget is spent, then clamps), and in every leading
    round it marks trace_robust the same drafts up to the first rejection (`whole_proposals`:
    all of them), the same acceptance and the same committed tokens. In the last round we may
    draft fewer (our loop never drafts past the budget), so our drafts are compared as a prefix.

    Asserts that at least `at_least` rounds were compared. A case whose reference has no
    trace-robust round states it: `at_least=0` and `none_because` (the check then asserts that
    none was comparable, so the statement stays true). Returns how many rounds were compared."""
    if (at_least < 1) != bool(none_because):
        raise ValueError("give none_because exactly when a case compares no round (at_least 0)")
    played = list(reference)
    if played and not played[-1]["committed_tokens"]:
        played.pop()
    assert len(rounds) == len(played), (len(rounds), len(played))
    compared = 0
    for ours, ref in zip(rounds, played):
        if not ref["trace_robust"]:
            break
        a, n = ref["accepted_draft_tokens"], len(ours.proposed)
        upto = n if whole_proposals else min(a + 1, n)
        assert ours.proposed[:upto] == ref["proposed_tokens"][:upto], ref["round"]
        assert ours.accepted == min(a, n), ref["round"]
        assert ours.committed == ref["committed_tokens"], ref["round"]
        compared += 1
    assert compared >= at_least, f"compared {compared} rounds, expected at least {at_least}"
    if none_because:
        assert compared == 0, f"{compared} rounds are comparable now: state at_least instead"
    return compared


def check_fixture_case(
    target,
    drafter,
    reference: dict,
    case: dict,
    at_least: int,
    *,
    whole_proposals: bool = False,
    none_because: str = "",
) -> int:
    """One case of a conformance fixture through the verify loop, with the reference's budget and
    stop tokens: our tokens are the reference's speculative output and plain greedy decoding's;
    a case whose greedy output stops on a stop token ends there (the stop last and nowhere else,
    before the budget, committed by our last round with nothing after it), any other case runs
    to the budget; the rounds add up to the tokens; and `check_trace`. Returns how many rounds
    the trace check compared."""
    name, spec, budget = case["name"], case["spec_greedy"], reference["max_new_tokens"]
    stop = set(reference["stop_token_ids"])
    tokens, rounds = run(target, drafter, case["prompt_ids"], budget, stop)
    assert tokens == spec["output_tokens"] == case["greedy"]["tokens"], name
    assert tokens[1:] == [t for r in rounds for t in r.committed], name
    if case["greedy"]["stops_on_eos"]:
        assert tokens[-1] in stop and not stop & set(tokens[:-1]), name
        assert len(tokens) < budget and rounds[-1].committed[-1] == tokens[-1], name
    else:
        assert len(tokens) == budget and not stop & set(tokens), name
    return check_trace(
        rounds,
        spec["rounds"],
        at_least,
        whole_proposals=whole_proposals,
        none_because=none_because,
    )


def check_distributions(
    logits: mx.array, reference: dict[str, mx.array], params: SamplingParams, tolerance: float
) -> None:
    """Temperature-1 round 0: our draft logits are within `tolerance` of the reference's, `probs`
    turns the reference's logits into its q exactly, and our q rows are distributions close to
    the reference's (bf16 logit noise of ~0.5 moves flat rows by up to ~0.11 in total variation)."""
    assert max_diff(logits, reference["logits"]) < tolerance
    assert max_diff(probs(reference["logits"], params), reference["q"]) < 1e-4
    q = probs(logits, params)
    assert mx.allclose(q.sum(axis=-1), mx.ones(q.shape[0]), atol=1e-5)
    assert 0.5 * mx.abs(q - reference["q"]).sum(axis=-1).max().item() < 0.15
