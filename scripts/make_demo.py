"""Build the embedded demo pair from text every machine has, offline.

1. Documents in three domains, from the running Python's standard library and a generator:
   code (functions of the stdlib source), prose (their docstrings), math (generated arithmetic),
   each as one ChatML exchange (the user gives a start or a question, the assistant answers).
2. A byte-level BPE tokenizer (`tokenizers`) trained on them, saved in the Hugging Face layout
   with a ChatML chat template.
3. A small Qwen3 target trained from scratch on them (fp32: on a CPU, fp32 with OpenBLAS is where
   speculation pays; bf16/quantized verify costs grow linearly with the tokens verified).
4. Its DSpark and DFlash drafters, made by `train-drafter` on the target's own answers.
5. A tiny plain draft LM with the same tokenizer, for mlx-lm's classic `--draft-model` race.

Stdlib files are split by a hash of their path: 1 in 10 is held out, and `prompts.jsonl` holds
held-out prompts of each domain for measuring acceptance. Runs on Metal, CUDA or (slowly) CPU:

    python scripts/make_demo.py --out mlx_specdec/demo            # full size (GPU: ~5 min)
    python scripts/make_demo.py --out /tmp/demo --scale 0.02      # a quick smoke run
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import shutil
import sysconfig
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 2048
TARGET = dict(hidden_size=192, num_hidden_layers=6, intermediate_size=512,
              num_attention_heads=3, num_key_value_heads=1, head_dim=64)  # fmt: skip
DRAFT_LM = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64)  # fmt: skip
SEQ = 256


def chat(user: str, answer: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


# ------------------------------------------------------------------------------------ corpus
def held_out(path: Path) -> bool:
    return hashlib.sha1(path.name.encode()).digest()[0] % 10 == 0


def stdlib_functions(max_lines: int = 30) -> list[tuple[Path, str, str | None, str]]:
    """(file, function source, docstring, name) of the stdlib's top-level and method defs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for file in sorted(root.rglob("*.py")):
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in file.parts):
            continue
        try:
            text = file.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.end_lineno is None:
                continue
            body = lines[node.lineno - 1 : min(node.end_lineno, node.lineno - 1 + max_lines)]
            indent = len(body[0]) - len(body[0].lstrip())
            source = "\n".join(line[indent:] for line in body)
            found.append((file, source, ast.get_docstring(node), node.name))
    return found


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    kind = rng.randrange(4)
    if kind == 0:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}"
    if kind == 2:
        tens, ones = b // 10 * 10, b % 10
        return (f"Compute {a} * {b}.", f"{a} * {b} = {a} * {tens} + {a} * {ones} = "
                f"{a * tens} + {a * ones} = {a * b}")  # fmt: skip
    return f"Solve x + {b} = {a + b}.", f"x = {a + b} - {b} = {a}"


def documents(scale: float, seed: int = 0) -> tuple[list[str], list[dict], list[dict]]:
    """Training documents, drafter-training prompts and held-out evaluation prompts."""
    rng = random.Random(seed)
    funcs = stdlib_functions()
    rng.shuffle(funcs)
    funcs = funcs[: max(200, int(len(funcs) * scale))]
    docs, train_prompts, eval_prompts = [], [], []
    for file, source, doc, name in funcs:
        head = source.splitlines()[0]
        prose_q = f"What does the function `{name}` do?"
        if held_out(file):
            eval_prompts.append({"domain": "code", "prompt": head})
            if doc and len(doc) > 40:
                eval_prompts.append({"domain": "prose", "prompt": prose_q})
            continue
        docs.append(chat(head, source))
        train_prompts.append({"prompt": head})
        if doc and len(doc) > 40:
            docs.append(chat(prose_q, doc))
            train_prompts.append({"prompt": prose_q})
    n_math = max(200, int(60000 * scale))
    for _ in range(n_math):
        q, a = arithmetic(rng)
        docs.append(chat(q, a))
        if len(train_prompts) < 3 * n_math:
            train_prompts.append({"prompt": q})
    held = random.Random(seed + 1)
    per_domain: dict[str, list[dict]] = {}
    for p in eval_prompts:
        per_domain.setdefault(p["domain"], []).append(p)
    eval_prompts = [p for d in per_domain.values() for p in d[:40]]
    eval_prompts += [{"domain": "math", "prompt": arithmetic(held)[0]} for _ in range(40)]
    rng.shuffle(docs)
    rng.shuffle(train_prompts)
    return docs, train_prompts, eval_prompts


