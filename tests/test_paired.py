"""Paired tests for verdicts on the same seeds: exact binomial p-values against scipy, McNemar and sign-test counts
by hand, and the bench's paired-against-the-best table."""

import math
import random

import pytest

from lossguide.harness.report import paired_against_best, per_seed
from lossguide.metrics import binomial_two_sided, holm, mcnemar, sign_test


def test_binomial_two_sided_equals_scipys_exact_test():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 400)
        k = rng.randint(0, n)
        assert binomial_two_sided(k, n) == pytest.approx(stats.binomtest(k, n).pvalue, rel=1e-9, abs=1e-300)
    assert binomial_two_sided(10, 10) == 2 / 1024 and binomial_two_sided(0, 0) == 1.0
    assert binomial_two_sided(5, 10) == 1.0
    with pytest.raises(ValueError, match="0 ≤ k ≤ n"):
        binomial_two_sided(3, 2)


def test_mcnemar_counts_only_the_discordant_seeds():
    a = [1, 1, 1, 1, 0, 0, 1, 0]
    b = [1, 0, 0, 0, 0, 1, 1, 0]  # a only on seeds 1, 2, 3; b only on seed 5
    t = mcnemar(a, b)
    assert (t["a_only"], t["b_only"]) == (3, 1)
    assert t["p"] == pytest.approx(2 * (1 + 4) / 16)  # 2·P(X ≤ 1), X ~ Bin(4, ½)
    assert mcnemar(a, a) == {"a_only": 0, "b_only": 0, "p": 1.0}
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar(a, b[:-1])


def test_sign_test_drops_ties_and_ranks_nan_lowest():
    a = [10.0, 12.0, 9.0, 11.0, math.nan, 7.0]
    b = [9.0, 12.0, 10.0, 8.0, 3.0, 6.0]  # a wins seeds 0, 3, 5; b seeds 2, 4 (NaN loses); seed 1 ties
    t = sign_test(a, b)
    assert (t["a_wins"], t["b_wins"]) == (3, 2) and t["p"] == 1.0


def _row(method, values, metric="judge_validity", steps=50):
    return {"method": method, "steps": steps, "per_seed": {"metric": metric, "seeds": list(range(len(values))),
                                                         "values": values}}  # fmt: skip


def test_paired_against_best_compares_every_method_with_the_best_of_its_budget():
    best = _row("shen2024", [1] * 20)
    same = _row("copy", [1] * 20)
    worse = _row("freedom", [1] * 8 + [0] * 12)
    other_budget = _row("dps", [0] * 20, steps=20)
    out = {r["method"]: r for r in paired_against_best([worse, best, same, other_budget])}
    assert set(out) == {"copy", "freedom"}  # dps has no rival at DDIM-20
    assert out["copy"]["p_paired"] == 1.0 and out["copy"]["delta_vs_best"] == 0.0
    f = out["freedom"]
    assert (f["vs"], f["test"], f["best_better"], f["method_better"]) == ("shen2024", "McNemar", 12, 0)
    assert f["delta_vs_best"] == pytest.approx(-0.6) and f["p_paired"] == pytest.approx(2 / 2**12)
    psnr = paired_against_best([_row("a", [20.0, 21.0, 19.0], "psnr"), _row("b", [18.0, 22.0, 17.0], "psnr")])
    assert psnr[0]["test"] == "sign" and (psnr[0]["best_better"], psnr[0]["method_better"]) == (2, 1)
    shifted = _row("late", [1] * 20)
    shifted["per_seed"]["seeds"] = list(range(1, 21))
    with pytest.raises(ValueError, match="seed lists differ"):
        paired_against_best([worse, shifted])


def test_per_seed_outcomes_are_in_seed_order():
    recs = [{"seed": 2, "target": 2, "judge_label": 2, "psnr": 14.0}, {"seed": 0, "target": 0, "judge_label": 5,
            "psnr": 11.0}]  # fmt: skip
    assert per_seed("class-feature", recs) == {"metric": "judge_validity", "seeds": [0, 2], "values": [0, 1]}
    assert per_seed("inpaint", recs)["values"] == [11.0, 14.0]
    assert per_seed("oracle-class", recs) is None


def test_holm_adjusts_by_hand_and_never_reorders():
    # sorted 0.005, 0.01, 0.03, 0.04 → 4·0.005, 3·0.01, 2·0.03, max(2·0.03, 1·0.04): in the input's order
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == [] and holm([0.2]) == [0.2]
    rng = random.Random(1)
    for _ in range(50):
        p = [rng.random() for _ in range(rng.randint(1, 12))]
        adj = holm(p)
        assert all(a >= q for a, q in zip(adj, p, strict=True))  # never below the raw p
        assert all(adj[i] <= adj[j] for i in range(len(p)) for j in range(len(p)) if p[i] < p[j])  # order kept
