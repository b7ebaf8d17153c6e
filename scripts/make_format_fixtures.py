"""Build tests/fixtures/formats/: drafters in other checkpoint formats, written by the reference
code, with what the reference computes from them.

Run in a separate virtual environment with the reference packages (never the project's):

    python -m venv /work/refvenv && /work/refvenv/bin/pip install torch==2.11.0 \
        speculators==0.9.0 dflash==0.1.0 specforge==0.2.0 gguf transformers==5.8.1
    /work/refvenv/bin/python scripts/make_format_fixtures.py [NAME ...]

Targets are the conformance fixtures' tiny Qwen3 models (tests/fixtures/conformance/*/target,
referenced, not copied). Weights come from the trained conformance drafters, re-packed by each
format's own writer, so acceptance is meaningful; any weights would do, since every expected
output is the reference's.

- `speculators_dspark_qwen3`: dspark_qwen3's DSpark weights as a speculators DSparkDraftModel
  (`save_pretrained`), block 15 (the DeepSpec Qwen3.6 drafter's block; the weights do not depend
  on the block size). Expected: the reference forward's round-0 block logits
  (`DSparkDraftModel._backbone_forward`, one anchor) and a greedy speculative trace from a plain
  torch loop over that forward (no cache: every round recomputes the target and the drafter
  from scratch, so the loop adds no state of its own).
- `zlab_dflash2_qwen3`: zlab_dflash_qwen3's DFlash weights in a z-lab `DFlash2DraftModel`, its
  convolutions and candidate selector set to small seeded values; expected: the wheel's own
  `dflash_generate` trace and the `propose` of round 0.
- `gguf_dspark_qwen3`: dspark_qwen3's drafter written by `gguf.GGUFWriter` (BF16 tensors,
  PrismML names and `dspark.*` metadata); expected: the conformance fixture's own DeepSpec
  trace (same weights, so the same outputs).
- `speculators_eagle3_qwen3`: eagle3_qwen3's EAGLE3 weights as a speculators Eagle3DraftModel
  (`save_pretrained`), qwen3 layer, a 64-token draft vocabulary (d2t / t2d, the most frequent
  tokens). Expected: a greedy trace from a torch loop over speculators' `forward` (its TTT
  steps; the chain is its teacher forcing fed our own drafts) and round 0's chain logits.
- `specforge_eagle3_qwen3`: a SpecForge `LlamaForCausalLMEagle3` (no q/k norms, three taps:
  SpecForge's default [1, N/2 - 1, N - 4]) started from eagle3_qwen3's weights and re-trained
  briefly in that module, exported as SpecForge's `export_to_sglang` does. Expected: a greedy
  trace from a torch loop over its `backbone` + `compute_logits` TTT chain, round-0 logits.
- `speculators_dflash_qwen3`: zlab_dflash_qwen3's z-lab DFlash weights as a speculators
  DFlashDraftModel (speculators' default `sample_from_anchor` false: 15 drafts from a block of
  16). Expected: as speculators_dspark, over `DFlashDraftModel._backbone_forward`.

Every trace here runs the same plain loop (`speculative_trace`): the target from scratch each
round, full chains, greedy acceptance (an accepted stop token ends the round), committed tokens
cut at a stop token and at the budget.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "tests" / "fixtures" / "conformance"
OUT = ROOT / "tests" / "fixtures" / "formats"
MAX_NEW = 48
STOP = [493, 491]


def cases(name: str) -> list[dict]:
    """The conformance fixture's prompts (name, prompt ids)."""
    ref = json.loads((CONFORMANCE / name / "reference.json").read_text())
    return [{"name": c["name"], "prompt_ids": c["prompt_ids"]} for c in ref["cases"]]


