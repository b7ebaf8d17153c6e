"""`mlx-specdec doctor` (doctor.py): on the CPU everything is exact, and an op made row-variant
the way GPU kernels are (a row computed among K differs from the row alone) is caught, and so
is an exact path whose plan leaves rows with company."""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import build_model, target_config
from test_exact import row_variant

from mlx_specdec.cli import main
from mlx_specdec.doctor import Check, run_doctor, startup_check
from mlx_specdec.exact import RowPlan
from mlx_specdec.target import Target

QUICK = dict(widths=(2, 4), positions=(5, 20))


def report_of(model, **kw):
    return run_doctor(Target(model, {"model_type": "qwen3"}, name="tiny"), **(QUICK | kw))


def verdicts(checks: list[Check]) -> dict[str, str]:
    return {c.name.split(":")[0]: c.verdict() for c in checks}


def test_everything_is_exact_on_the_cpu():
    report = report_of(build_model(target_config()))
    assert all(c.ok for c in report.ops)
    assert report.path_ok("verify") and report.path_ok("exact")
    assert "verify is bit-exact on this backend and model" in report.verdict()
    assert report.summary().endswith("verify bit-identical to the decode step")
    text = "\n".join(report.lines())
    assert "K = 2, 4; contexts of 5, 20" in text and "DIFFERS" not in text


def test_a_row_variant_matmul_is_caught_and_exact_fixes_it():
    """As on a GPU, with the GPU's plan (the CPU's keeps matmuls whole: they are invariant)."""
    report = report_of(row_variant(build_model(target_config(tied=False))), plan=RowPlan())
    ops = verdicts(report.ops)
    assert ops["matmul (float32)"].startswith("DIFFERS at K = 2, 4")
    assert ops["rms norm"] == ops["attention"] == "exact at every K"
    normal = verdicts(report.paths["verify"])
    assert normal["logits"].startswith("DIFFERS at K = 2, 4")
    assert "first at layer 0" in normal["layer outputs"]
    assert normal["prefill K/V"].startswith("DIFFERS")  # 512-row chunks, not mlx-lm's
    assert report.path_ok("exact")
    assert "row-variant: matmul (float32)" in report.verdict()
    assert "with --exact every row is bit-identical" in report.verdict()
    assert "--exact: bit-identical" in report.summary()


def test_row_variant_attention_is_caught_and_exact_fixes_it(monkeypatch):
    fused = mx.fast.scaled_dot_product_attention

    def multi_query_differs(q, k, v, **kw):
        out = fused(q, k, v, **kw)
        return out * 1.01 if q.shape[2] > 1 else out

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", multi_query_differs)
    report = report_of(build_model(target_config()))
    assert verdicts(report.ops)["attention"].startswith("DIFFERS")
    assert verdicts(report.paths["verify"])["K/V written"].startswith("DIFFERS")
    assert report.path_ok("exact")


def test_a_plan_past_a_kernel_switch_is_caught():
    """A plan that lets 2 rows share a call, on a matmul that changes from 2 rows on: the exact
    path is no longer exact, and the doctor says so (and exits 1)."""
    report = report_of(row_variant(build_model(target_config())), plan=RowPlan(2, 2))
    assert not report.path_ok("exact")
    assert report.verdict().startswith("--exact is NOT bit-exact here (layer outputs")
    assert "NOT bit-identical (a bug)" in report.summary()


def test_plain_decoding_that_does_not_repeat_itself_is_not_called_our_bug(monkeypatch):
    """Measured on MLX CUDA in bf16: mlx-lm's own decoding, run twice on one prompt, can differ.
    The doctor's control catches it; then a differing --exact is reported as that, not a bug."""
    from mlx_specdec import doctor

    decode, calls = doctor._decode, []

    def unrepeatable(*args):
        calls.append(1)
        out = decode(*args)
        if len(calls) % 2 == 0:  # the control's second run
            out.logits = out.logits + 1e-3
        return out

    monkeypatch.setattr(doctor, "_decode", unrepeatable)
    model = row_variant(build_model(target_config()))
    broken = report_of(model, plan=RowPlan(2, 2))
    assert broken.repeat.verdict().startswith("DIFFERS")
    assert not broken.path_ok("exact") and not broken.exact_bug
    assert "plain decoding is not reproducible bit for bit" in broken.verdict()
    assert "as plain decoding run twice does" in broken.summary()
    text = "\n".join(broken.lines())
    assert "control: mlx-lm's own decoding, run twice: DIFFERS" in text
    monkeypatch.setattr(doctor, "_decode", decode)
    assert report_of(model, plan=RowPlan(2, 2)).exact_bug  # a repeatable reference: our bug


def test_check_verdicts():
    c = Check("x")
    assert c.verdict() == "not checked"
    a = mx.array([1.0, 2.0])
    c.record(2, a, a)
    assert c.verdict() == "exact at every K"
    c.record(4, a, a + mx.array([0.0, 2.0**-22]))
    assert c.verdict() == "DIFFERS at K = 4 (up to 1 ulp)"
    once = Check("prefill")
    once.record(0, a, a)
    assert once.verdict() == "exact"


def test_startup_check_never_raises():
    class Broken:
        model = None

    assert startup_check(Broken()).startswith("exactness check skipped")


@pytest.mark.slow
def test_doctor_command_on_the_demo_target(capsys):
    assert main(["doctor", "--widths", "2,3", "--positions", "4"]) == 0
    out = capsys.readouterr().out
    assert "mlx-specdec doctor: demo target (qwen3, float32, 16 layers) on cpu" in out
    assert "verdict: verify is bit-exact on this backend and model" in out


def test_serve_logs_the_check_at_start_up(monkeypatch, capsys, tiny_pair):
    pytest.importorskip("fastapi")
    import mlx_specdec.server.shutdown as shutdown

    monkeypatch.setattr(shutdown, "serve", lambda *a, **k: None)  # start up, do not serve
    target, drafter = map(str, tiny_pair)
    args = ["serve", "--model", target, "--drafter", drafter, "--max-draft", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "mlx-specdec: exactness (doctor, K=2,8): verify bit-identical to the decode step" in err
