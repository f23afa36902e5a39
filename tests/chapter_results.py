"""The key numbers each chapter wrote on the ``ci`` profile fall in sane ranges.

Run after the chapters (``make test`` runs it right after the chapters' nbval pass; by hand:
``make run PROFILE=ci`` then ``pytest tests/chapter_results.py``). It is not named ``test_*.py``
so that the unit-test pass, which runs *before* the chapters, does not collect it.

Each chapter's last cell (``saelib.checks``) asserts its invariants and writes
``runs/ci/results/<chapter>.json``. Here every file must exist, be newer than the chapter it
comes from and than the library code (results left over from older code do not count), report
all its invariants as holding, and hold numbers in the ranges below: loose enough for the tiny
ci runs, tight enough that a broken metric (NaN, a negative variance, L0 above k, an FVE above
1, a stitched path that does not start at S) fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from saelib.runs import chapters, repo_root

ROOT = repo_root()
RESULTS = ROOT / "runs" / "ci" / "results"
PREPARED = ROOT / "_build" / "ci-notebooks"


def _newest_code_mtime() -> float:
    return max(p.stat().st_mtime for p in (ROOT / "saelib").rglob("*.py"))


def load(stem: str) -> dict:
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: chapter {stem} did not run on the ci profile (or its last cell did not)")
    doc = json.loads(path.read_text())
    made = path.stat().st_mtime
    src = PREPARED / f"{stem}.ipynb"
    ref = src if src.exists() else ROOT / "notebooks" / f"{stem}.md"
    assert made >= ref.stat().st_mtime, f"{path} is older than {ref}: results of an earlier run"
    assert made >= _newest_code_mtime(), f"{path} is older than the saelib code: results of older code"
    failed = [n for n, c in doc["checks"].items() if not c["ok"]]
    assert doc["all_ok"] and not failed, f"{stem}: invariants failed: {failed}"
    return doc["numbers"]


def finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def test_every_chapter_wrote_results():
    for stem in chapters():
        load(stem)


def test_00_introduction():
    n = load("00_introduction")
    assert n["n_chapters"] == len(chapters())


def test_01_residual_stream():
    n = load("01_residual_stream")
    med = n["median_norm_by_layer"]
    assert len(med) == n["n_layers"] and all(finite(m) and m > 0 for m in med)
    assert med[-1] > med[1], "the residual norm grows with depth"
    assert n["bos_ratio_max"] > 2
    assert 0 <= n["harvest_max_err"] < 1e-3 * max(med)


def test_02_theory():
    n = load("02_theory")
    for key, e in n["epsilon"].items():
        assert e["welch"] <= e["rms"] <= 1.3 * e["welch"], key  # random rows sit near the Welch floor in RMS
        assert e["rms"] < e["max"] < 1, key
    for key, r in n["median_ratio_random_codes"].items():
        assert abs(r - 1) < 0.05, key
    z = n["zf_median_ratio"]
    assert abs(z["random"] - 1) < 0.05
    assert z["coherent a=0.01"] < z["coherent a=0.002"] < 1


def test_03_training():
    n = load("03_training")["saes"]
    assert n
    for name, s in n.items():
        assert 0 < s["nmse"] < 1.0, name
        assert finite(s["fvu"]) and 0 < s["fvu"] < 3.0, name  # ci SAEs see 4k tokens: FVU can exceed 1
        assert s["train_nmse_last"] < s["train_nmse_first"], name
        if s["activation"] == "topk":  # k, or fewer on tokens with fewer positive pre-activations
            assert 0.5 * s["k"] < s["l0"] <= s["k"], name
        if s["activation"] == "topafa":
            assert 1 <= s["l0"] < 128, name
    assert {s["activation"] for s in n.values()} >= {"topk", "batchtopk", "topafa"}


def test_04_evaluation():
    n = load("04_evaluation")["saes"]
    assert n
    for name, s in n.items():
        assert 0 < s["nmse"] < 1.0 and 0 < s["fvu"] < 3.0, name
        if s["activation"] == "topk":
            assert 0.5 * s["k"] < s["l0"] <= s["k"], name
        assert s["kl_sae"] >= 0 and finite(s["ce_recovered_zero"], s["ce_recovered_mean"]), name
        assert -1.0 < s["ce_recovered_zero"] <= 1.05, name
        assert s["kl_score"] <= 1.0, name
        assert 0 <= s["dead"] and 0 <= s["dense"], name


def test_05_stitching():
    n = load("05_stitching")
    assert n["path_starts"]
    for key, p in n["path_starts"].items():
        assert p["start_mse"] == pytest.approx(p["mse_S"], rel=1e-4), key
    for key, p in n["pairs"].items():
        assert 0 <= p["frac_novel"] <= 1 and p["alive_large"] > 0, key
    for key, t in n["trained"].items():
        assert 0 < t["fvu"] < 1.0 and t["l0"] > 0, key


def test_06_meta_saes():
    n = load("06_meta_saes")
    assert 0 < n["fve_batch"] <= 1 and n["fve_threshold"] <= 1
    if n["fve_random_batch"] is not None:  # a meta-SAE explains some variance of any row set
        assert 0 < n["fve_random_batch"] < 1
        assert n["fve_excess_over_random"] == pytest.approx(n["fve_batch"] - n["fve_random_batch"])
    assert n["d_meta"] < n["n_rows"]
