"""The `rollout_ranks` benchmark part's arithmetic and verdict, on hand-written rank results (no engine: the part
itself is run by hand, `BENCH_RANKS_TINY=1 make bench PARTS=rollout_ranks`)."""

import pytest

from harness.commands.bench import rollout_ranks as part
from harness.commands.bench.__main__ import main


def _rank(rank: int, steps: list[tuple[float, float, int]], engine: bool, rss: float) -> dict:
    result = {"rank": rank, "rss_gib": rss, "peak_rss_gib": rss + 0.1, "threads": 2, "prompt_bytes": 100 + rank,
              "completion_bytes": 1000 + rank,
              "steps": [{"step_s": s, "generate_s": g, "tokens": t} for s, g, t in steps]}
    if engine:
        result.update(engine_start_s=4.0 + rank, sync_s=0.03)
    return result


def _launches() -> dict:
    size_tokens = 512  # per rank and step
    shared = [[_rank(0, [(2.0, 1.5, size_tokens), (4.0, 3.0, size_tokens)], True, 1.8),
               _rank(1, [(2.0, 1.5, size_tokens), (4.0, 3.0, size_tokens)], False, 0.6)],
              [_rank(0, [(3.0, 2.0, size_tokens), (3.0, 2.8, size_tokens)], True, 2.0),
               _rank(1, [(3.0, 2.0, size_tokens), (3.0, 2.8, size_tokens)], False, 0.6)]]
    own = [[_rank(0, [(6.0, 5.0, size_tokens), (6.0, 5.0, size_tokens)], True, 1.8),
            _rank(1, [(6.0, 5.5, size_tokens), (6.0, 5.9, size_tokens)], True, 1.8)]] * 2
    return {"shared": shared, "own": own}


def test_summary_takes_medians_over_every_step_of_every_launch():
    size = part.RankRolloutSize(rounds=2, repeats=2)
    r = part.summarise_rank_rollouts(size, _launches())
    shared, own = r["shared"], r["own"]
    assert (r["prompts_per_rank"], r["rounds"], r["repeats"], r["ranks"]) == (32, 2, 2, 2)
    assert shared["step_s"] == 3.0  # median of 2, 4, 3, 3
    assert shared["tok_s"] == pytest.approx(1024 / 3.0)  # both ranks' tokens over the step
    assert shared["comm_s"] == pytest.approx(0.75)  # median of 0.5, 1.0, 1.0, 0.2
    assert (shared["engines"], own["engines"]) == (1, 2)
    assert shared["engine_start_s"] == 4.0 and own["engine_start_s"] == 4.5  # own: ranks 0 and 1, both launches
    assert shared["rss_gib"] == [1.9, 0.6] and own["rss_gib"] == [1.8, 1.8]
    assert (shared["prompt_bytes"], shared["completion_bytes"]) == (201, 2001)
    assert own["generate_s"] == pytest.approx(5.7)  # the slower rank per step: 5.5, 5.9, 5.5, 5.9
    assert "comm_s" not in own


def test_verdict_names_the_faster_design(capsys):
    size = part.RankRolloutSize(rounds=2, repeats=2)
    part.print_rollout_ranks(part.summarise_rank_rollouts(size, _launches()))
    out = capsys.readouterr().out
    assert "own/shared step time = 2.00x, own engines hold +1.10 GiB more" in out
    assert "favour rank 0 generating for all ranks: 2.00x faster per step" in out
    swapped = _launches()
    swapped["shared"], swapped["own"] = swapped["own"], swapped["shared"]
    for pair in swapped["shared"]:  # the shared side reports its gather/scatter bytes
        for rank in pair:
            rank.update(prompt_bytes=1, completion_bytes=1)
    part.print_rollout_ranks(part.summarise_rank_rollouts(size, swapped))
    assert ("favour each rank its own engine: 2.00x faster per step, at the price of a second engine's start "
            "(4.0s) and -1.10 GiB") in capsys.readouterr().out


def test_unknown_part_lists_rollout_ranks():
    with pytest.raises(SystemExit, match="choose from .*ppo, rollout_ranks"):
        main(["rollout_rank"])
