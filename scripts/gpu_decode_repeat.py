"""Does mlx-lm's own decoding repeat itself bit for bit on this backend? (docs/exactness.md)

On the bf16 demo target: mlx-lm's decoding run twice on one prompt (8, 300, 1100 tokens);
single-query attention over the same keys in three buffer layouts; causal prefill attention
three times; and the doctor per context length. Run on the GPU machine from the repo root:

    python scripts/gpu_decode_repeat.py
"""

from __future__ import annotations

import shutil

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_specdec.doctor import run_doctor
from mlx_specdec.loading import load_target

SRC, BF16 = "mlx_specdec/demo/target", "/tmp/demo-bf16"
sdpa = mx.fast.scaled_dot_product_attention


def equal(a: mx.array, b: mx.array) -> bool:
    return bool(mx.array_equal(a, b).item())


def decode(model, ids: mx.array, steps: int = 4) -> tuple[list[mx.array], list[mx.array]]:  # noqa: ANN001
    """mlx-lm's decoding: prefill all but the last token, then one-token greedy steps."""
    cache = make_prompt_cache(model)
    model(ids[None, :-1], cache=cache)
    logits = [model(ids[None, -1:], cache=cache)]
    for _ in range(steps):
        logits.append(model(mx.argmax(logits[-1][0, -1]).reshape(1, 1), cache=cache))
    mx.eval(logits, [c.state for c in cache])
    kv = [a[..., : c.offset, :] for c in cache for a in (c.keys, c.values)]
    return kv, logits


def main() -> None:
    shutil.copytree(SRC, BF16, dirs_exist_ok=True)
    weights = mx.load(f"{SRC}/model.safetensors")
    mx.save_safetensors(
        f"{BF16}/model.safetensors", {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    )
    target, _ = load_target(BF16)
    mx.random.seed(1)
    for p in (8, 300, 1100):
        ids = mx.random.randint(0, target.vocab_size, (p,))
        (kv_a, lg_a), (kv_b, lg_b) = decode(target.model, ids), decode(target.model, ids)
        same_kv = all(equal(x, y) for x, y in zip(kv_a, kv_b))
        same_logits = all(equal(x, y) for x, y in zip(lg_a, lg_b))
        print(f"mlx-lm decoding twice, {p} tokens: K/V same {same_kv}, logits same {same_logits}")

    bf = mx.bfloat16
    q = mx.random.normal((1, 2, 1, 64)).astype(bf)
    keys, values = (mx.random.normal((1, 1, 512, 64)).astype(bf) for _ in range(2))
    pad = mx.zeros((1, 1, 256, 64), bf)
    keys3, values3 = mx.concatenate([keys, pad], axis=2), mx.concatenate([values, pad], axis=2)
    for n in (100, 300):
        k, v = keys[:, :, :n], values[:, :, :n]
        outs = [
            sdpa(q, k, v, scale=0.125),
            sdpa(q, k, v, scale=0.125),
            sdpa(q, mx.contiguous(k), mx.contiguous(v), scale=0.125),
            sdpa(q, keys3[:, :, :n], values3[:, :, :n], scale=0.125),
        ]
        mx.eval(outs)
        print(
            f"decode attention, {n} keys: twice {equal(outs[0], outs[1])}, contiguous copy "
            f"{equal(outs[0], outs[2])}, 768-row buffer {equal(outs[0], outs[3])}"
        )
    for n in (7, 299):
        queries = mx.random.normal((1, 2, n, 64)).astype(bf)
        k, v = keys[:, :, :n], values[:, :, :n]
        outs = [sdpa(queries, k, v, scale=0.125, mask="causal") for _ in range(3)]
        mx.eval(outs)
        print(f"prefill attention, {n} rows: thrice {equal(*outs[:2]) and equal(*outs[1:])}")
    for p in (8, 300, 1100):
        report = run_doctor(target, (2, 8), (p,))
        print(f"doctor, context {p}: {report.summary()}")


if __name__ == "__main__":
    main()
