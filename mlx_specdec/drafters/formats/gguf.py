"""GGUF drafters (`general.architecture = dspark`, PrismML's layout), read by a small reader of
our own (GGUF v2/v3; F32, F16 and BF16 tensors: quantized types are refused in one line).

Translated to DeepSpec's DSpark layout:

- tensors: `token_embd` -> `embed_tokens`, `output` -> `lm_head`, `output_norm` -> `norm`,
  `dspark.fc` / `dspark.hidden_norm` -> `fc` / `hidden_norm`, `dspark.markov_head_a|b` ->
  `markov_head.markov_w1|w2`, `dspark.confidence_head` -> `confidence_head.proj`, and
  `blk.N.{attn_norm, ffn_norm, attn_q|k|v, attn_output, attn_q_norm, attn_k_norm, ffn_gate|up|down}`
  -> `layers.N.*`. GGUF lists dimensions fastest first: the array shape is their reverse.
- config: the llama.cpp keys `dspark.{block_count, embedding_length, feed_forward_length,
  attention.head_count, attention.head_count_kv, attention.key_length,
  attention.layer_norm_rms_epsilon, rope.freq_base, vocab_size}` and the drafter's own keys,
  read as `dspark.dspark.<key>` or `dspark.<key>`: `block_size`, `mask_token_id` (else
  `tokenizer.ggml.mask_token_id`), `target_layers` (DeepSpec's ids: layer outputs),
  `num_target_layers`, `log_snr_conditioning`. The Markov rank and whether the confidence head
  reads the Markov embedding come from the tensors' shapes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from ...errors import SpecDecError

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# ggml tensor types we read: id -> (name, numpy dtype); bf16 is read as raw 16-bit words.
_TYPES = {0: ("F32", np.float32), 1: ("F16", np.float16), 30: ("BF16", np.uint16)}
_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
               11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 24: "I8", 25: "I16",
               26: "I32", 27: "I64", 28: "F64"}  # fmt: skip
_HEAD = {
    "token_embd": "embed_tokens",
    "output": "lm_head",
    "output_norm": "norm",
    "dspark.fc": "fc",
    "dspark.hidden_norm": "hidden_norm",
    "dspark.markov_head_a": "markov_head.markov_w1",
    "dspark.markov_head_b": "markov_head.markov_w2",
    "dspark.confidence_head": "confidence_head.proj",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class _Reader:
    def __init__(self, f: BinaryIO, file: Path):
        self.f, self.file = f, file

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise SpecDecError(f"GGUF file '{self.file}' is truncated")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        return self.f.read(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, count = self.scalar("<I"), self.scalar("<Q")
            return [self.value(inner) for _ in range(count)]
        raise SpecDecError(f"GGUF file '{self.file}' has a metadata value of unknown type {kind}")


def read(file: Path, what: str) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """(metadata, tensors by GGUF name) of a GGUF file with F32 / F16 / BF16 tensors."""
    try:
        with open(file, "rb") as f:
            r = _Reader(f, file)
            if f.read(4) != _MAGIC:
                raise SpecDecError(f"{what}: '{file}' is not a GGUF file")
            version = r.scalar("<I")
            if version not in (2, 3):
                raise SpecDecError(f"{what}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
            meta = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.scalar("<I"))
            infos = []
            for _ in range(n_tensors):
                name = r.string()
                dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
                infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
            align = int(meta.get("general.alignment", 32))
            start = -(-f.tell() // align) * align
            return meta, {info[0]: _read_tensor(f, start, *info, what) for info in infos}
    except OSError as e:
        raise SpecDecError(f"{what}: cannot read GGUF file '{file}' ({e})") from None


def _read_tensor(
    f: BinaryIO, start: int, name: str, dims: list[int], kind: int, offset: int, what: str
) -> mx.array:
    if kind not in _TYPES:
        label = _TYPE_NAMES.get(kind, f"type {kind}")
        raise SpecDecError(
            f"{what}: GGUF tensor '{name}' is {label}; only F32, F16 and BF16 tensors are "
            "supported (dequantize the file first)"
        )
    _, dtype = _TYPES[kind]
    count = int(np.prod(dims)) if dims else 1
    f.seek(start + offset)
    data = np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype)
    if data.size != count:
        raise SpecDecError(f"{what}: GGUF tensor '{name}' is truncated")
    data = data.reshape(tuple(reversed(dims)))
    if kind == 30:  # bf16: the high half of a float32
        return mx.array((data.astype(np.uint32) << 16).view(np.float32)).astype(mx.bfloat16)
    return mx.array(data)


def _rename(name: str, what: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _HEAD:
        return f"{_HEAD[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"layers.{parts[1]}.{_LAYER[parts[2]]}.{suffix}"
    raise SpecDecError(f"{what}: GGUF tensor '{name}' is not part of a DSpark drafter")


def translate(meta: dict[str, Any], tensors: dict[str, mx.array], what: str) -> tuple[dict, dict]:
    """GGUF metadata and tensors -> a DeepSpec DSpark config and weights."""
    arch = meta.get("general.architecture")
    if arch != "dspark":
        raise SpecDecError(
            f"{what}: GGUF general.architecture '{arch}' is not supported (only dspark drafters)"
        )

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"dspark.dspark.{name}", meta.get(f"dspark.{name}", default))

    if key("log_snr_conditioning"):
        raise SpecDecError(
            f"{what}: GGUF dspark.log_snr_conditioning = true (GIDD diffusion conditioning) is "
            "not supported"
        )
    weights = {_rename(n, what): t for n, t in tensors.items()}
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    rank = (
        weights["markov_head.markov_w1.weight"].shape[1]
        if "markov_head.markov_w1.weight" in weights
        else 0
    )
    confidence = "confidence_head.proj.weight" in weights
    mask = key("mask_token_id", meta.get("tokenizer.ggml.mask_token_id"))
    config = {
        "architectures": ["Qwen3DSparkModel"],
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 1e6)),
        "vocab_size": int(key("vocab_size", weights["embed_tokens.weight"].shape[0])),
        "block_size": key("block_size"),
        "mask_token_id": mask,
        "target_layer_ids": key("target_layers"),
        "num_target_layers": key("num_target_layers"),
        "markov_rank": rank,
        "markov_head_type": "vanilla",
        "enable_confidence_head": confidence,
        "confidence_head_with_markov": bool(
            confidence and weights["confidence_head.proj.weight"].shape[1] == hidden + rank and rank
        ),
    }
    return {k: v for k, v in config.items() if v is not None}, weights
