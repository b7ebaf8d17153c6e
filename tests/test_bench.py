"""`mlx-specdec bench`: end to end on the tiny DSpark fixture pair and on the demo pair, the
cost-model arithmetic, the auto-cap cache and prompt parsing."""

from __future__ import annotations

import functools
import json

import pytest
from helpers import FIXTURES

from mlx_specdec import autocap
from mlx_specdec.bench.prompts import BenchPrompt, load_prompts
from mlx_specdec.bench.synthetic import ScriptedAcceptance, rate_for_accept_len
from mlx_specdec.cli import main
from mlx_specdec.errors import SpecDecError

FIXTURE = FIXTURES / "dspark_qwen3"


@pytest.fixture(autouse=True)
def cap_cache(tmp_path, monkeypatch):
    """The draft-cap cache file of every run here, in a temporary folder, never ~/.cache: the
    CLI finds the folder in $MLX_SPECDEC_CACHE, API calls are given the file."""
    monkeypatch.setenv("MLX_SPECDEC_CACHE", str(tmp_path / "cache"))
    return autocap.cache_file(tmp_path / "cache")


def test_bench_end_to_end_json_and_lossless(tmp_path, capsys):
    out = tmp_path / "bench.json"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "The 7th", "domain": "chat"}\n{"prompt": "12 + 30 =", "domain": "math"}\n'
    )
    rc = main(
        [
            "bench",
            "--model",
            str(FIXTURE / "target"),
            "--drafter",
            f"dspark={FIXTURE / 'drafter'}",
            "--modes",
            "baseline,dspark,draft-model",
            "--draft-model",
            str(FIXTURE / "target"),
            "--trials",
            "1",
            "--max-new-tokens",
            "12",
            "--max-draft",
            "2,auto",
            "--prompts",
            str(prompts),
            "--no-chat",
            "--cost-reps",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lossless: yes" in printed and "machine:" in printed and "best cap:" in printed
    report = json.loads(out.read_text())
    assert report["lossless"]["lossless"] is True
    assert report["lossless"]["compared"] >= 8  # 2 prompts x (dspark@2, @7, auto, 2 draft-model)
    rows = {(r["row"], r["domain"]) for r in report["results"]}
    assert {
        ("baseline", "chat"),
        ("dspark@2", "math"),
        ("dspark@7", "all"),
        ("draft-model@2", "all"),
        ("draft-model@3", "all"),
    } <= rows
    assert any(r["row"].startswith("dspark@auto=") for r in report["results"])
    for r in report["results"]:
        assert r["decode_tps"] > 0 and r["accept_len"] >= 1 and r["ttft_ms"] > 0
    cm = report["cost_model"]["dspark"]
    assert sorted(int(k) for k in cm["verify_ms"]) == list(range(1, 17))
    assert sorted(int(k) for k in cm["draft_ms"]) == list(range(1, 8))
    assert 1 <= cm["best_cap"] <= 7
    assert report["machine"]["backend"] in ("CPU", "Metal", "CUDA")


def test_expected_accept_and_survival():
    assert autocap.survival_from_rounds([0, 1, 3, 3], 3) == [0.75, 0.5, 0.5]
    assert autocap.expected_accept([0.75, 0.5, 0.5], 3) == pytest.approx(2.75)
    assert autocap.expected_accept([0.75, 0.5, 0.5], 1) == pytest.approx(1.75)
    # beyond what was observed: the last conditional rate (0.5 / 0.5 = 1) continues
    assert autocap.expected_accept([0.75, 0.5, 0.5], 5) == pytest.approx(3.75)
    assert autocap.expected_accept(autocap.geometric_survival(0.5, 2), 4) == pytest.approx(1.9375)
    p = rate_for_accept_len(3.49, 7)
    assert 1 + sum(p**k for k in range(1, 8)) == pytest.approx(3.49, abs=1e-9)
    with pytest.raises(SpecDecError):
        rate_for_accept_len(9.0, 7)


def test_cost_model_prediction_and_best_cap():
    # verify flat up to 4 tokens then doubling; drafter 1 ms per drafted token
    cm = autocap.CostModel(
        512, {k: 10.0 if k <= 4 else 20.0 for k in range(1, 17)}, {c: float(c) for c in range(1, 8)}
    )
    assert cm.baseline_tps == pytest.approx(100.0)
    assert cm.round_ms(3) == pytest.approx(13.0)
    assert cm.predicted_tps(3, 2.6) == pytest.approx(200.0)
    survival = autocap.geometric_survival(0.9, 7)
    best = cm.best_cap(survival)
    assert best == 3  # the verify step at K = 5 costs more than the extra drafts return
    table = {r["cap"]: r for r in cm.table(survival)}
    assert table[3]["speedup"] == pytest.approx(autocap.expected_accept(survival, 3) / 13.0 * 10.0)
    assert autocap.CostModel.from_json(cm.to_json()) == cm
    assert autocap.CostModel.from_json({"context_len": 1}) is None


def test_auto_max_draft_cache(monkeypatch, cap_cache):
    from mlx_specdec.loading import load_drafter, load_target

    target, _ = load_target(str(FIXTURE / "target"))
    drafter, _, _ = load_drafter(str(FIXTURE / "drafter"), target, bits=32)
    calls = []
    fake = autocap.CostModel(
        64, {k: 10.0 if k <= 3 else 30.0 for k in range(1, 17)}, {c: 1.0 for c in range(1, 8)}
    )
    monkeypatch.setattr(autocap, "measure_costs", lambda *a, **k: calls.append(1) or fake)
    auto = functools.partial(autocap.auto_max_draft, cap_cache=cap_cache)
    assert auto(target, drafter, survival=[0.9] * 7) == 2
    assert auto(target, drafter) == 2  # from the cache, nothing measured
    assert len(calls) == 1
    entries = json.loads(cap_cache.read_text())["entries"]
    (key,) = entries
    assert "dspark:32bit" in key or "dspark:float32" in key
    # The same folders with other weights (a retrained drafter) are measured afresh.
    drafter.fc.weight = drafter.fc.weight * 2
    assert autocap.cap_cache_key(target, drafter) != key
    assert auto(target, drafter, survival=[0.9] * 7) == 2
    assert len(calls) == 2
    # An exact verify costs otherwise on a GPU: its cap is its own entry.
    plain = autocap.cap_cache_key(target, drafter)
    target.use_exact()
    exact = autocap.cap_cache_key(target, drafter)
    assert exact != plain and exact.split("|")[1] == plain.split("|")[1] + "+exact"


def test_jsonl_prompts(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi", "domain": "chat"}\n\n{"prompt": "x = ?"}\n')
    assert load_prompts(str(good)) == [
        BenchPrompt("hi", "chat"),
        BenchPrompt("x = ?", "custom"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(SpecDecError, match=r"bad.jsonl:2"):
        load_prompts(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(SpecDecError, match="not valid JSON"):
        load_prompts(str(broken))
    with pytest.raises(SpecDecError, match="cannot read"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SpecDecError, match="unknown set"):
        load_prompts("chat,poetry")
    builtin = load_prompts("chat,code,math", limit=2)
    assert [p.domain for p in builtin] == ["chat", "chat", "code", "code", "math", "math"]
    assert all(len(load_prompts(d)) == 10 for d in ("chat", "code", "math"))


def test_bench_without_model_races_the_demo_pair(tmp_path, capsys, cap_cache):
    """No --model: the embedded demo pair, as `generate` runs it; `auto` caches its cap where
    $MLX_SPECDEC_CACHE says."""
    from mlx_specdec.demo import DEMO_DIR

    out = tmp_path / "demo.json"
    flags = ["--modes", "baseline,dspark", "--prompts", "code", "--limit", "1", "--trials", "1"]
    flags += ["--max-new-tokens", "4", "--cost-reps", "1", "--json", str(out)]
    assert main(["bench", *flags]) == 0
    assert "lossless: yes" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["model"] == str(DEMO_DIR / "target")
    rows = {r["row"] for r in report["results"]}
    assert {"baseline", "dspark@7"} <= rows and any(r.startswith("dspark@auto=") for r in rows)
    (key,) = json.loads(cap_cache.read_text())["entries"]
    assert key.startswith(str((DEMO_DIR / "target").resolve()))


def test_cli_errors(capsys):
    assert main(["bench", "--model", "x", "--max-draft", "0"]) == 2
    assert "--max-draft" in capsys.readouterr().err


def test_blas_detection(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert autocap._blas().startswith("OpenBLAS")


def test_scripted_acceptance_follows_profile():
    """The synthetic mode's stand-in accepts exactly what the profile draws (real loop)."""
    from mlx_specdec.loading import load_drafter, load_target
    from mlx_specdec.speculate import speculate

    target, _ = load_target(str(FIXTURE / "target"))
    drafter, _, _ = load_drafter(str(FIXTURE / "drafter"), target, bits=32)
    for p, want in ((1.0, 7), (0.0, 0)):
        steps = list(
            speculate(ScriptedAcceptance(target, p), drafter, [5, 6, 7], max_new_tokens=30)
        )
        accepted = [s.round.accepted for s in steps if s.round and len(s.round.proposed) == 7]
        assert accepted and all(a == want for a in accepted)


def _fixture_pair():
    from mlx_specdec.loading import load_drafter, load_target

    target, tokenizer = load_target(str(FIXTURE / "target"))
    drafter, _, _ = load_drafter(str(FIXTURE / "drafter"), target, bits=32)
    return target, tokenizer, drafter


def test_auto_max_draft_measures_on_a_miss_within_budget(cap_cache):
    """A cache miss measures only what the caps need (K = 1..block+1), says so, and caches it."""
    target, _, drafter = _fixture_pair()
    notes = []
    auto = functools.partial(autocap.auto_max_draft, cap_cache=cap_cache)
    cap = auto(target, drafter, budget_s=0.5, notify=notes.append)
    assert 1 <= cap <= drafter.max_draft
    assert len(notes) == 2 and "calibrating" in notes[0] and "--max-draft N" in notes[0]
    (entry,) = json.loads(cap_cache.read_text())["entries"].values()
    assert entry["cap"] == cap and entry["survival"] == [autocap.PRIOR_ACCEPT]
    assert sorted(int(k) for k in entry["costs"]["verify_ms"]) == list(range(1, 9))
    assert entry["costs"]["context_len"] == autocap.AUTO_CONTEXT
    notes.clear()
    assert auto(target, drafter, notify=notes.append) == cap and not notes


def test_median_ms_budget_bounds_repeats():
    import mlx.core as mx

    calls = []

    def fn():
        calls.append(1)
        return mx.array(0)

    autocap._median_ms(fn, reps=5)
    assert len(calls) == 6  # one warm call, five timed
    calls.clear()
    autocap._median_ms(fn, reps=50, seconds=0.0)
    assert len(calls) == 2  # the budget is spent: one warm call and one timed call


def test_python_api_accepts_auto(monkeypatch, cap_cache):
    from mlx_specdec.generate import speculative_generate

    target, tokenizer, drafter = _fixture_pair()
    fake = autocap.CostModel(
        64, {k: 10.0 if k <= 3 else 30.0 for k in range(1, 17)}, {c: 1.0 for c in range(1, 8)}
    )
    monkeypatch.setattr(autocap, "measure_costs", lambda *a, **k: fake)
    kwargs = dict(max_new_tokens=20, chat=False, cap_cache=cap_cache)
    auto = speculative_generate(target, tokenizer, drafter, "The 7th", max_draft="auto", **kwargs)
    assert max(len(r.proposed) for r in auto.rounds) == 2  # the fake curves' best cap
    full = speculative_generate(target, tokenizer, drafter, "The 7th", **kwargs)
    assert max(len(r.proposed) for r in full.rounds) == 7  # None keeps meaning the full block
    assert auto.tokens == full.tokens
    plain = speculative_generate(target, tokenizer, None, "The 7th", max_draft="auto", **kwargs)
    assert plain.tokens == full.tokens
    with pytest.raises(SpecDecError, match="'auto'"):
        speculative_generate(target, tokenizer, drafter, "The 7th", max_draft="fast", **kwargs)


def test_bench_sampling_temperature_reaches_every_mode(tmp_path, capsys):
    """At T > 0 every mode (mlx-lm's baseline and draft-model included) samples, reports accept
    length and tok/s, and the token-by-token verdict is skipped (exit 0)."""
    common = ["bench", "--model", str(FIXTURE / "target"), "--drafter",
              f"dspark={FIXTURE / 'drafter'}", "--drafter-bits", "32", "--draft-model",
              str(FIXTURE / "target"), "--modes", "baseline,draft-model,dspark", "--trials", "1",
              "--max-new-tokens", "24", "--max-draft", "2", "--prompts", "chat", "--limit", "1",
              "--cost-reps", "1"]  # fmt: skip
    runs = {}
    for t in ("0", "1.0"):
        out = tmp_path / f"t{t}.json"
        assert main([*common, "--temperature", t, "--json", str(out)]) == 0
        runs[t] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "temperature 1.0" in printed and "lossless: verdict skipped" in printed
    sampled = runs["1.0"]
    assert sampled["lossless"]["checked"] is False and runs["0"]["lossless"]["lossless"] is True
    for r in sampled["results"]:
        assert r["decode_tps"] > 0 and r["accept_len"] >= 1
    greedy = {s["row"]: s["tokens"] for s in runs["0"]["samples"]}
    for s in sampled["samples"]:  # the sampled outputs left the greedy path, in every mode
        assert s["tokens"] != greedy[s["row"]], s["row"]


def test_synthetic_is_greedy_only(capsys):
    assert main(["bench", "--synthetic", "small", "--temperature", "0.7"]) == 2
    assert "--temperature applies to real models only" in capsys.readouterr().err