# ------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(docs: list[str], out: Path) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(docs, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        mask_token="<|mask|>", additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    return hf


def qwen3_config(dims: dict, eos: int) -> dict:
    return dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=VOCAB,
        rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False, eos_token_id=eos, torch_dtype="float32",
        **dims,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ LM training
def pack(docs: list[str], tokenizer: object) -> np.ndarray:
    """All documents, tokenized and concatenated, cut into rows of SEQ + 1 tokens."""
    ids = [t for enc in tokenizer(docs)["input_ids"] for t in enc]
    n = len(ids) // (SEQ + 1)
    return np.array(ids[: n * (SEQ + 1)], np.int32).reshape(n, SEQ + 1)


def train_lm(config: dict, rows: np.ndarray, steps: int, batch: int, lr: float,
             seed: int) -> nn.Module:  # fmt: skip
    from mlx_lm.models import qwen3

    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    warm = max(1, steps // 25)
    sched = optim.join_schedules(
        [optim.linear_schedule(lr / warm, lr, warm), optim.cosine_decay(lr, steps - warm, lr / 20)],
        [warm],
    )  # fmt: skip
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)

    def loss_fn(model: nn.Module, x: mx.array) -> mx.array:
        logits = model(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array) -> mx.array:
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(mx.array(rows[rng.integers(0, len(rows), batch)]))
        mx.eval(state)
        if i % max(1, steps // 10) == 0 or i == steps - 1:
            rate = (i + 1) * batch * SEQ / (time.perf_counter() - t0)
            print(f"  step {i + 1}/{steps} loss {loss.item():.3f} ({rate:.0f} tok/s)", flush=True)
    return model


def save_lm(model: nn.Module, config: dict, tokenizer_dir: Path, out: Path) -> None:
    from mlx_lm.utils import save_config

    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out / "config.json")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="mlx_specdec/demo")
    ap.add_argument("--work", default=".dev/demo-work", help="scratch folder")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of data and steps")
    ap.add_argument("--batch", type=int, default=64, help="LM training batch (sequences)")
    ap.add_argument("--skip-dflash", action="store_true")
    args = ap.parse_args()
    from mlx_specdec.train import TrainOptions, train_drafter

    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    s = args.scale
    t0 = time.perf_counter()
    print(f"device {mx.default_device()}; building documents", flush=True)
    docs, train_prompts, eval_prompts = documents(s)
    print(f"  {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB", flush=True)
    tok_dir = work / "tokenizer"
    tokenizer = train_tokenizer(docs, tok_dir)
    rows = pack(docs, tokenizer)
    print(f"  {rows.size / 1e6:.1f} M tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    print("target", flush=True)
    config = qwen3_config(TARGET, eos)
    target = train_lm(config, rows, max(20, int(3000 * s)), args.batch, 2e-3, seed=0)
    save_lm(target, config, tok_dir, out / "target")
    print("plain draft LM", flush=True)
    small = qwen3_config(DRAFT_LM, eos)
    save_lm(train_lm(small, rows, max(20, int(1500 * s)), args.batch, 3e-3, seed=1), small, tok_dir,
            out / "draft-lm")  # fmt: skip
    del target

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in train_prompts))
    common = dict(
        model=str(out / "target"), prompts=str(prompts), samples=max(32, int(4096 * s)),
        gen_tokens=160, batch_size=16, anchors=48, draft_layers=2, markov_rank=64, lr=1e-3,
        temperature=0.3, steps=max(20, int(1500 * s)), save_every=10**9,
    )  # fmt: skip
    kinds = ["dspark"] if args.skip_dflash else ["dspark", "dflash"]
    for kind in kinds:
        print(kind, flush=True)
        scratch = work / kind
        data = work / "dspark" / "train_data.jsonl"  # the dflash run reuses dspark's text
        opts = TrainOptions(kind=kind, out=str(scratch), data=str(data) if kind != "dspark"
                            else None, **common)  # fmt: skip
        result = train_drafter(opts)
        print(f"  loss {result.losses[0]:.3f} -> {np.mean(result.losses[-20:]):.3f}", flush=True)
        (out / kind).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(scratch / name, out / kind / name)
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in eval_prompts))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"done in {time.perf_counter() - t0:.0f} s; {out}: {size / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
