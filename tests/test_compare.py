"""``lab compare`` and its statistics: IQM, bootstrap intervals and the probability of improvement
checked against cases worked out by hand; grouping runs by configuration; the command's output.

The runs here are written by hand (``config.json`` and ``metrics.json``), no training: the
statistics and the grouping are under test, not PPO.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents.ppo import PPOConfig
from core.files import atomic_write_json
from core.runs import write_run_config
from lab import cli
from sweep import stats
from sweep.runs import METRICS, common_curves, find_run_dirs, group_runs, load_run
from sweep.spec import SweepError

# ---------------------------------------------------------------------------------------------
# Statistics, by hand
# ---------------------------------------------------------------------------------------------


def test_iqm_is_the_mean_of_the_middle_half():
    # 8 scores: a quarter (2) cut at each end -> mean of 3, 4, 5, 6
    assert stats.iqm(np.array([1, 2, 3, 4, 100, 5, 6, 7])) == 4.5
    assert stats.iqm(np.array([3.0, 1.0, 2.0])) == 2.0  # 3 scores: nothing to cut (a quarter of 3 < 1)


def test_bootstrap_intervals_match_the_hand_computed_resampling_distribution():
    """Scores (0, 0, 0, 10), resampled 4 of 4 with replacement: the number k of tens is
    Binomial(4, 1/4): P(k=0..4) = 81, 108, 54, 12, 1 (/256).

    Mean = 2.5 k: P(mean <= 5) = 243/256 = 0.949 < 0.975 <= P(mean <= 7.5) = 255/256, so the 95%
    percentile interval is [0, 7.5]. IQM (the middle two of four sorted) = 0 for k <= 1, 5 for
    k = 2, 10 for k >= 3: P(IQM <= 5) = 0.949 < 0.975, so [0, 10]; the IQM itself is 0.
    """
    scores = np.array([0.0, 0.0, 0.0, 10.0])
    assert stats.mean_interval(scores, reps=5000) == (2.5, 0.0, 7.5)
    assert stats.iqm_interval(scores, reps=5000) == (0.0, 0.0, 10.0)


def test_a_two_run_curve_band_spans_both_runs():
    """Two runs resampled 2 of 2: means 0, 1/2, 1/2, 1 at every point -> band [0, 1] around 1/2."""
    curves = np.array([[0.0] * 5, [1.0] * 5])
    mean, low, high = stats.curve_band(curves, reps=4000)
    assert np.allclose(mean, 0.5) and np.allclose(low, 0.0) and np.allclose(high, 1.0)
    flat = stats.curve_band(np.full((3, 4), 7.0), reps=200)
    assert all(np.allclose(part, 7.0) for part in flat)


def test_probability_of_improvement_by_hand():
    """X = (1, 2, 3), Y = (0, 1, 2): of the 9 pairs X wins 6 and ties 3 -> (6 + 3/2) / 9 = 7/9."""
    x, y = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0])
    assert stats.probability_of_improvement(x, y) == pytest.approx(7 / 9)
    assert stats.probability_of_improvement(y, x) == pytest.approx(2 / 9)
    assert stats.probability_of_improvement(x, x) == 0.5
    interval = stats.improvement_interval(x, y, reps=2000)
    assert interval.point == pytest.approx(7 / 9) and 0.0 <= interval.low < 7 / 9 < interval.high <= 1.0
    # every run of X above every run of Y, in every resample: certain
    assert stats.improvement_interval(x + 10, y, reps=500) == (1.0, 1.0, 1.0)


def test_the_fast_pairwise_statistic_is_rlibles_own():
    from rliable import metrics

    rng = np.random.default_rng(0)
    for _ in range(100):
        x = rng.integers(0, 4, size=(int(rng.integers(1, 6)), 1)).astype(float)
        y = rng.integers(0, 4, size=(int(rng.integers(1, 6)), 1)).astype(float)
        assert stats._pairwise_improvement(x, y)[0] == pytest.approx(metrics.probability_of_improvement(x, y))


def test_intervals_are_reproducible_and_leave_numpys_generator_alone():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    scores = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    first = stats.iqm_interval(scores, reps=300, seed=5)
    assert np.random.random() == expected
    assert stats.iqm_interval(scores, reps=300, seed=5) == first


# ---------------------------------------------------------------------------------------------
# Runs written by hand: two configurations x three seeds
# ---------------------------------------------------------------------------------------------


def write_run(run_dir: Path, learning_rate: float, seed: int, final: float | None, level: float) -> Path:
    """A PPO CartPole run whose training curve rises to ``level`` and whose final greedy return is
    ``final`` (None: unfinished, no metrics.json)."""
    run_dir.mkdir(parents=True)
    config = PPOConfig(env="cartpole", learning_rate=learning_rate, seed=seed, device="cpu")
    write_run_config(run_dir, "algo", "ppo", config)
    if final is not None:
        history = [{"step": step, "return_mean": level * step / 1000} for step in range(100, 1001, 100)]
        history.insert(0, {"step": 50, "return_mean": None})  # no episode finished yet
        atomic_write_json(
            run_dir / "metrics.json", {"eval_return_mean": final, "steps": 1000, "history": history}
        )
    return run_dir


@pytest.fixture
def two_configs(tmp_path) -> list[Path]:
    runs = []
    for seed, (good, poor) in enumerate([(500.0, 120.0), (480.0, 150.0), (500.0, 90.0)], start=1):
        runs.append(write_run(tmp_path / f"good-{seed}", 1e-3, seed, good, level=400 + seed))
        runs.append(write_run(tmp_path / f"poor-{seed}", 1e-4, seed, poor, level=100 + seed))
    return runs


def test_runs_group_by_configuration_without_the_seed(two_configs, tmp_path):
    write_run(tmp_path / "unfinished", 1e-3, 9, None, 0)
    dirs = find_run_dirs([str(p) for p in two_configs] + [str(tmp_path / "unfinished")])
    runs = [r for r in map(load_run, dirs) if r is not None]
    assert len(runs) == 6
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["learning_rate=0.001", "learning_rate=0.0001"]
    metric = METRICS["return_mean"]
    assert groups[0].scores(metric).tolist() == [500.0, 480.0, 500.0]
    steps, values = common_curves(groups[0], metric, points=10)
    assert steps[0] == 100 and steps[-1] == 1000 and values.shape == (3, 10)  # the None record left out
    assert values[:, -1].tolist() == [401.0, 402.0, 403.0]
    with pytest.raises(SweepError, match="neither a run directory"):
        find_run_dirs([str(tmp_path)])
    with pytest.raises(SweepError, match="does not exist"):
        find_run_dirs([str(tmp_path / "nope")])


def run_main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_prints_iqm_intervals_and_the_probability_of_improvement(two_configs, tmp_path, capsys):
    out_png = tmp_path / "curves.png"
    argv = ["compare", *map(str, two_configs), "--out", str(out_png), "--reps", "500", "--json"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    good, poor = summary["groups"]
    assert good["label"] == "learning_rate=0.001" and len(good["runs"]) == 3
    assert good["iqm"] == pytest.approx(493.333, abs=1e-3)  # three runs: the IQM is their mean
    assert good["iqm_ci"] == [480.0, 500.0] and poor["iqm_ci"][0] >= 90.0 and poor["iqm_ci"][1] <= 150.0
    assert summary["improvement"] == [
        {"x": good["label"], "y": poor["label"], "probability": 1.0, "ci": [1.0, 1.0]}
    ]
    assert "P(#1 > #2) = 1.00 [1.00, 1.00]" in out and "IQM" in out and "95% CI" in out
    assert out_png.stat().st_size > 10_000


def test_compare_takes_a_sweep_directory(tmp_path, capsys):
    from sweep.spec import new_sweep, write_sweep
    from sweep.trials import trial_dir

    plan = new_sweep("cartpole", "ppo", ["learning_rate=grid:1e-3,1e-4"], seeds=2, samples=1, steps=1000)
    write_sweep(tmp_path, plan)
    for configuration, seed in plan.trials():
        final = None if seed == 2 and configuration.params["learning_rate"] == 1e-4 else 100.0 * seed
        write_run(
            trial_dir(tmp_path, configuration.key, seed),
            configuration.params["learning_rate"],
            seed,
            final,
            50,
        )
    code, out, err = run_main(
        ["compare", str(tmp_path), "--out", str(tmp_path / "c.png"), "--reps", "200"], capsys
    )
    assert code == 0, err
    assert "3 runs in 2 groups" in out and "left out 1 unfinished runs" in out


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["@root"], "neither a run directory"),
        (["@run", "--out", "curves.jpg"], "must name a .png"),
        (["@run", "--out", "/nonexistent/dir/c.png"], "does not exist"),
        (["@run", "--metric", "clear_rate"], "no finished run with a final clear_rate"),
        (["@unfinished"], "no finished run"),
        (["@run", "--reps", "5"], "at least 100"),
    ],
)
def test_bad_compare_input_exits_2_with_one_line(extra, fragment, tmp_path, capsys):
    paths = {
        "@root": tmp_path,
        "@run": write_run(tmp_path / "run", 1e-3, 1, 500.0, 400),
        "@unfinished": write_run(tmp_path / "unfinished", 1e-3, 1, None, 0),
    }
    argv = ["compare", *(str(paths.get(a, a)) for a in extra)]
    code, out, err = run_main(argv, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
