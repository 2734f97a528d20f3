"""tools/scaling_law.py: the fit recovers known parameters, the optimum matches a brute-force scan,
malformed CSVs are refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import load_tool, run_cli

sl = load_tool("scaling_law")

TRUE = sl.Law(E=1.7, B=250.0, C=3.0, alpha=0.32, beta=0.9)
SIZES = np.geomspace(3e7, 3e9, 6)
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7)


def synthetic_rows(law=TRUE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([(n, s, law.loss(n, s) * np.exp(rng.normal(0, noise) if noise else 0.0))
                     for n in SIZES for s in SPARSITIES])


def write_csv(path, rows, bits=None):
    lines = ["params,sparsity,loss" + (",bits" if bits is not None else "")]
    lines += [f"{n},{s},{loss}" + (f",{bits}" if bits is not None else "") for n, s, loss in rows]
    path.write_text("\n".join(lines) + "\n")


def test_fit_recovers_known_parameters_exactly_without_noise():
    law, objective = sl.fit_law(synthetic_rows())
    for k in sl.PARAM_NAMES:  # stated tolerance: 1e-4 relative
        assert getattr(law, k) == pytest.approx(getattr(TRUE, k), rel=1e-4), k
    assert objective < 1e-12


def test_fit_with_noise_stays_close_and_predicts_well():
    rows = synthetic_rows(noise=0.002, seed=1)
    law, _ = sl.fit_law(rows)
    assert law.E == pytest.approx(TRUE.E, rel=0.02)
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.05)
    pred = law.loss(rows[:, 0], rows[:, 1])
    assert np.abs(np.log(pred) - np.log(rows[:, 2])).max() < 0.01


def test_optimum_matches_brute_force_scan():
    for law in (TRUE, sl.Law(E=2.0, B=40.0, C=0.8, alpha=0.28, beta=1.3),
                sl.Law(E=1.0, B=10.0, C=5.0, alpha=0.5, beta=0.2)):
        grid = np.linspace(0.0, 0.999, 400001)
        brute = grid[np.argmin(sl._reduced_loss(law, grid))]
        assert sl.optimal_sparsity(law) == pytest.approx(brute, abs=1e-5)
        # independent of N_a: the full loss at fixed N_a is minimised at the same S
        n_a = 1e9
        full = law.E + sl._reduced_loss(law, grid) / n_a ** law.alpha
        assert grid[np.argmin(full)] == pytest.approx(brute, abs=1e-5)


def test_fit_cli_with_bits_groups_plot_and_json(tmp_path):
    csv_path, png, out = tmp_path / "runs.csv", tmp_path / "fit.png", tmp_path / "fit.json"
    full = synthetic_rows()
    ternary = synthetic_rows(sl.Law(E=1.9, B=300.0, C=1.0, alpha=0.3, beta=1.5))
    lines = ["params,sparsity,loss,bits"]
    lines += [f"{n},{s},{loss},16" for n, s, loss in full]
    lines += [f"{n},{s},{loss},1.58" for n, s, loss in ternary]
    csv_path.write_text("\n".join(lines) + "\n")
    opt_png = tmp_path / "optimum.png"
    proc = run_cli(["tools/scaling_law.py", "fit", "--csv", str(csv_path), "--bootstrap", "5",
                    "--plot", str(png), "--plot-optimum", str(opt_png), "--output", str(out)])
    assert "16-bit weights: 36 runs" in proc.stdout and "1.58-bit weights: 36 runs" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fitted = json.loads(out.read_text())
    assert fitted["16"]["params"]["alpha"] == pytest.approx(0.32, rel=1e-3)
    assert fitted["1.58"]["params"]["beta"] == pytest.approx(1.5, rel=1e-3)
    assert set(fitted["16"]["ci95"]) == set(sl.PARAM_NAMES) | {"S*", "N/N_a"}
    s_star = sl.optimal_sparsity(sl.Law(E=1.9, B=300.0, C=1.0, alpha=0.3, beta=1.5))
    assert fitted["1.58"]["optimal_sparsity"] == pytest.approx(s_star, abs=1e-3)
    assert fitted["1.58"]["size_over_activated"] == pytest.approx(1 / (1 - s_star), rel=1e-2)
    assert f"inference-optimal sparsity S* = {s_star:.2%}, 95% interval [" in proc.stdout
    assert opt_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bootstrap_intervals_of_the_optimum_cover_the_truth_under_noise():
    rows = synthetic_rows(noise=0.003, seed=3)
    law, _ = sl.fit_law(rows)
    ci = sl.intervals(sl.bootstrap(rows, law, samples=40, seed=0))
    truth = sl.optimal_sparsity(TRUE)
    assert ci["S*"][0] <= truth <= ci["S*"][1]
    assert ci["N/N_a"] == pytest.approx((1 / (1 - ci["S*"][0]), 1 / (1 - ci["S*"][1])))
    assert ci["alpha"][0] <= TRUE.alpha <= ci["alpha"][1]


def test_optimum_cli(tmp_path):
    png = tmp_path / "opt.png"
    proc = run_cli(["tools/scaling_law.py", "optimum", "--alpha", "0.32", "--B", "250", "--C", "3",
                    "--beta", "0.9", "--plot", str(png)])
    s_star = sl.optimal_sparsity(TRUE)
    assert f"S* = {s_star:.4%}" in proc.stdout
    assert f"N = {1 / (1 - s_star):.3f} x activated N_a" in proc.stdout
    assert png.exists()


@pytest.mark.parametrize("text,needle", [
    ("", "empty file"),
    ("params,loss\n1e6,3.0\n", "no 'sparsity' column"),
    ("params,sparsity,loss\n1e6,0.5,abc\n", ":2: loss 'abc' is not a number"),
    ("params,sparsity,loss\n1e6,0.5,3\n2e6,1.2,3\n", ":3: sparsity 1.2 is outside [0, 1)"),
    ("params,sparsity,loss\n-5,0.5,3\n", ":2: params must be positive"),
    ("params,sparsity,loss\n1e6,0.5\n", ":2: 2 fields, header has 3"),
    ("params,sparsity,loss\n1e6,0.5,nan\n", ":2: loss is nan"),
    ("params,sparsity,loss\n1e6,0.5,3\n2e6,0.5,2.9\n", "2 runs cannot determine 5 parameters"),
])
def test_malformed_csv_is_refused_clearly(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    proc = run_cli(["tools/scaling_law.py", "fit", "--csv", str(path), "--bootstrap", "0"],
                   check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


def test_runs_collects_summaries(tmp_path):
    for i, (n, s, loss) in enumerate([(1e6, 0.0, 4.0), (2e6, 0.4, 3.8)]):
        d = tmp_path / "runs" / f"r{i}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(
            {"non_embedding_parameters": n, "sparsity_ratio": s, "valid_loss": loss, "bits": 16}))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "summary.json").write_text(json.dumps({"valid_loss": None}))
    out = tmp_path / "runs.csv"
    proc = run_cli(["tools/scaling_law.py", "runs", "--dir", str(tmp_path / "runs"),
                    "--output", str(out)])
    assert "2 runs" in proc.stdout and "1 skipped" in proc.stdout
    rows = sl.read_runs(str(out))[16.0]
    assert rows.tolist() == [[1e6, 0.0, 4.0], [2e6, 0.4, 3.8]]


def test_a_vanishing_irreducible_loss_is_flagged_not_reported_as_determined(tmp_path):
    # losses far above the irreducible loss: a pure power law (E = 0) generated them
    pure = sl.Law(E=0.0, B=9.0, C=0.3, alpha=0.05, beta=0.5)
    rows = synthetic_rows(pure)
    law, _ = sl.fit_law(rows)
    assert sl.e_at_zero(law, rows) and not sl.e_at_zero(sl.fit_law(synthetic_rows())[0],
                                                         synthetic_rows())
    csv_path, out = tmp_path / "runs.csv", tmp_path / "fit.json"
    write_csv(csv_path, rows)
    proc = run_cli(["tools/scaling_law.py", "fit", "--csv", str(csv_path), "--bootstrap", "3",
                    "--output", str(out)])
    e_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("E "))
    assert "AT 0: not identified" in e_line
    assert "E went to 0" in proc.stderr
    assert json.loads(out.read_text())["16"]["E_at_zero"] is True
