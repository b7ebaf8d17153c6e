"""The CPU stand-ins for mx.fast's norm and RoPE give mx.fast's results bit for bit, and the
target and drafters use them on the CPU (on weight-sharing copies: mlx-lm's model stays as it
was)."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import build_model, target_config

from mlx_specdec import kernels, load_pair
from mlx_specdec.demo import DEMO_DIR
from mlx_specdec.drafters.dspark import build
from mlx_specdec.target import Target

CPU_ONLY = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")


@pytest.mark.parametrize("dims", [64, 128, 2560])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_compiled_rms_norm_is_bit_identical(dims, dtype):
    for rows, eps in [(1, 1e-6), (8, 1e-5), (33, 1e-6)]:
        x = (mx.random.normal((1, rows, dims), key=mx.random.key(rows)) * 7).astype(dtype)
        ref, ours = nn.RMSNorm(dims, eps=eps), kernels.CompiledRMSNorm(dims, eps=eps)
        ref.weight = ours.weight = mx.random.normal((dims,), key=mx.random.key(2)).astype(dtype)
        a, b = ref(x), ours(x)
        assert b.dtype == a.dtype and mx.array_equal(a, b).item(), (rows, eps)


@pytest.mark.parametrize(
    "dims,base", [(64, 10000.0), (128, 1e6), (128, 5e5), (80, 160000.0), (96, 750000.0)]
)
def test_table_rope_is_bit_identical_and_grows(dims, base, monkeypatch):
    monkeypatch.setattr(kernels, "_ROPE_TABLES", {})
    rope, ref = kernels.TableRoPE(dims, base), nn.RoPE(dims, traditional=False, base=base)
    for heads, rows in [(1, 1), (4, 8), (2, 37)]:
        x = mx.random.normal((1, heads, rows, dims), key=mx.random.key(rows)) * 3
        for offset in (0, 1, 250, 600, 5000, 100000):  # 250 + 8 and on outgrow the table
            assert mx.array_equal(ref(x, offset=offset), rope(x, offset=offset)).item(), offset
    assert kernels._ROPE_TABLES[(dims, base)][0].shape[0] >= 100037  # one table, grown


@pytest.mark.parametrize("formula", ["textbook", "double-log"])
def test_table_rope_frequencies_are_what_makes_it_exact(formula, monkeypatch):
    """The check can fail: the textbook base ** (-2i/d), or mx.fast's formula with its log in
    double precision (half = 40 is not a power of two), round differently."""
    monkeypatch.setattr(kernels, "_ROPE_TABLES", {})
    dims, base, half = 80, 160000.0, 40
    x = mx.random.normal((1, 2, 8, dims), key=mx.random.key(3))
    rope = kernels.TableRoPE(dims, base)
    i = mx.arange(half, dtype=mx.float32)
    rope._inv_freq = (
        base ** (-2 * i / dims) if formula == "textbook" else mx.exp(-i * (math.log(base) / half))
    )
    ref = nn.RoPE(dims, base=base)(x, offset=3000)
    assert not mx.array_equal(ref, rope(x, offset=3000)).item()


def test_table_rope_leaves_other_cases_to_mx_fast():
    rope = kernels.TableRoPE(32, 10000.0)  # partial rotary: 32 of 64 dims
    ref = nn.RoPE(32, base=10000.0)
    x = mx.random.normal((1, 2, 5, 64), key=mx.random.key(4))
    assert mx.array_equal(ref(x, offset=9), rope(x, offset=9)).item()
    half = x[..., :32].astype(mx.bfloat16)
    assert mx.array_equal(ref(half, offset=9), rope(half, offset=9)).item()
    at = mx.array(9)  # an array offset (mlx-lm's batched caches)
    assert mx.array_equal(ref(x[..., :32], offset=at), rope(x[..., :32], offset=at)).item()


def _tiny_model(seed: int = 0) -> nn.Module:
    return build_model(target_config(), seed)


def test_weight_sharing_copy_shares_weights_and_leaves_the_model_alone():
    model = _tiny_model()
    ours = kernels.weight_sharing_copy(model, stand_ins=True)
    layer, theirs = ours.layers[0], model.layers[0]
    assert type(layer.input_layernorm) is kernels.CompiledRMSNorm
    assert type(layer.self_attn.rope) is kernels.TableRoPE
    assert type(theirs.input_layernorm) is nn.RMSNorm and type(theirs.self_attn.rope) is nn.RoPE
    assert layer is not theirs and layer.mlp.up_proj.weight is theirs.mlp.up_proj.weight
    assert layer.input_layernorm.weight is theirs.input_layernorm.weight
    ids = mx.array([[5, 17, 99, 3, 250, 7, 7, 1]])
    assert mx.array_equal(ours(ids), model(ids)).item()


def test_weight_sharing_copy_of_a_quantized_model_with_a_shared_module():
    model = _tiny_model()
    nn.quantize(model, group_size=32, bits=4)
    model.model.layers[1].mlp = model.model.layers[0].mlp  # one module in two places
    ours = kernels.weight_sharing_copy(model, stand_ins=True)
    assert ours.layers[1].mlp is ours.layers[0].mlp is not model.layers[0].mlp
    assert type(ours.layers[0].mlp.up_proj) is nn.QuantizedLinear
    ids = mx.array([[5, 17, 99, 3, 250, 7, 7, 1]])
    assert mx.array_equal(ours(ids), model(ids)).item()


@CPU_ONLY
def test_target_runs_the_stand_ins_on_the_cpu_unless_turned_off():
    model = _tiny_model()
    target = Target(model, target_config())
    assert type(target.layers[0].input_layernorm) is kernels.CompiledRMSNorm
    assert target.model is model and type(model.layers[0].self_attn.rope) is nn.RoPE
    ids = mx.array([5, 17, 99, 3, 250, 7, 7, 1])
    logits, _ = target(ids, target.make_cache())
    assert mx.array_equal(logits, model(ids[None])[0]).item()
    plain = Target(model, target_config(), stand_ins=False).layers[0]
    assert type(plain.input_layernorm) is nn.RMSNorm and type(plain.self_attn.rope) is nn.RoPE
    assert (
        plain is not model.layers[0]
        and plain.mlp.up_proj.weight is model.layers[0].mlp.up_proj.weight
    )


@CPU_ONLY
def test_drafters_use_them_on_the_cpu_unless_turned_off(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((DEMO_DIR / "dspark" / "config.json").read_text())
    attn = build(config, "demo").layers[0].self_attn  # built with mlx's own modules
    assert type(attn.rope) is nn.RoPE and type(attn.q_norm) is nn.RMSNorm
    attn = load_pair(mode="dspark")[2].layers[0].self_attn
    assert isinstance(attn.rope, kernels.TableRoPE)
    assert isinstance(attn.q_norm, kernels.CompiledRMSNorm)
    attn = load_pair(mode="dspark", stand_ins=False)[2].layers[0].self_attn
    assert type(attn.rope) is nn.RoPE and type(attn.q_norm) is nn.RMSNorm


@CPU_ONLY
def test_tapping_a_target_leaves_the_model_and_other_targets_untapped():
    model = _tiny_model()
    plain = Target(model, target_config(), stand_ins=False)
    plain.set_taps([1])  # taps its own copy of layer 1 (train-drafter does this)
    assert type(plain.layers[1]) is not type(plain.layers[0])
    assert type(model.layers[1]) is type(model.layers[0])  # the caller's model is never tapped
    ours = Target(model, target_config())
    assert type(ours.layers[1]) is type(ours.layers[0])  # no stale taps into `plain`'s sink
    ours.set_taps([1])
    ids = mx.array([5, 17, 99, 3])
    _, taps = ours(ids, ours.make_cache())
    _, want = plain(ids, plain.make_cache())
    assert mx.array_equal(taps, want).item()
