"""Scaling laws: the fitter recovers the law that made synthetic losses (approach 3, approach 2, the
baselines), refuses what it cannot fit in one line; a sweep trains its grid once, refuses data that
would repeat, and a killed sweep resumes without redoing its finished runs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("scipy")

from lmstack.data import prepare  # noqa: E402
from lmstack.scaling import laws  # noqa: E402
from lmstack.scaling.sweep import Point, read_results, sweep  # noqa: E402
from lmstack.utils import UserError  # noqa: E402
from tiny import run_cli, tokenizer_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TRUE = laws.Law(E=1.8, A=400.0, B=900.0, alpha=0.35, beta=0.30)


def synthetic(law=TRUE, noise=0.0, seed=0, budgets=(1e13, 3e13, 1e14, 3e14), sizes=(1e5, 3e5, 1e6, 3e6, 1e7)):
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        for n in sizes:
            d = c / (6 * n)
            runs.append({"N": n, "D": d, "C": c, "loss": float(law.loss(n, d) * np.exp(rng.normal(0, noise)))})
    return runs


def cols(runs):
    return [r["N"] for r in runs], [r["D"] for r in runs], [r["loss"] for r in runs]


def test_approach_3_recovers_the_law_that_made_the_losses():
    fit = laws.fit_law(*cols(synthetic()))
    got = vars(fit.law)
    for k, want in vars(TRUE).items():
        assert got[k] == pytest.approx(want, rel=1e-3), k
    assert fit.agree > 1 and fit.starts == 432  # more than one start found the same minimum
    alloc, true = laws.allocation(fit.law, 1e16), laws.allocation(TRUE, 1e16)
    assert alloc["N"] == pytest.approx(true["N"], rel=1e-2)
    assert alloc["tokens_per_param"] == pytest.approx(true["D"] / true["N"], rel=2e-2)


def test_the_allocation_is_the_minimum_at_fixed_compute():
    c = 1e18
    best = laws.allocation(TRUE, c)
    for f in (0.8, 0.95, 1.05, 1.25):
        n = best["N"] * f
        assert TRUE.loss(n, c / 6 / n) > best["loss"]
    assert best["a"] + best["b"] == pytest.approx(1.0)


def test_bootstrap_intervals_cover_the_truth_on_noisy_losses():
    runs = synthetic(noise=0.003, seed=1)
    fit = laws.fit_law(*cols(runs))
    iv = laws.bootstrap(*cols(runs), fit, samples=60, budget=1e16)
    assert iv["samples"] >= 50
    for k in ("alpha", "beta"):
        lo, hi = iv[k]
        assert lo <= vars(TRUE)[k] <= hi and hi - lo < 0.3, (k, lo, hi)
    lo, hi = iv["tokens_per_param"]
    assert lo < laws.allocation(TRUE, 1e16)["tokens_per_param"] < hi


def test_approach_2_finds_each_budgets_best_size():
    sizes = np.geomspace(1e5, 1e8, 13)
    runs = synthetic(budgets=(1e15, 1e16, 1e17), sizes=sizes)
    iso = laws.isoflop_fits(runs)
    for b in iso["budgets"]:
        true = laws.allocation(TRUE, b["C"])
        assert b["inside"] and b["N_opt"] == pytest.approx(true["N"], rel=0.15)
    assert iso["a"] == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.03)


def test_the_baselines_recover_their_own_laws():
    c = np.array([1e12, 1e13, 1e14, 1e15])
    got = laws.fit_compute_law(c, 2.0 + 50.0 * c ** -0.1)
    assert (got["b"], got["c"]) == (pytest.approx(-0.1, rel=1e-3), pytest.approx(2.0, rel=1e-3))
    assert got["predict"](1e16) == pytest.approx(2.0 + 50.0 * 1e16 ** -0.1, rel=1e-4)
    law = laws.Law(1.5, 300.0, 500.0, laws.CHINCHILLA["alpha"], laws.CHINCHILLA["beta"])
    back = laws.fit_with_exponents(*cols(synthetic(law)))
    assert (back.E, back.A, back.B) == (pytest.approx(1.5, rel=1e-6), pytest.approx(300.0, rel=1e-6),
                                        pytest.approx(500.0, rel=1e-6))


def test_what_cannot_be_fitted_is_one_line():
    runs = synthetic()
    with pytest.raises(UserError, match="at least 5 finished runs"):
        laws.fit_law(*cols(runs[3:7]))  # 2 budgets, 3 sizes, 4 runs
    one_size = [r for r in runs if r["N"] == 1e6]
    with pytest.raises(UserError, match="at least 2 model sizes"):
        laws.fit_law(*cols(one_size))
    with pytest.raises(UserError, match="3 budgets"):
        laws.fit_compute_law([1e12, 1e13], [3.0, 2.5])
    assert laws.isoflop_fits(synthetic(sizes=(1e5, 1e6)))["budgets"] == []  # 2 sizes: no parabola
    with pytest.raises(UserError, match="finite loss"):
        laws.fit_law(*cols(runs[:-1] + [{**runs[-1], "loss": float("nan")}]))


# --- the sweep ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaling")
    text = ("Ana was born in Paris on 3 May 1990. Bo works at Acme in Rome; he is 41. "
            "Cy studied physics at Leeds and moved to Oslo. ") * 4
    tok = tokenizer_on(d, text * 20, vocab_size=300)
    docs = d / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{i}: {text}"}) + "\n" for i in range(1200)))
    prepare([docs], tok, d / "data", val_fraction=0.05, progress=False)
    return d / "data"


GRID = ["--depths", "1,2", "--budgets", "2e9,4e9", "--preset", "tiny", "--set", "train.batch_tokens=512",
        "--set", "train.micro_batch_size=8"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_runs(data, tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "lmstack", "scaling", "sweep", "--data", str(data), "--out", str(out), *GRID]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "results.jsonl").is_file() and (out / "results.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before its first result"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    first = read_results(out)
    assert 1 <= len(first) < 4
    done = out / "runs" / first[0]["name"] / "metrics.jsonl"
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    r = run_cli("scaling", "sweep", "--data", data, "--out", out, *GRID, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"4 runs, {len(first)} done, {4 - len(first)} to train" in r.stdout
    rows = read_results(out)
    assert sorted(x["name"] for x in rows) == sorted(Point(d, c, 0).name for d in (1, 2) for c in (2e9, 4e9))
    assert rows[:len(first)] == first and (done.read_bytes(), done.stat().st_mtime_ns) == before  # not redone
    for x in rows:
        assert x["D"] == x["steps"] * 512 and x["C"] == x["D"] * x["flops_per_token"]
        assert abs(x["C"] / x["C_target"] - 1) < 0.6 and x["loss"] > 0 and x["N_ne"] < x["N"]
    again = run_cli("scaling", "sweep", "--data", data, "--out", out, *GRID, timeout=120)
    assert again.returncode == 0 and "4 done, 0 to train" in again.stdout


def test_a_sweep_refuses_repeated_data_other_settings_and_unknown_runs(data, tmp_path):
    with pytest.raises(UserError, match="would repeat data"):
        sweep(data, tmp_path / "s", [1], [1e13], preset="tiny")
    assert not (tmp_path / "s").exists()
    sweep(data, tmp_path / "s", [1], [2e9], preset="tiny", overrides=["train.batch_tokens=512"])
    with pytest.raises(UserError, match="another overrides"):
        sweep(data, tmp_path / "s", [1], [2e9], preset="tiny")
    with pytest.raises(UserError, match="--only d9"):
        sweep(data, tmp_path / "s", [1], [2e9], preset="tiny", overrides=["train.batch_tokens=512"],
              only="d9-c2e09-s0")
    r = run_cli("scaling", "fit", "--sweep", tmp_path / "s")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "at least 2 model sizes" in r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path / "s" / "runs") == ["d1-c2e09-s0"]


@pytest.mark.slow
def test_fit_predict_and_plot_on_a_small_sweep(data, tmp_path):
    from lmstack.scaling.analyse import fit_sweep, plot, predict

    out = tmp_path / "sweep"
    sets = ["train.batch_tokens=512", "train.micro_batch_size=8"]
    sweep(data, out, [1, 2, 3], [2e9, 4e9], preset="tiny", overrides=sets)
    fit = fit_sweep(out, samples=5, quiet=True)
    assert set(fit["fits"]) == {"N", "N_ne"} and fit["runs"] == 6
    assert (out / "fit.json").is_file() and fit["fits"]["N"]["starts_agreeing"] >= 1
    res = predict(out, 1.2e10, seeds=2, quiet=True)
    assert res["fitted_runs"] == 6 and res["budget"] / res["largest_fitted_budget"] == pytest.approx(3.0)
    assert len(res["measured"]["losses"]) == 2 and res["measured"]["seed_std"] is not None
    assert res["error"] == pytest.approx(res["predicted"]["loss"] - res["measured"]["mean"])
    assert set(res["measured"]["by_depth"]) >= {res["predicted"]["depth"]}
    assert res["baselines"]["chinchilla_exponents"]["law"]["alpha"] == laws.CHINCHILLA["alpha"]
    trained = [r for r in read_results(out) if r["C_target"] == 1.2e10]
    assert sorted(r["seed"] for r in trained if r["depth"] == res["predicted"]["depth"]) == [0, 1]
    files = plot(out)
    assert [f.name for f in files] == ["isoflop.png", "frontier.png", "predicted.png", "report.md"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files[:3])
    report = (out / "report.md").read_text()
    assert "| the law fitted here (approach 3) |" in report and "Chinchilla (Hoffmann et al. 2022)" in report
    with pytest.raises(UserError, match="at most a third"):
        predict(out, 5e9, quiet=True)


def test_grid_mistakes_are_refused_before_anything_trains(data, tmp_path):
    assert Point(1, 1e9, 0).name != Point(1, 1.4e9, 0).name  # close budgets, distinct runs
    with pytest.raises(UserError, match="one optimizer step of depth 2"):  # too small to be this budget
        sweep(data, tmp_path / "s", [2], [1e8], preset="tiny")
    with pytest.raises(UserError, match="--aspect and --head-dim"):
        sweep(data, tmp_path / "s", [1], [2e9], preset="tiny", head_dim=0)
    novals = tmp_path / "noval"
    prepare([data.parent / "docs.jsonl"], data, novals, val_fraction=0.0, progress=False)
    with pytest.raises(UserError, match="no validation split"):
        sweep(novals, tmp_path / "s", [1], [2e9], preset="tiny")
    assert not (tmp_path / "s").exists()
    far = laws.Law(E=1.0, A=1e-300, B=1e300, alpha=0.01, beta=0.01)  # a resample's law can be this extreme
    assert laws.allocation(far, 1e13)["N"] in (0.0, float("inf"))  # no ZeroDivisionError
    under = laws.Law(E=1e-9, A=0.0, B=12.2, alpha=3.0, beta=0.127)  # A = exp(a) underflowed (seen on an AMD CPU)
    assert laws.allocation(under, 4e9)["N"] == 0.0  # no math domain error
