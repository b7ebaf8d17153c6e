"""The registry of public target/drafter pairs and `mlx-specdec models`."""

from __future__ import annotations

import pytest

from mlx_specdec import registry
from mlx_specdec.cli import main

TARGETS = (
    "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "gemma-4-12B-it", "Qwen3.6-27B", "Qwen3.6-35B-A3B",
    "Qwen3.8-27B", "NVIDIA-Nemotron-3.5-Lightning-30B-A3B", "LFM2.5-1.2B-Instruct", "LFM2.5-2.6B",
)  # fmt: skip


@pytest.mark.parametrize("name", TARGETS)
def test_every_required_target_has_a_row_matched_by_its_quantizations(name):
    entry = registry.lookup(f"mlx-community/{name}-4bit")
    assert entry is not None and registry.lookup(f"{name}-MLX-bf16") is entry
    assert registry.normalize(entry.target) == entry.id
    drafters = [getattr(entry, m) for m in registry.MODES if getattr(entry, m)]
    assert drafters and all(
        d.format in registry.LOADABLE or d.format in registry.NOT_LOADABLE for d in drafters
    )


def test_auto_mode_skips_drafters_this_install_cannot_load():
    assert registry.resolve_mode("Qwen3.8-27B-8bit", "auto", None) == (
        "dspark",
        "RedHatAI/Qwen3.8-27B-speculator.dspark",
    )
    assert registry.resolve_mode("Qwen3.8-27B-8bit", "dflash", None)[1] == (
        "incoai/Qwen3.8-27B-DFlash2"
    )
    assert registry.resolve_mode("Qwen3.6-35B-A3B-4bit", "auto", None) == ("baseline", None)
    assert registry.lookup("Qwen3.6-35B-A3B").runnable().startswith("no: an NVFP4")
    assert registry.lookup("Qwen3-4B").runnable() == "yes"


def test_models_lists_formats_and_whether_each_row_runs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "runnable" in out.splitlines()[0]
    assert "RedHatAI/Qwen3.8-27B-speculator.dspark (speculators)" in out
    assert "incoai/Qwen3.8-27B-DFlash2 (z-lab dflash2)" in out
    assert len([line for line in out.splitlines() if line.endswith("yes")]) >= 4
