"""The convergence study's bookkeeping: which learning rate counts as tuned, and what the READMEs are told."""

import pytest

from benchmarks import convergence as cv


def _runs(losses: dict) -> dict:
    """(method, lr, seed) -> final validation loss, as the records ``collect`` would read."""
    return {key: [{"step": 1500, "val_loss": loss}] for key, loss in losses.items()}


def test_the_rate_is_tuned_on_seed_0_and_seed_1_is_read_at_that_rate_only():
    runs = _runs({
        ("exact", "5e-4", 0): 1.30, ("exact", "5e-4", 1): 1.32,
        ("exact", "2.5e-4", 0): 1.31, ("exact", "1e-3", 0): 1.35, ("exact", "1e-3", 1): 1.29,
        # seed 1 prefers 2e-3, seed 0 prefers 1e-3: the tuned rate is seed 0's, seed 1 is read at it
        ("random-r100", "5e-4", 0): 1.39, ("random-r100", "1e-3", 0): 1.36, ("random-r100", "1e-3", 1): 1.40,
        ("random-r100", "2e-3", 0): 1.42, ("random-r100", "2e-3", 1): 1.10,
        ("prand", "1e-3", 0): 1.42, ("prand", "2e-3", 0): 1.41,
    })  # fmt: skip
    s = cv.summarise(runs)
    assert s["exact"]["best_lr"] == "5e-4" and s["exact"]["bracketed"] and s["exact"]["tuned"]
    r = s["random-r100"]
    assert r["best_lr"] == "1e-3" and r["bracketed"] and r["tuned"]
    assert r["gap"] == pytest.approx({0: 1.36 - 1.30, 1: 1.40 - 1.32})
    assert r["gap_mean"] == pytest.approx((0.06 + 0.08) / 2)
    p = s["prand"]  # best at the edge of two rates, one seed: neither bracketed nor tuned
    assert p["best_lr"] == "2e-3" and not p["bracketed"] and not p["tuned"]
    assert p["gap"] == pytest.approx({0: 1.41 - 1.30})


def test_the_readme_tables_are_rewritten_between_their_markers(tmp_path):
    runs = _runs({
        ("exact", "5e-4", 0): 1.30, ("exact", "5e-4", 1): 1.32,
        (cv.K_SWEEP, "1e-3", 0): 1.36, (cv.K_SWEEP, "1e-3", 1): 1.40,
        (f"{cv.K_SWEEP}-k64", "1e-3", 0): 1.35, (cv.RECOMMENDED, "5e-4", 0): 1.305,
    })  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table (x) -->\nold\n<!-- /table -->\nmiddle\n<!-- k-table (x) -->\nold\n<!-- /k-table -->\nend\n")
    assert cv.write_readmes(cv.summarise(runs), paths=[readme]) == [readme]
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert "| `random`, re-seeded every 100 steps | 1e-3 (0,1) | 1e-3 (one rate) | 1.3600 / 1.4000 |" \
        " +0.060 / +0.080 (mean **+0.070**) |" in text  # fmt: skip
    assert "(recommended)** | 5e-4 (0) | 5e-4 (one rate) | 1.3050 | +0.005 |" in text
    assert "| 64 | 64/384 = 0.167 | 1e-3 (one rate) | 1.3500 | +0.050 |" in text
    assert cv.write_readmes(cv.summarise(runs), paths=[readme]) == []  # nothing changes twice