def load_target(name: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        CONFORMANCE / name / "target", dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    return model.eval()


@torch.inference_mode()
def target_pass(target, ids: list[int], taps: list[int]):
    """Logits and the concatenated taps (outputs of decoder layers `taps`) of one forward."""
    out = target(torch.tensor([ids]), output_hidden_states=True)
    feats = torch.cat([out.hidden_states[i + 1] for i in taps], dim=-1)
    return out.logits[0], feats


def block_forward(model, target, ids: list[int], taps: list[int], block: int):
    """speculators' `_backbone_forward` (DSpark, DFlash) for one block anchored at ids[-1]:
    (hidden [1, block, H], logits [block, V])."""
    n = len(ids)
    padded = ids + [0] * (block + 1)  # the reference never anchors in the last block
    _, feats = target_pass(target, padded, taps)
    loss_mask = torch.zeros(1, len(padded), dtype=torch.long)
    loss_mask[0, n - 1] = 1
    hidden_size = model.config.transformer_layer_config.hidden_size
    hidden, logits, *_ = model._backbone_forward(
        feats,
        torch.tensor([padded]),
        loss_mask,
        torch.zeros(1, len(padded), hidden_size, dtype=torch.bfloat16),
        torch.zeros(1, len(padded), dtype=torch.long),
        max_anchors=1,
    )
    return hidden, logits[0]


def margins(logits: torch.Tensor) -> list[float]:
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).tolist()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# ----------------------------------------------------------------------------- speculators
def speculators_dspark(block: int = 15) -> None:
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    src, out = CONFORMANCE / "dspark_qwen3", OUT / "speculators_dspark_qwen3"
    native = json.loads((src / "drafter" / "config.json").read_text())
    weights = load_file(src / "drafter" / "model.safetensors")
    layer = qwen3_layer(native)
    config = DSparkSpeculatorConfig(
        transformer_layer_config=layer,
        draft_vocab_size=native["vocab_size"],
        block_size=block,
        aux_hidden_state_layer_ids=[i + 1 for i in native["target_layer_ids"]],
        mask_token_id=native["mask_token_id"],
        sample_from_anchor=True,
        markov_rank=native["markov_rank"],
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        speculators_config=SpeculatorsConfig(
            algorithm="dspark",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=block)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=None, architectures=["Qwen3ForCausalLM"]),
        ),
    )
    model = DSparkDraftModel(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"verifier_lm_head.weight", "verifier_norm.weight"}, missing
    model = model.to(torch.bfloat16).eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "drafter")
    (out / "drafter" / "config.py").unlink()  # speculators' remote-code copy of its config class
    # The verifier's own weights travel with the verifier: keep only what speculators saves.
    saved = load_file(out / "drafter" / "model.safetensors")
    assert "embed_tokens.weight" not in saved and "lm_head.weight" not in saved, sorted(saved)

    target = load_target("dspark_qwen3")
    head = target.lm_head.weight  # the verifier head speculators borrows (tied: the embedding)
    model.lm_head.weight.data.copy_(head)
    taps = native["target_layer_ids"]

    @torch.inference_mode()
    def draft(ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """One reference block forward at the anchor ids[-1]; greedy Markov chain on top."""
        hidden, logits = block_forward(model, target, ids, taps, block)
        prev, tokens, rows = ids[-1], [], []
        for k in range(block):
            row = (
                logits[k]
                + model.markov_head.block_bias(
                    prev_token_ids=torch.tensor([[prev]]), hidden_states=hidden[:, k : k + 1]
                )[0, 0]
            )
            rows.append(row)
            prev = int(row.argmax())
            tokens.append(prev)
        return tokens, torch.stack(rows)

    record = record_header(out, block_size=block)
    tensors = {}
    record["cases"] = speculative_trace(target, taps, "dspark_qwen3", draft, block, tensors)
    write_json(out / "reference.json", record)
    save_file(tensors, out / "reference.safetensors")


# ----------------------------------------------------------------------------- z-lab DFlash 2
def zlab_dflash2(kernel: int = 2, group: int = 16, rank: int = 8, top_k: int = 4) -> None:
    import dflash.model as zlab
    from transformers import AutoConfig, DynamicCache

    src, out = CONFORMANCE / "zlab_dflash_qwen3", OUT / "zlab_dflash2_qwen3"
    config = AutoConfig.from_pretrained(src / "drafter")
    config.architectures = ["DFlash2DraftModel"]
    config.dflash_config = dict(
        config.dflash_config,
        conv_kernel_size=kernel,
        conv_group_size=group,
        selector_rank=rank,
        selector_top_k=top_k,
    )
    config._attn_implementation = "sdpa"
    model = zlab.DFlash2DraftModel(config)
    missing, unexpected = model.load_state_dict(
        load_file(src / "drafter" / "model.safetensors"), strict=False
    )
    assert not unexpected, unexpected
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            for conv in (layer.attention_conv, layer.mlp_conv):
                base = torch.zeros_like(conv.base_kernel)
                base[:, 0] = 1.0  # identity, then a small seeded perturbation on every tap
                conv.base_kernel.copy_(base + 0.02 * torch.randn(base.shape, generator=gen))
                w = conv.kernel_projection.weight
                w.copy_(0.01 * torch.randn(w.shape, generator=gen))
        sel = model.candidate_selector
        for p, std in (
            (sel.predecessor_codebook.weight, 0.3),
            (sel.successor_codebook.weight, 0.3),
            (sel.hidden_projection.weight, 0.05),
        ):
            p.copy_(std * torch.randn(p.shape, generator=gen))
    model = model.to(torch.bfloat16).eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "drafter")
    # z-lab's files store the codebooks as raw arrays (`from_pretrained` maps them back).
    state = load_file(out / "drafter" / "model.safetensors")
    for name in ("predecessor_codebook", "successor_codebook"):
        state[f"candidate_selector.{name}"] = state.pop(f"candidate_selector.{name}.weight")
    save_file(state, out / "drafter" / "model.safetensors", metadata={"format": "pt"})

    # Run-time patches outside the math (as the conformance builder's): no CUDA timer, and the
    # wheel's cache crop written for transformers 5.15 on this transformers.
    zlab._cuda_time = __import__("time").perf_counter
    zlab._make_cache = lambda config: DynamicCache(config=config)

    def crop_to(cache, length):
        if cache.get_seq_length() > length:
            cache.crop(length)

    zlab._crop_to = crop_to
    target = load_target("zlab_dflash_qwen3")
    record = {
        "format": "mlx-specdec-formats/1",
        "fixture": out.name,
        "max_new_tokens": MAX_NEW,
        "stop_token_ids": STOP,
        "cases": [],
    }
    tensors = {}
    for case in cases("zlab_dflash_qwen3"):
        ids = torch.tensor([case["prompt_ids"]])
        stats = zlab.dflash_generate(model, target, ids, MAX_NEW, STOP, return_stats=True)
        greedy = target.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=STOP)[
            0, ids.shape[1] :
        ].tolist()
        tokens = stats.output_ids[0, ids.shape[1] :].tolist()
        assert tokens == greedy, (case["name"], tokens, greedy)
        record["cases"].append(
            {**case, "output_tokens": tokens, "acceptance_lengths": stats.acceptance_lengths}
        )
        # Round 0 alone: the block forward and the selector's greedy walk.
        out_t = target(ids, output_hidden_states=True)
        anchor = int(out_t.logits[0, -1].argmax())
        feats = zlab.extract_context_feature(out_t.hidden_states, model.target_layer_ids)
        block = torch.tensor([[anchor] + [model.mask_token_id] * (model.block_size - 1)])
        n = ids.shape[1]
        with torch.inference_mode():
            noise = zlab._raw_input_embeddings(target, block)
            hidden = model(
                target_hidden=feats,
                noise_embedding=noise,
                position_ids=torch.arange(n + model.block_size)[None],
            )[:, 1:]
            path, _, _ = model.propose(hidden, block[:, 0], zlab._output_head(target), 0.0)
            logits = model.compute_logits(hidden, zlab._output_head(target))
        record["cases"][-1]["round0"] = {"anchor": anchor, "proposed_tokens": path[0].tolist()}
        tensors[f"{case['name']}.round0.ctx_features"] = feats[0].contiguous()
        tensors[f"{case['name']}.round0.draft_logits"] = logits[0].float().contiguous()
    write_json(out / "reference.json", record)
    save_file(tensors, out / "reference.safetensors")


