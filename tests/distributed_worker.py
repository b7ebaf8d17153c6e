"""One rank of a split-target run for tests/test_distributed.py (started by `mlx.launch` or by
the test itself): loads the pair split across the ranks, runs the cases of a JSON spec through
the verify loop (or plain mlx-lm decoding), and writes what each case produced to
`OUT/rank{R}.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import greedy_reference, run
from hybrid_models import Steered

from mlx_specdec.distributed import broadcast_int, load_pair_sharded
from mlx_specdec.sampling import SamplingParams


def run_case(case: dict, target, drafter) -> dict:
    if case.get("baseline"):
        tokens = greedy_reference(target.model, case["prompt"], case["max_new"], set())
        return {"tokens": tokens, "rounds": []}
    if case.get("steer"):
        want = case["steer"]["want"]
        drafter = Steered(drafter, len(case["prompt"]), want, seed=case["steer"]["seed"])
    params = SamplingParams(case.get("temperature", 0.0), seed=case.get("seed"))
    tokens, rounds = run(
        target,
        drafter,
        case["prompt"],
        case["max_new"],
        max_draft=case.get("max_draft"),
        params=params,
    )
    return {"tokens": tokens, "rounds": [[r.proposed, r.accepted] for r in rounds]}


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    target, _, drafter, _ = load_pair_sharded(
        spec["sharding"],
        spec["model"],
        spec.get("drafter"),
        drafter_bits=32,
    )
    rank = target.group.rank()
    out = {case["name"]: run_case(case, target, drafter) for case in spec["cases"]}
    out["world"] = target.group.size()
    broadcast_int(target.group, 0)  # no rank leaves before the others are done
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
