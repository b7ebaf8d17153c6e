"""Build the embedded demo pair from text every machine has, offline.

1. Documents in three domains, from the running Python's standard library and a generator:
   code (functions of the stdlib source, its tests included), prose (their docstrings), math
   (generated arithmetic), each as one ChatML exchange (the user gives a start or a question,
   the assistant answers).
2. A byte-level BPE tokenizer (`tokenizers`) trained on them, saved in the Hugging Face layout
   with a ChatML chat template.
3. A small Qwen3 target trained from scratch on them, written in float32: on a CPU, float32 with
   OpenBLAS is where speculation pays (MLX's bf16 and quantized CPU kernels, and its bundled
   BLAS, cost as much per verified token as per decoded one).
4. Its DSpark and DFlash drafters, trained by `train-drafter`'s code on the target's own *greedy*
   answers (what greedy decoding will ask them to predict) to every distinct code and prose
   prompt of the non-held-out files and to code continued from the first lines of a real answer,
   written in float16 (upcast when loaded with `--drafter-bits 32`).
5. A tiny plain draft LM with the same tokenizer, for mlx-lm's classic `--draft-model` race.

Stdlib files are split by a hash of their name: 1 in 10 is held out, and `prompts.jsonl` holds
held-out prompts of each domain for measuring acceptance (`scripts/demo_accept.py`). Every stage
keeps its result in `--work` and is skipped when that result is there; the LM and drafter
trainings save their state as they go, so a run cut short continues where it stopped. Runs on
Metal, CUDA or (slowly) CPU; on a Linux CPU preload OpenBLAS (README):

    python scripts/make_demo.py --out mlx_specdec/demo    # full size: ~20 minutes on one H100
    python scripts/make_demo.py --out /tmp/demo --work /tmp/demo-work --scale 0.003 --batch 16 \
        --drafter-batch 8 --gen-tokens 48       # every stage, briefly: ~2 minutes on 2 cores

The shipped pair's drafter prompts came from Python 3.11's standard library (72 k prompts; the
GPU machine's Python 3.12 has a slimmer one, 24 k), the held-out split being by file name either
way.
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
from mlx.utils import tree_flatten, tree_unflatten

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A small vocabulary: short tokens, the rest of a word is easy to guess, so drafts go further.
# (The model's 16 layers cost the same per token either way; its head gets cheaper.)
VOCAB = 512
# 16 narrow layers: on a CPU the per-token cost that speculation saves grows with depth, while
# the drafter (three layers of the same width) stays cheap beside it. 3.2 M parameters, 13 MB fp32.
TARGET = dict(hidden_size=128, num_hidden_layers=16, intermediate_size=384,
              num_attention_heads=2, num_key_value_heads=1, head_dim=64)  # fmt: skip
DRAFT_LM = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384,
                num_attention_heads=2, num_key_value_heads=1, head_dim=64)  # fmt: skip
SEQ = 256
EXCLUDED_DIRS = ("idlelib", "site-packages", "lib2to3", "__pycache__")
TEST_DIRS = ("test", "tests")


def chat(user: str, answer: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


# ------------------------------------------------------------------------------------ corpus
def split(path: Path) -> str:
    """A file's share, by a hash of its name: 1 in 10 is held out for evaluation, 2 in 10 give
    drafter-training prompts only (so that the drafters learn from the target's answers to
    prompts it never saw, as at evaluation), the rest is the LMs' training text."""
    bucket = hashlib.sha1(path.name.encode()).digest()[0] % 10
    return "eval" if bucket == 0 else "drafter" if bucket <= 2 else "train"


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers (1-based) of every docstring in a module."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def stdlib_functions(max_lines: int = 40) -> list[tuple[Path, str, str | None, str]]:
    """(file, function source, docstring, name) of every def in the stdlib's source. The source
    is code alone: docstrings and comment lines are prose, and the prose domain has them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for file in sorted(root.rglob("*.py")):
        if any(p in EXCLUDED_DIRS for p in file.parts):
            continue
        try:
            text = file.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        prose = docstring_lines(tree)
        prose.update(n for n, line in enumerate(lines, 1) if line.lstrip().startswith("#"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.end_lineno is None:
                continue
            code = range(node.lineno, node.end_lineno + 1)
            body = [lines[n - 1] for n in code if n not in prose][:max_lines]
            if len(body) < 2:  # a def of a docstring alone
                continue
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


def documents(scale: float, seed: int = 0) -> tuple[list[str], dict[str, list], list[dict]]:
    """Training documents, drafter-training prompts per domain and source ("seen": the target
    trained on the answer, "unseen": it did not), held-out evaluation prompts."""
    rng, cut = random.Random(seed), random.Random(seed + 2)
    funcs = stdlib_functions()
    rng.shuffle(funcs)
    funcs = funcs[: max(400, int(len(funcs) * scale))]
    docs: list[str] = []
    prompts: dict[str, list] = {}
    evals: dict[str, list] = {"code": [], "prose": []}
    for file, source, doc, name in funcs:
        head = source.splitlines()[0]
        prose_q = f"What does the function `{name}` do?"
        has_doc = bool(doc and len(doc) > 40)
        share = split(file)
        if share == "eval":
            if not any(p in TEST_DIRS for p in file.parts):
                evals["code"].append(head)
                if has_doc:
                    evals["prose"].append(prose_q)
            continue
        seen = "seen" if share == "train" else "unseen"
        prompts.setdefault(f"code-{seen}", []).append({"prompt": head})
        lines = source.splitlines()
        if len(lines) >= 4:  # the answer's first lines given: the target continues mid-function
            k = cut.randint(2, min(4, len(lines) - 2))
            # Cut before a newline: BPE joins a newline with the next line's indent.
            prefix = {"prompt": head, "prefix": "\n".join(lines[:k]).rstrip()}
            prompts.setdefault("code-prefix", []).append(prefix)
        if has_doc:
            prompts.setdefault(f"prose-{seen}", []).append({"prompt": prose_q})
        if share == "train":
            docs.append(chat(head, source))
            if has_doc:
                docs.append(chat(prose_q, doc))
    for _ in range(max(200, int(60000 * scale))):
        q, a = arithmetic(rng)
        docs.append(chat(q, a))
        prompts.setdefault("math-seen", []).append({"prompt": q})
    held = random.Random(seed + 1)
    eval_prompts = [{"domain": d, "prompt": p} for d, items in evals.items() for p in items[:40]]
    eval_prompts += [{"domain": "math", "prompt": arithmetic(held)[0]} for _ in range(40)]
    rng.shuffle(docs)
    for items in prompts.values():
        rng.shuffle(items)
    return docs, prompts, eval_prompts


def drafter_prompts(prompts: dict[str, list], scale: float, seed: int = 0) -> list[dict]:
    """The prompts whose greedy answers train the drafters: every distinct code and prose
    prompt (greedy answers to a repeated one would repeat), code continued from the first lines
    of a real answer (more distinct trajectories than there are prompts), some arithmetic."""
    # How many of each kind (None: all of them).
    want = {"code-unseen": None, "code-seen": None, "code-prefix": 40000, "prose-unseen": None,
            "prose-seen": None, "math-seen": 4000}  # fmt: skip
    out = []
    for key, n in want.items():
        items = list({json.dumps(p, sort_keys=True): p for p in prompts.get(key, [])}.values())
        out += items[: max(16, int((len(items) if n is None else n) * scale))]
    random.Random(seed).shuffle(out)
    return out


# ------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(docs: list[str], out: Path) -> None:
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


def load_tokenizer(path: Path) -> object:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def qwen3_config(dims: dict, eos: int) -> dict:
    return dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=VOCAB,
        rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False, eos_token_id=eos, torch_dtype="float32",
        **dims,
    )  # fmt: skip


def pack(docs: list[str], tokenizer: object) -> np.ndarray:
    """All documents, tokenized and concatenated, cut into rows of SEQ + 1 tokens."""
    ids = [t for enc in tokenizer(docs)["input_ids"] for t in enc]
    n = len(ids) // (SEQ + 1)
    return np.array(ids[: n * (SEQ + 1)], np.int16).reshape(n, SEQ + 1)


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def build_corpus(work: Path, scale: float) -> None:
    """Stage 1: documents, tokenizer, packed rows and prompts, in `work/corpus`."""
    corpus = work / "corpus"
    if (corpus / "done").is_file():
        if not (corpus / "drafter_prompts.jsonl").is_file():
            _, prompts, _ = documents(scale)
            write_jsonl(corpus / "drafter_prompts.jsonl", drafter_prompts(prompts, scale))
        return
    corpus.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs, prompts, eval_prompts = documents(scale)
    size = sum(map(len, docs)) / 1e6
    print(f"  {len(docs)} documents, {size:.1f} MB; training tokenizer", flush=True)
    train_tokenizer(docs, corpus / "tokenizer")
    rows = pack(docs, load_tokenizer(corpus / "tokenizer"))
    np.save(corpus / "rows.npy", rows)
    write_jsonl(corpus / "drafter_prompts.jsonl", drafter_prompts(prompts, scale))
    write_jsonl(corpus / "eval_prompts.jsonl", eval_prompts)
    stats = dict(documents=len(docs), megabytes=size, tokens=int(rows.size))
    (corpus / "done").write_text(json.dumps(stats) + "\n")
    print(f"  {rows.size / 1e6:.1f} M tokens ({time.perf_counter() - t0:.0f} s)", flush=True)


# ------------------------------------------------------------------------------------ LM training
def train_lm(
    name: str, config: dict, work: Path, tok_dir: Path, *, steps: int,
    batch: int, lr: float, seed: int, save_every: int = 500,
) -> dict:  # fmt: skip
    """Train (or resume) a Qwen3 LM on the packed rows; writes an mlx-lm folder `work/name`."""
    from mlx_lm.models import qwen3

    final, state = work / name, work / f"{name}-state"
    if (final / "model.safetensors").is_file():
        return json.loads((final / "train.json").read_text())
    rows = np.load(work / "corpus" / "rows.npy")
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    warm = max(1, steps // 25)
    sched = optim.join_schedules(
        [optim.linear_schedule(lr / warm, lr, warm), optim.cosine_decay(lr, steps - warm, lr / 20)],
        [warm],
    )  # fmt: skip
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)
    start, losses = 0, []
    if (state / "progress.json").is_file():
        info = json.loads((state / "progress.json").read_text())
        model.load_weights(list(mx.load(str(state / "model.safetensors")).items()))
        opt.state = tree_unflatten(list(mx.load(str(state / "optimizer.safetensors")).items()))
        start, losses = info["step"], info["losses"]
        print(f"  resuming {name} at step {start}", flush=True)
    print(
        f"  {name}: {n_params / 1e6:.2f} M parameters, {steps} steps of {batch}x{SEQ}", flush=True
    )

    def loss_fn(model: nn.Module, x: mx.array) -> mx.array:
        logits = model(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")

    compiled_state = [model.state, opt.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def step(x: mx.array) -> mx.array:
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    def save_state(done: int) -> None:
        state.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(
            str(state / "model.safetensors"), dict(tree_flatten(model.parameters()))
        )
        mx.save_safetensors(str(state / "optimizer.safetensors"), dict(tree_flatten(opt.state)))
        (state / "progress.json").write_text(json.dumps({"step": done, "losses": losses}) + "\n")

    t0 = time.perf_counter()
    for i in range(start, steps):
        rng = np.random.default_rng([seed, i])  # the same batches whether resumed or not
        x = mx.array(rows[rng.integers(0, len(rows), batch)].astype(np.int32))
        loss = step(x)
        mx.eval(compiled_state, loss)
        losses.append(round(loss.item(), 4))
        done = i + 1
        if done % max(1, steps // 20) == 0 or done == steps:
            rate = (done - start) * batch * SEQ / (time.perf_counter() - t0)
            recent = np.mean(losses[-50:])
            print(f"  {name} step {done}/{steps} loss {recent:.3f} ({rate:.0f} tok/s)", flush=True)
        if done % save_every == 0 and done < steps:
            save_state(done)
    info = dict(
        parameters=int(n_params),
        steps=steps,
        batch=batch,
        seq=SEQ,
        lr=lr,
        final_loss=float(np.mean(losses[-100:])),
        seconds=time.perf_counter() - t0,
    )
    save_lm(model, config, tok_dir, final)
    (final / "train.json").write_text(json.dumps(info) + "\n")
    shutil.rmtree(state, ignore_errors=True)
    return info


def save_lm(model: nn.Module, config: dict, tokenizer_dir: Path, out: Path) -> None:
    from mlx_lm.utils import save_config

    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out / "config.json")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)


# ------------------------------------------------------------------------------------ drafters
def drafter_data(work: Path, args: argparse.Namespace) -> dict:
    """The target's greedy answers to the drafter prompts (what greedy decoding will ask the
    drafters to predict), in `work/drafter_data.jsonl`; shared by both drafters."""
    from mlx_specdec.generate import encode_prompt
    from mlx_specdec.loading import load_target
    from mlx_specdec.train.data import generate_answers

    out, info_file = work / "drafter_data.jsonl", work / "drafter_data.json"
    if out.is_file() and info_file.is_file():
        return json.loads(info_file.read_text())
    t0 = time.perf_counter()
    target, tok = load_target(str(work / "target"))
    items = [json.loads(line) for line in (work / "corpus" / "drafter_prompts.jsonl").open()]
    prompts = []
    for item in items[: args.max_prompts or None]:
        ids = list(encode_prompt(tok, item["prompt"], enable_thinking=False))
        prefix = tok.encode(item.get("prefix", ""), add_special_tokens=False)
        # Prefixes cut to a multiple of 8 tokens: fewer distinct lengths, fuller batches.
        ids += prefix[: max(len(prefix) - (len(ids) + len(prefix)) % 8, 1)]
        if len(ids) <= 192:  # longer ones would make every padded training batch longer
            prompts.append(ids)
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    eos = sorted(tok.eos_token_ids)
    answers = generate_answers(target, prompts, args.gen_tokens, greedy, eos, args.gen_batch)
    partial = out.with_suffix(".partial")  # a run cut short mid-write leaves no "done" data
    with partial.open("w") as f:
        for p, a in zip(prompts, answers, strict=True):
            f.write(json.dumps({"ids": p + a, "mask": [0] * len(p) + [1] * len(a)}) + "\n")
    info = dict(answers=len(answers), tokens=sum(map(len, answers)),
                seconds=time.perf_counter() - t0)  # fmt: skip
    info_file.write_text(json.dumps(info) + "\n")
    partial.replace(out)
    print(f"  {info['answers']} greedy answers, {info['tokens']} tokens "
          f"({info['seconds']:.0f} s)", flush=True)  # fmt: skip
    return info


def drafter_options(kind: str, work: Path, scale: float, args: argparse.Namespace) -> object:
    from mlx_specdec.train import TrainOptions

    dspark = kind == "dspark"
    steps = max(20, int((args.drafter_steps if dspark else args.dflash_steps) * scale))
    return TrainOptions(
        model=str(work / "target"), out=str(work / kind), kind=kind,
        data=str(work / "drafter_data.jsonl"), block_size=7,
        batch_size=args.drafter_batch, anchors=args.anchors, draft_layers=args.draft_layers,
        draft_heads=args.dspark_heads if dspark else None,
        draft_kv_heads=args.dspark_kv_heads if dspark else None,
        draft_intermediate=args.dspark_intermediate if dspark else None,
        markov_rank=64, lr=args.drafter_lr, ce_weight=args.ce_weight, steps=steps,
        save_every=args.save_every, dtype="float16", layout="deepspec",
        resume=(work / kind / "train_state" / "progress.json").is_file(),
        progress=False, log_every=args.log_every or max(1, steps // 20),
    )  # fmt: skip


def train_drafters(work: Path, scale: float, args: argparse.Namespace) -> dict:
    from mlx_specdec.train import train_drafter

    results = {}
    for kind in args.kinds.split(","):
        done = work / kind / "done.json"
        if done.is_file():
            results[kind] = json.loads(done.read_text())
            continue
        opts = drafter_options(kind, work, scale, args)
        t0 = time.perf_counter()
        print(f"{kind} drafter ({opts.steps} steps)", flush=True)
        result = train_drafter(opts)
        tail = max(1, len(result.losses) // 20)
        info = dict(
            steps=opts.steps, batch=opts.batch_size, anchors=opts.anchors, lr=opts.lr,
            layers=opts.draft_layers, heads=opts.draft_heads, kv_heads=opts.draft_kv_heads,
            intermediate=opts.draft_intermediate, ce_weight=opts.ce_weight,
            final_loss=float(np.mean(result.losses[-tail:])),
            train_accept=float(np.mean(result.accepts[-tail:])) if result.accepts else None,
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
        done.write_text(json.dumps(info) + "\n")
        results[kind] = info
    return results


# ------------------------------------------------------------------------------------ main
def assemble(work: Path, out: Path, report: dict) -> None:
    """Copy what ships into `out`: target and draft LM folders, drafter checkpoints, prompts."""
    for name in ("target", "draft-lm"):
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in (work / name).iterdir():
            if f.name != "train.json":
                shutil.copy(f, out / name / f.name)
    for kind in ("dspark", "dflash"):
        (out / kind).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(work / kind / name, out / kind / name)
    shutil.copy(work / "corpus" / "eval_prompts.jsonl", out / "prompts.jsonl")
    (out / "build.json").write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="mlx_specdec/demo")
    ap.add_argument("--work", default=".dev/demo-work", help="scratch folder (resumable)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of data and steps")
    ap.add_argument("--target-steps", type=int, default=3000)
    ap.add_argument("--draft-lm-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128, help="LM training batch (sequences)")
    ap.add_argument("--drafter-steps", type=int, default=8000, help="DSpark training steps")
    ap.add_argument("--dflash-steps", type=int, default=2000)
    ap.add_argument("--drafter-batch", type=int, default=128)
    ap.add_argument("--anchors", type=int, default=48)
    ap.add_argument("--draft-layers", type=int, default=3)
    # DSpark's layers are wider than the target's, for acceptance; their MLP matmuls are most
    # of a CPU draft's cost (~4 ms a round for the demo). DFlash keeps the target's widths.
    ap.add_argument("--dspark-heads", type=int, default=4)
    ap.add_argument("--dspark-kv-heads", type=int, default=2)
    ap.add_argument("--dspark-intermediate", type=int, default=2048)
    ap.add_argument("--drafter-lr", type=float, default=2e-3)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--gen-tokens", type=int, default=160)
    ap.add_argument("--gen-batch", type=int, default=4096, help="prompts decoded at once")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--max-prompts", type=int, default=0, help="cap on drafter prompts (0: all)")
    ap.add_argument("--log-every", type=int, default=0, help="drafter steps per line (0: 20 lines)")
    ap.add_argument("--kinds", default="dspark,dflash", help="drafters to train in this run")
    ap.add_argument("--stop-after", choices=["corpus", "target", "draft-lm", "drafter-data"])
    args = ap.parse_args()

    out, work, s = Path(args.out), Path(args.work), args.scale
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"device": str(mx.default_device()), "scale": s}
    print(f"device {mx.default_device()}; corpus", flush=True)
    build_corpus(work, s)
    report["corpus"] = json.loads((work / "corpus" / "done").read_text())
    if args.stop_after == "corpus":
        return
    tok_dir = work / "corpus" / "tokenizer"
    eos = load_tokenizer(tok_dir).convert_tokens_to_ids("<|im_end|>")
    steps = max(20, int(args.target_steps * s))
    print("target", flush=True)
    report["target"] = train_lm("target", qwen3_config(TARGET, eos), work, tok_dir,
                                steps=steps, batch=args.batch, lr=2e-3, seed=0)  # fmt: skip
    if args.stop_after == "target":
        return
    print("plain draft LM", flush=True)
    steps = max(20, int(args.draft_lm_steps * s))
    report["draft-lm"] = train_lm("draft-lm", qwen3_config(DRAFT_LM, eos), work, tok_dir,
                                  steps=steps, batch=args.batch, lr=3e-3, seed=1)  # fmt: skip
    if args.stop_after == "draft-lm":
        return
    print("drafter training text", flush=True)
    report["drafter-data"] = drafter_data(work, args)
    if args.stop_after == "drafter-data":
        return
    report["drafters"] = train_drafters(work, s, args)
    if set(report["drafters"]) != {"dspark", "dflash"}:
        return
    report["seconds"] = time.perf_counter() - t0
    assemble(work, out, report)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"done in {time.perf_counter() - t0:.0f} s; {out}: {size / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
