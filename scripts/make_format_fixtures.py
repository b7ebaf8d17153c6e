"""Build tests/fixtures/formats/: drafters in other checkpoint formats, written by the reference
code, with what the reference computes from them.

Run in a separate virtual environment with the reference packages (never the project's):

    python -m venv /work/refvenv && /work/refvenv/bin/pip install torch==2.13.0 \
        speculators==0.9.0 dflash==0.1.0 gguf transformers
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
    from transformers import Qwen3Config

    src, out = CONFORMANCE / "dspark_qwen3", OUT / "speculators_dspark_qwen3"
    native = json.loads((src / "drafter" / "config.json").read_text())
    weights = load_file(src / "drafter" / "model.safetensors")
    layer = Qwen3Config(
        **{
            k: native[k]
            for k in (
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
        }
    )
    layer._attn_implementation = "eager"  # the reference's dense-mask path (no flex on a CPU)
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
        n = len(ids)
        padded = ids + [0] * (block + 1)  # the reference never anchors in the last block
        _, feats = target_pass(target, padded, taps)
        loss_mask = torch.zeros(1, len(padded), dtype=torch.long)
        loss_mask[0, n - 1] = 1
        hidden, logits, *_ = model._backbone_forward(
            feats,
            torch.tensor([padded]),
            loss_mask,
            torch.zeros(1, len(padded), layer.hidden_size, dtype=torch.bfloat16),
            torch.zeros(1, len(padded), dtype=torch.long),
            max_anchors=1,
        )
        logits = logits[0]
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

    record = {
        "format": "mlx-specdec-formats/1",
        "fixture": out.name,
        "max_new_tokens": MAX_NEW,
        "stop_token_ids": STOP,
        "block_size": block,
        "cases": [],
    }
    tensors = {}
    for case in cases("dspark_qwen3"):
        ids = list(case["prompt_ids"])
        logits, _ = target_pass(target, ids, taps)
        ids.append(int(logits[-1].argmax()))
        rounds = []
        while len(ids) - len(case["prompt_ids"]) < MAX_NEW and ids[-1] not in STOP:
            proposed, rows = draft(ids)
            verify, _ = target_pass(target, ids + proposed, taps)
            argmax = verify[len(ids) - 1 :].argmax(-1).tolist()
            accepted = 0
            while accepted < len(proposed) and proposed[accepted] == argmax[accepted]:
                accepted += 1
            committed = proposed[:accepted] + [argmax[accepted]]
            left = MAX_NEW - (len(ids) - len(case["prompt_ids"]))
            committed = committed[:left]
            stops = [i for i, t in enumerate(committed) if t in STOP]
            committed = committed[: stops[0] + 1] if stops else committed
            if not rounds:
                tensors[f"{case['name']}.round0.draft_logits"] = rows.float()
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
        record["cases"].append(
            {**case, "output_tokens": ids[len(case["prompt_ids"]) :], "rounds": rounds}
        )
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


FIXTURES = {
    "speculators_dspark_qwen3": speculators_dspark,
    "zlab_dflash2_qwen3": zlab_dflash2,
    "gguf_dspark_qwen3": gguf_dspark,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(FIXTURES):
        print("building", name, flush=True)
        FIXTURES[name]()
