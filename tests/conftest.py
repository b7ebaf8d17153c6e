"""Fixtures shared through pytest. The builders and checks they use live in `helpers.py`.

Tests marked `slow` (several seconds each on a 2-core CPU: long lossless runs, the demo pair,
statistical loops) are part of the suite: CI (`.ci/run`) runs plain `python -m pytest`, all of
it. For a quick local run, leave them out:

    python -m pytest -m "not slow"
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FIXTURES, dspark_config, target_config, write_drafter, write_target

from mlx_specdec import load_pair


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random untied Qwen3 target and a random DSpark drafter for it, on disk."""
    root = tmp_path_factory.mktemp("tiny_pair")
    config = target_config(tied=False)
    target = write_target(root / "target", config)
    drafter = write_drafter(root / "drafter", dspark_config(config))
    return target, drafter


@pytest.fixture(scope="module")
def qwen3_fixture_pair():
    """`load_pair` of the `dspark_qwen3` conformance fixture (bf16 drafter), one per module."""
    d = FIXTURES / "dspark_qwen3"
    return load_pair(str(d / "target"), str(d / "drafter"), drafter_bits=16)