# ----------------------------------------------------------------------------- GGUF
def gguf_dspark() -> None:
    import gguf

    src, out = CONFORMANCE / "dspark_qwen3", OUT / "gguf_dspark_qwen3"
    config = json.loads((src / "drafter" / "config.json").read_text())
    weights = load_file(src / "drafter" / "model.safetensors")
    heads = {
        "embed_tokens": "token_embd",
        "lm_head": "output",
        "norm": "output_norm",
        "fc": "dspark.fc",
        "hidden_norm": "dspark.hidden_norm",
        "markov_head.markov_w1": "dspark.markov_head_a",
        "markov_head.markov_w2": "dspark.markov_head_b",
        "confidence_head.proj": "dspark.confidence_head",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }

    def gguf_name(name: str) -> str:
        stem, _, suffix = name.rpartition(".")
        if stem in heads:
            return f"{heads[stem]}.{suffix}"
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{layer[rest]}.{suffix}"

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(out / "drafter.gguf"), "dspark")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_uint32("dspark.dspark.block_size", config["block_size"])
    writer.add_uint32("dspark.dspark.mask_token_id", config["mask_token_id"])
    writer.add_array("dspark.dspark.target_layers", config["target_layer_ids"])
    writer.add_uint32("dspark.dspark.num_target_layers", config["num_target_layers"])
    writer.add_bool("dspark.dspark.confidence_head", True)
    writer.add_bool("dspark.dspark.log_snr_conditioning", False)
    for name, tensor in weights.items():
        raw = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)  # bf16 bit patterns
        writer.add_tensor(
            gguf_name(name), raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- shared loop
def speculative_trace(target, taps: list[int], name: str, draft, block: int, tensors: dict):
    """The greedy speculative loop over `draft(ids) -> (target ids, logit rows)` for the
    conformance fixture `name`'s prompts: the target is run from scratch on every round (no
    cache), the drafter is whatever `draft` recomputes. Round 0's draft rows go to `tensors`."""
    out = []
    for case in cases(name):
        ids = list(case["prompt_ids"])
        logits, _ = target_pass(target, ids, taps)
        ids.append(int(logits[-1].argmax()))
        rounds = []
        while len(ids) - len(case["prompt_ids"]) < MAX_NEW and ids[-1] not in STOP:
            proposed, rows = draft(ids)
            assert len(proposed) == block
            verify, _ = target_pass(target, ids + proposed, taps)
            argmax = verify[len(ids) - 1 :].argmax(-1).tolist()
            accepted = 0  # an accepted stop token ends the output: nothing after it counts
            while (
                accepted < len(proposed)
                and proposed[accepted] == argmax[accepted]
                and (accepted == 0 or proposed[accepted - 1] not in STOP)
            ):
                accepted += 1
            committed = proposed[:accepted] + [argmax[accepted]]
            left = MAX_NEW - (len(ids) - len(case["prompt_ids"]))
            committed = committed[:left]
            stops = [i for i, t in enumerate(committed) if t in STOP]
            committed = committed[: stops[0] + 1] if stops else committed
            if not rounds:
                tensors[f"{case['name']}.round0.draft_logits"] = rows.float().contiguous()
            rounds.append(
                {
                    "anchor": ids[-1],
                    "proposed_tokens": proposed,
                    "accepted": accepted,
                    "committed_tokens": committed,
                    "draft_margin": margins(rows),
                }
            )
            ids += committed
        out.append({**case, "output_tokens": ids[len(case["prompt_ids"]) :], "rounds": rounds})
    return out


def frequent_tokens(name: str, size: int) -> list[int]:
    """A draft vocabulary as speculators and SpecForge build one: the `size` most frequent
    tokens (ties: lower id) of the fixture's prompts and greedy outputs, in target-id order."""
    from collections import Counter

    ref = json.loads((CONFORMANCE / name / "reference.json").read_text())
    counts = Counter()
    for case in ref["cases"]:
        counts.update(case["prompt_ids"] + case["greedy"]["tokens"])
    ranked = sorted(range(512), key=lambda t: (-counts[t], t))
    return sorted(ranked[:size])


def vocab_maps(ids: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d2t (offsets: target id = draft id + d2t[draft id]) and t2d (a mask over the target)."""
    d2t = torch.tensor(ids) - torch.arange(len(ids))
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def record_header(out: Path, **extra) -> dict:
    return {
        "format": "mlx-specdec-formats/1",
        "fixture": out.name,
        "max_new_tokens": MAX_NEW,
        "stop_token_ids": STOP,
        **extra,
        "cases": [],
    }


def qwen3_layer(native: dict, **over):
    from transformers import Qwen3Config

    keys = (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "rope_parameters",
    )
    layer = Qwen3Config(**{k: native[k] for k in keys if k not in over}, **over)
    layer._attn_implementation = "eager"  # the reference's dense-mask path (no flex on a CPU)
    return layer


# ----------------------------------------------------------------------------- speculators EAGLE3
def speculators_eagle3(draft_vocab: int = 64) -> None:
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    src, out = CONFORMANCE / "eagle3_qwen3", OUT / "speculators_eagle3_qwen3"
    native = json.loads((src / "drafter" / "config.json").read_text())
    weights = load_file(src / "drafter" / "model.safetensors")
    ttt, taps = native["ttt_length"], native["target_layer_ids"]
    ids = frequent_tokens("eagle3_qwen3", draft_vocab)
    d2t, t2d = vocab_maps(ids, native["vocab_size"])
    layer = qwen3_layer(native)
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=layer,
        draft_vocab_size=draft_vocab,
        norm_before_residual=False,
        eagle_aux_hidden_state_layer_ids=[i + 1 for i in taps],
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=ttt)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=None, architectures=["Qwen3ForCausalLM"]),
        ),
    )
    model = Eagle3DraftModel(config)
    model.load_vocab_mappings(t2d, d2t)
    state = dict(weights, **{"lm_head.weight": weights["lm_head.weight"][ids]})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"verifier_lm_head.weight", "verifier_norm.weight", "d2t", "t2d"}
    model = model.to(torch.bfloat16).eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "drafter")
    (out / "drafter" / "config.py").unlink(missing_ok=True)  # speculators' remote-code copy
    saved = load_file(out / "drafter" / "model.safetensors")
    assert saved["lm_head.weight"].shape[0] == draft_vocab and "d2t" in saved, sorted(saved)

    target = load_target("eagle3_qwen3")
    to_target = torch.tensor(ids)
    captured = []
    model.lm_head.register_forward_hook(lambda m, i, o: captured.append(o))

    @torch.inference_mode()
    def draft(seq: list[int]) -> tuple[list[int], torch.Tensor]:
        """The chain of `ttt` drafts after seq[-1], each from a fresh reference forward.

        Rows j = 0..n-1 pair the taps of position j with token seq[j + 1]; speculators' TTT step
        t feeds row j the token of row j + t (its teacher forcing), so appending the drafts so
        far as further rows (zero taps, never seen by row n - 1: causal) gives row n - 1 its
        own drafts: step t's row n - 1 is the t-th chain step after the anchor."""
        n = len(seq) - 1
        _, feats = target_pass(target, seq, taps)
        tokens, rows = [], []
        for t in range(ttt):
            hidden = torch.cat([feats[:, :n], feats.new_zeros(1, t, feats.shape[-1])], dim=1)
            inputs = torch.tensor([seq[1:] + tokens])
            captured.clear()
            model(hidden, inputs, torch.zeros_like(inputs), ttt_steps=t + 1)
            row = captured[t][0, n - 1]
            rows.append(row)
            tokens.append(int(to_target[row.argmax()]))
        return tokens, torch.stack(rows)

    record = record_header(out, ttt_length=ttt, draft_vocab=ids)
    tensors = {}
    record["cases"] = speculative_trace(target, taps, "eagle3_qwen3", draft, ttt, tensors)
    for case in record["cases"]:  # the round-0 context the drafter reads (prompt rows)
        ids0 = case["prompt_ids"]
        _, feats = target_pass(target, ids0, taps)
        tensors[f"{case['name']}.round0.ctx_features"] = feats[0].contiguous()
    write_json(out / "reference.json", record)
    save_file(tensors, out / "reference.safetensors")


# ----------------------------------------------------------------------------- SpecForge EAGLE3
def specforge_eagle3(draft_vocab: int = 64, ttt: int = 7, steps: int = 300) -> None:
    import torch._dynamo

    torch._dynamo.config.disable = True  # SpecForge's RMSNorm is torch.compile'd; eager on a CPU
    from specforge.export.checkpoint_io import apply_legacy_rope_scaling
    from specforge.export.to_sglang import WEIGHT_MAPS, _serving_state
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from transformers import LlamaConfig

    src, out = CONFORMANCE / "eagle3_qwen3", OUT / "specforge_eagle3_qwen3"
    native = json.loads((src / "drafter" / "config.json").read_text())
    weights = load_file(src / "drafter" / "model.safetensors")
    layers = json.loads((src / "target" / "config.json").read_text())["num_hidden_layers"]
    taps = [1, layers // 2 - 1, layers - 4]  # SpecForge's default capture (no eagle_config)
    ids = frequent_tokens("eagle3_qwen3", draft_vocab)
    d2t, t2d = vocab_maps(ids, native["vocab_size"])
    config = LlamaConfig(
        architectures=["LlamaForCausalLMEagle3"],
        hidden_size=native["hidden_size"],
        intermediate_size=native["intermediate_size"],
        num_attention_heads=native["num_attention_heads"],
        num_key_value_heads=native["num_key_value_heads"],
        head_dim=native["head_dim"],
        num_hidden_layers=1,
        vocab_size=native["vocab_size"],
        draft_vocab_size=draft_vocab,
        max_position_embeddings=native["max_position_embeddings"],
        rms_norm_eps=native["rms_norm_eps"],
        rope_parameters=native["rope_parameters"],
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=native["bos_token_id"],
        eos_token_id=native["eos_token_id"],
    )
    model = LlamaForCausalLMEagle3(config)
    # The conformance drafter's weights as a start (SpecForge's layer has no q/k norms and reads
    # three taps: those taps' fc columns), then a short re-training of this layout in the
    # reference module on the fixture's own greedy sequences, so acceptance means something.
    col = {t: i for i, t in enumerate(native["target_layer_ids"])}
    h = native["hidden_size"]
    state = {
        k.replace("layers.0.", "midlayer."): v
        for k, v in weights.items()
        if "q_norm" not in k and "k_norm" not in k and k != "fc.weight"
    }
    state["fc.weight"] = torch.cat(
        [weights["fc.weight"][:, col[t] * h : (col[t] + 1) * h] for t in taps], dim=1
    )
    state["lm_head.weight"] = weights["lm_head.weight"][ids]
    state.update(d2t=d2t, t2d=t2d)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    target = load_target("eagle3_qwen3")
    model.load_embedding(str(src / "target"))  # the reference's own: the target's embedding

    def chain(seq: list[int], feats: torch.Tensor, steps: int, drafts=None):
        """SpecForge's TTT chain (`backbone` + `compute_logits`, cache_hidden): rows j pair the
        taps of position j with token seq[j + 1]; step t feeds row j the token of row j + t
        (teacher forcing, `padding(input_ids, left=False)`) and its own previous output. With
        `drafts`, row n - 1's step-t token is the (t-1)-th greedy draft (appended to seq)."""
        n = feats.shape[1]
        hidden = model.project_hidden_states(feats)
        mask = model.prepare_decoder_attention_mask(
            torch.ones(1, n, dtype=torch.bool), hidden, 1, n, 0
        )
        cache, ext, all_logits = [[], []], list(seq[1:]), []
        for t in range(steps):
            row_ids = (ext + [0] * steps)[t : t + n]
            embeds = model.embed_input_ids(torch.tensor([row_ids])).to(hidden.dtype)
            hidden = model.backbone(embeds, hidden, cache, mask, torch.arange(n)[None])
            logits = model.compute_logits(hidden)
            all_logits.append(logits[0])
            if drafts is not None:
                drafts.append(int(to_target[logits[0, n - 1].argmax()]))
                ext.append(drafts[-1])
        return all_logits

    to_target = torch.tensor(ids)
    to_draft = torch.full((native["vocab_size"],), -100, dtype=torch.long)
    to_draft[to_target] = torch.arange(draft_vocab)
    ref = json.loads((src / "reference.json").read_text())
    data = []
    for case in ref["cases"]:
        seq = case["prompt_ids"] + case["greedy"]["tokens"]
        _, feats = target_pass(target, seq, taps)
        data.append((seq, feats[:, : len(seq) - 1].float()))
    model = model.float().train()
    model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        seq, feats = data[int(torch.randint(len(data), (1,), generator=gen))]
        n, loss = feats.shape[1], 0.0
        for t, logits in enumerate(chain(seq, feats, 3)):
            labels = to_draft[torch.tensor((seq + [0] * 4)[t + 2 : t + 2 + n])]
            labels[n - 1 - t :] = -100  # row j at step t predicts seq[j + 2 + t]
            loss = loss + 0.8**t * torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model = model.to(torch.bfloat16).eval()

    # SpecForge's SGLang export (`export_to_sglang` after `materialize_draft`): the state dict
    # without the embedding, validated by `_serving_state`, `save_pretrained`, legacy RoPE keys.
    if out.exists():
        shutil.rmtree(out)
    full = {k: v for k, v in model.state_dict().items() if "embed" not in k.lower()}
    serving = _serving_state(full, WEIGHT_MAPS["LlamaForCausalLMEagle3"])
    model.save_pretrained(out / "drafter", state_dict=serving)
    apply_legacy_rope_scaling(str(out / "drafter"))
    saved = load_file(out / "drafter" / "model.safetensors")
    assert "embed_tokens.weight" not in saved and "d2t" in saved, sorted(saved)

    @torch.inference_mode()
    def draft(seq: list[int]) -> tuple[list[int], torch.Tensor]:
        _, feats = target_pass(target, seq, taps)
        tokens: list[int] = []
        logits = chain(seq, feats[:, : len(seq) - 1], ttt, tokens)
        return tokens, torch.stack([row[len(seq) - 2] for row in logits])

    record = record_header(out, ttt_length=ttt, taps=taps, draft_vocab=ids)
    tensors = {}
    record["cases"] = speculative_trace(target, taps, "eagle3_qwen3", draft, ttt, tensors)
    for case in record["cases"]:
        _, feats = target_pass(target, case["prompt_ids"], taps)
        tensors[f"{case['name']}.round0.ctx_features"] = feats[0].contiguous()
    write_json(out / "reference.json", record)
    save_file(tensors, out / "reference.safetensors")


# ----------------------------------------------------------------------------- speculators DFlash
def speculators_dflash() -> None:
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.dflash import DFlashDraftModel, DFlashSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    src, out = CONFORMANCE / "zlab_dflash_qwen3", OUT / "speculators_dflash_qwen3"
    native = json.loads((src / "drafter" / "config.json").read_text())
    weights = load_file(src / "drafter" / "model.safetensors")
    block, taps = native["block_size"], native["dflash_config"]["target_layer_ids"]
    rope = {"rope_theta": native["rope_theta"], "rope_type": "default"}
    layer = qwen3_layer(native, rope_parameters=rope)
    # speculators' default dflash: sample_from_anchor false (z-lab's: the anchor is the bonus
    # token, block rows 1.. draft), so block_size - 1 speculative tokens.
    config = DFlashSpeculatorConfig(
        transformer_layer_config=layer,
        draft_vocab_size=native["vocab_size"],
        block_size=block,
        aux_hidden_state_layer_ids=[i + 1 for i in taps],
        mask_token_id=native["dflash_config"]["mask_token_id"],
        speculators_config=SpeculatorsConfig(
            algorithm="dflash",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=block - 1)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=None, architectures=["Qwen3ForCausalLM"]),
        ),
    )
    model = DFlashDraftModel(config)
    assert not config.sample_from_anchor
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert set(missing) == {
        "embed_tokens.weight",
        "lm_head.weight",
        "verifier_lm_head.weight",
        "verifier_norm.weight",
    }, missing
    model = model.to(torch.bfloat16).eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out / "drafter")
    (out / "drafter" / "config.py").unlink(missing_ok=True)  # speculators' remote-code copy
    saved = load_file(out / "drafter" / "model.safetensors")
    assert "embed_tokens.weight" not in saved and "lm_head.weight" not in saved, sorted(saved)

    target = load_target("zlab_dflash_qwen3")
    # What `load_verifier_weights` binds: the verifier's embedding and (tied) head.
    model.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight)
    model.lm_head.weight.data.copy_(target.lm_head.weight)

    @torch.inference_mode()
    def draft(ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """One reference block forward at the anchor ids[-1]; rows 1.. are the drafts."""
        rows = block_forward(model, target, ids, taps, block)[1][1:]
        return rows.argmax(-1).tolist(), rows

    record = record_header(out, block_size=block)
    tensors = {}
    record["cases"] = speculative_trace(
        target, taps, "zlab_dflash_qwen3", draft, block - 1, tensors
    )
    for case in record["cases"]:
        _, feats = target_pass(target, case["prompt_ids"], taps)
        tensors[f"{case['name']}.round0.ctx_features"] = feats[0].contiguous()
    write_json(out / "reference.json", record)
    save_file(tensors, out / "reference.safetensors")


FIXTURES = {
    "speculators_dspark_qwen3": speculators_dspark,
    "zlab_dflash2_qwen3": zlab_dflash2,
    "gguf_dspark_qwen3": gguf_dspark,
    "speculators_eagle3_qwen3": speculators_eagle3,
    "specforge_eagle3_qwen3": specforge_eagle3,
    "speculators_dflash_qwen3": speculators_dflash,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(FIXTURES):
        print("building", name, flush=True)
        FIXTURES[name]()
