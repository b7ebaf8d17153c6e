"""The drafters' compiled CPU norm and RoPE agree with the mlx.nn modules they stand in for."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_specdec.demo import DEMO_DIR
from mlx_specdec.drafters import layers
from mlx_specdec.drafters.dspark import build


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_compiled_rms_norm_matches_nn(dtype):
    x = (mx.random.normal((1, 5, 128), key=mx.random.key(1)) * 3).astype(dtype)
    ref, ours = nn.RMSNorm(128, eps=1e-6), layers.CompiledRMSNorm(128, eps=1e-6)
    ref.weight = ours.weight = mx.random.normal((128,), key=mx.random.key(2)).astype(dtype)
    a, b = ref(x), ours(x)
    assert b.dtype == a.dtype
    if dtype == mx.float32:
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5).item()
    else:  # half precision keeps mx.fast's rounding
        assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_table_rope_matches_nn_rope_and_grows(dtype, monkeypatch):
    monkeypatch.setattr(layers, "_ROPE_TABLES", {})
    rope, ref = layers.TableRoPE(64, 10000.0), nn.RoPE(64, traditional=False, base=10000.0)
    x = mx.random.normal((1, 2, 8, 64), key=mx.random.key(3)).astype(dtype)
    for offset in (0, 37, 250, 600):  # 250 + 8 and 600 + 8 outgrow the table
        a, b = ref(x, offset=offset), rope(x, offset=offset)
        assert b.dtype == dtype
        if dtype == mx.float32:
            assert mx.allclose(a, b, atol=2e-4).item(), offset
        else:  # half precision keeps mx.fast's rounding
            assert mx.array_equal(a, b).item(), offset
    if dtype == mx.float32:
        assert layers._ROPE_TABLES[(64, 10000.0)][0].shape[0] >= 608  # one table for all
        wrong = layers.TableRoPE(64, 5000.0)(x, offset=37)  # the check can fail
        assert not mx.allclose(ref(x, offset=37), wrong, atol=2e-4).item()


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU backend only")
def test_drafters_use_them_on_the_cpu_unless_turned_off(monkeypatch):
    config = json.loads((DEMO_DIR / "dspark" / "config.json").read_text())
    layers.cpu_kernels.cache_clear()
    try:
        attn = build(config, "demo").layers[0].self_attn
        assert isinstance(attn.rope, layers.TableRoPE)
        assert isinstance(attn.q_norm, layers.CompiledRMSNorm)
        monkeypatch.setenv("MLX_SPECDEC_CPU_KERNELS", "0")
        layers.cpu_kernels.cache_clear()
        attn = build(config, "demo").layers[0].self_attn
        assert type(attn.rope) is nn.RoPE and type(attn.q_norm) is nn.RMSNorm
    finally:
        layers.cpu_kernels.cache_clear()
