"""``lab sweep``: SPEC parsing, the plan, one trial without Ray, results, bad input, and on Ray a
sweep whose driver is killed with SIGKILL and resumed.

The fast tests never start Ray: a trial (:func:`sweep.trials.run_trial`) is driven with a plain
``report`` function, and the command line's errors are raised before Ray starts (an unreachable
address is refused by a TCP probe). The end-to-end test runs ``lab sweep`` in subprocesses, each
with its own local Ray, and is marked slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agents import load_agent
from lab import cli
from lab import sweep as sweep_command
from sweep import spec as sweep_spec
from sweep.results import collect, format_table, rank, write_results
from sweep.spec import SweepError, draw_configurations, new_sweep, parse_param, read_sweep, write_sweep
from sweep.trials import (
    FINISHED,
    SKIPPED,
    STOPPED,
    TrialRecord,
    read_evals,
    run_trial,
    sweep_lock,
    trial_dir,
    trial_lock,
)

ROOT = Path(__file__).resolve().parent.parent


def ppo_config_class():
    from agents.ppo import PPOConfig

    return PPOConfig


# ---------------------------------------------------------------------------------------------
# SPECs
# ---------------------------------------------------------------------------------------------


def test_specs_parse_by_the_fields_type():
    config = ppo_config_class()
    lr = parse_param("learning_rate=loguniform:1e-5:1e-3", config)
    assert (lr.kind, lr.low, lr.high, lr.integer) == ("loguniform", 1e-5, 1e-3, False)
    steps = parse_param("num_steps=choice:64,128,256", config)
    assert steps.values == (64, 128, 256) and all(type(v) is int for v in steps.values)
    hidden = parse_param("hidden=grid:(64,64),(128,128)", config)
    assert hidden.values == ((64, 64), (128, 128))
    assert parse_param("memory=choice:none,gru", config).values == ("none", "gru")
    assert parse_param("norm_adv=choice:true,false", config).values == (True, False)
    assert parse_param("num-minibatches=randint:1:4", config).name == "num_minibatches"
    assert parse_param("target_kl=uniform:0.01:0.05", config).kind == "uniform"  # float | None


def test_draws_stay_in_range_and_integer_fields_draw_integers():
    config = ppo_config_class()
    rng = np.random.default_rng(0)
    for text, low, high in [("num_steps=loguniform:16:256", 16, 256), ("num_minibatches=randint:1:4", 1, 4)]:
        spec = parse_param(text, config)
        draws = [spec.sample(rng) for _ in range(200)]
        assert all(type(d) is int and low <= d <= high for d in draws)
        if spec.kind == "randint":
            assert set(draws) == {1, 2, 3, 4}  # both ends included
    lr = parse_param("learning_rate=loguniform:1e-5:1e-3", config)
    draws = np.array([lr.sample(rng) for _ in range(2000)])
    assert draws.min() >= 1e-5 and draws.max() <= 1e-3
    # log-uniform: as many draws below the geometric middle (1e-4) as above it
    assert 0.45 < (draws < 1e-4).mean() < 0.55


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("learning_rate", "NAME=SPEC"),
        ("learning_rate=loguniform:1e-5", "two bounds"),
        ("learning_rate=normal:0:1", "malformed SPEC"),
        ("learning_rate=loguniform:0:1e-3", "0 < LO"),
        ("learning_rate=uniform:1e-3:1e-5", "LO must be below HI"),
        ("learning_rate=uniform:a:b", "expects a number"),
        ("learnig_rate=uniform:0.1:0.2", "did you mean learning_rate"),
        ("gamma=uniform:0.9:1.5", "<= 1.0"),
        ("num_steps=choice:64,abc", "expects an integer"),
        ("num_steps=choice:64,,128", "empty value"),
        ("hidden=loguniform:1:2", "numeric field"),
        ("learning_rate=randint:1:4", "integer field"),
        ("memory=choice:none,mamba", "choose from"),
        ("seed=choice:1,2", "--seeds"),
        ("env=choice:cartpole,acrobot", "PRESET_OR_ENV"),
        ("total_steps=choice:1000,2000", "--steps"),
    ],
)
def test_bad_specs_are_one_line_errors(text, fragment):
    with pytest.raises(SweepError) as error:
        parse_param(text, ppo_config_class())
    message = str(error.value)
    assert fragment in message and "\n" not in message


def test_configurations_are_the_grid_times_the_draws_and_reproducible():
    config = ppo_config_class()
    specs = [
        parse_param("gamma=grid:0.9,0.99", config),
        parse_param("learning_rate=loguniform:1e-4:1e-3", config),
    ]
    first = draw_configurations(specs, samples=3, seed=0)
    assert len(first) == 6
    assert [c.params["gamma"] for c in first] == [0.9, 0.9, 0.9, 0.99, 0.99, 0.99]
    assert [c.key for c in draw_configurations(specs, samples=3, seed=0)] == [c.key for c in first]
    assert [c.key for c in draw_configurations(specs, samples=3, seed=1)] != [c.key for c in first]
    # a grid alone is taken once; a small choice space repeats itself and is deduplicated
    assert len(draw_configurations(specs[:1], samples=5, seed=0)) == 2
    assert len(draw_configurations([parse_param("gamma=choice:0.9,0.99", config)], samples=20, seed=0)) == 2
    assert len(draw_configurations([], samples=4, seed=0)) == 1  # seeds of the base config only
    assert first[0].label().startswith("gamma=0.9 learning_rate=")


# ---------------------------------------------------------------------------------------------
# The plan: new_sweep and sweep.json
# ---------------------------------------------------------------------------------------------


def small_plan(**changes) -> sweep_spec.SweepSpec:
    values = dict(
        env="cartpole", algo="ppo", params=["learning_rate=grid:1e-3,3e-4"], seeds=2, samples=1, steps=1024,
        sets=["eval_episodes=2", "num_envs=4"],
    )  # fmt: skip
    values.update(changes)
    return new_sweep(**values)


def test_a_plan_gives_trials_one_core_evals_and_checkpoints():
    plan = small_plan()
    assert plan.base["threads"] == 1 and plan.base["eval_every"] == 1024 // sweep_spec.EVALS_PER_TRIAL
    assert plan.base["checkpoint_every"] == plan.base["eval_every"]
    assert plan.base["eval_episodes"] == 2 and "seed" not in plan.base
    assert plan.seeds == (1, 2) and len(plan.trials()) == 4
    module, config = plan.trial_config(plan.configurations[1], 2)
    assert (module.ALGO, config.learning_rate, config.seed, config.total_steps) == ("ppo", 3e-4, 2, 1024)
    later = small_plan(sets=["seed=7", "eval_every=300", "threads=2"], seeds=3)
    assert later.seeds == (7, 8, 9) and later.base["eval_every"] == 300 and later.base["threads"] == 2


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"metric": "clear_rate"}, "Mario presets only"),
        ({"sets": ["eval_every=0"]}, "periodic evaluations"),
        ({"sets": ["env=acrobot"]}, "PRESET_OR_ENV"),
        ({"sets": ["nosuchkey=1"]}, "unknown config key"),
        ({"params": ["num_minibatches=grid:1,1000"]}, "is invalid"),
        ({"params": ["gamma=grid:0.9", "gamma=grid:0.99"]}, "given twice"),
        ({"env": "nosuchenv"}, "nosuchenv"),
    ],
)
def test_bad_plans_are_refused(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        small_plan(**changes)


def test_sweep_json_round_trip_and_what_is_not_a_sweep(tmp_path):
    plan = small_plan(params=["hidden=grid:(8,8),(16,)"])
    write_sweep(tmp_path, plan)
    again = read_sweep(tmp_path)
    assert again == as_json_gives_it_back(plan)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepError, match="not a sweep directory"):
        read_sweep(tmp_path / "empty")
    with pytest.raises(SweepError, match="does not exist"):
        read_sweep(tmp_path / "missing")
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep_format_version": 99}))
    with pytest.raises(SweepError, match="sweep format 99"):
        read_sweep(tmp_path)
    (tmp_path / "sweep.json").write_text("{")
    with pytest.raises(SweepError, match="unreadable"):
        read_sweep(tmp_path)


def as_json_gives_it_back(plan: sweep_spec.SweepSpec) -> sweep_spec.SweepSpec:
    """``plan`` as JSON gives it back: tuples inside the values become lists."""
    return sweep_spec.SweepSpec.from_json(json.loads(json.dumps(plan.to_json())))


# ---------------------------------------------------------------------------------------------
# One trial, without Ray: stopped by the scheduler, resumed, finished, never trained again
# ---------------------------------------------------------------------------------------------


def test_a_trial_stops_resumes_finishes_and_is_not_trained_twice(tmp_path):
    plan = small_plan(params=["learning_rate=grid:1e-3"], seeds=1)
    write_sweep(tmp_path, plan)
    key, seed = plan.configurations[0].key, 1
    run_dir = trial_dir(tmp_path, key, seed)
    seen = []

    def stop_at_second(point):
        seen.append(point)
        return len(seen) < 2

    assert run_trial(tmp_path, key, seed, stop_at_second) is None
    record = TrialRecord.read(run_dir)
    assert record.status == STOPPED and [a.outcome for a in record.attempts] == [STOPPED]
    stopped_at = seen[-1]["step"]
    # a stopped trial is a loadable run: it saved a checkpoint at the evaluation that stopped it
    assert load_agent(run_dir).policy is not None
    assert (
        sorted(p.name for p in (run_dir / "checkpoints").glob("*.json"))[-1] == f"step_{stopped_at:012d}.json"
    )
    assert [p["step"] for p in read_evals(run_dir)] == [p["step"] for p in seen]

    final = run_trial(tmp_path, key, seed, lambda point: True)  # resumed from that checkpoint
    record = TrialRecord.read(run_dir)
    assert record.status == FINISHED and record.attempts[1].from_step == stopped_at
    assert final["finished"] and final["step"] == 1024 and final == record.final
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_return_mean"] == final["return_mean"]
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns

    def never(point):
        raise AssertionError("a finished trial must not train")

    assert run_trial(tmp_path, key, seed, never) == final
    record = TrialRecord.read(run_dir)
    assert record.trainings == 2 and record.attempts[-1].outcome == SKIPPED
    assert (run_dir / "metrics.json").stat().st_mtime_ns == mtime


def test_a_failing_trial_records_its_error(tmp_path):
    plan = small_plan(params=[], seeds=1)
    write_sweep(tmp_path, plan)
    key = plan.configurations[0].key

    def broken(point):
        raise RuntimeError("the scheduler\nbroke")

    with pytest.raises(Exception, match="broke"):
        run_trial(tmp_path, key, 1, broken)
    record = TrialRecord.read(trial_dir(tmp_path, key, 1))
    assert record.status == "error" and "the scheduler broke" in record.error


def test_one_process_per_trial_and_per_sweep(tmp_path):
    with trial_lock(tmp_path), pytest.raises(SweepError, match="in use"), trial_lock(tmp_path, wait=0.2):
        pass
    busy = f"another `lab sweep` \\(pid {os.getpid()}\\)"
    with sweep_lock(tmp_path), pytest.raises(SweepError, match=busy), sweep_lock(tmp_path):
        pass
    with sweep_lock(tmp_path):  # released
        pass


# ---------------------------------------------------------------------------------------------
# Results: the table, the files and the picture
# ---------------------------------------------------------------------------------------------


def fake_trial(sweep_dir: Path, key: str, seed: int, params: dict, status: str, evals: list, final=None):
    run_dir = trial_dir(sweep_dir, key, seed)
    run_dir.mkdir(parents=True)
    record = TrialRecord(key, seed, params, status=status)
    if final is not None:
        record.final = {"step": evals[-1][0], "finished": True, "return_mean": final}
    record.write(run_dir)
    with open(run_dir / "evals.jsonl", "w") as handle:
        for step, value in evals:
            handle.write(json.dumps({"step": step, "return_mean": value}) + "\n")


def test_results_rank_configurations_by_their_seeds_mean(tmp_path):
    plan = small_plan(params=["learning_rate=grid:1e-3,3e-4,1e-4"])
    write_sweep(tmp_path, plan)
    good, poor, unstarted = plan.configurations
    fake_trial(tmp_path, good.key, 1, good.params, FINISHED, [(100, 50.0), (1024, 480.0)], final=500.0)
    fake_trial(tmp_path, good.key, 2, good.params, FINISHED, [(100, 40.0), (1024, 470.0)], final=480.0)
    fake_trial(tmp_path, poor.key, 1, poor.params, STOPPED, [(100, 20.0), (200, 22.0)])
    fake_trial(tmp_path, poor.key, 2, poor.params, FINISHED, [(100, 30.0), (1024, 90.0)], final=100.0)
    trials = collect(tmp_path, plan)
    assert [t.status for t in trials] == [FINISHED, FINISHED, STOPPED, FINISHED, "pending", "pending"]
    configs = rank(plan, trials)
    assert [c.key for c in configs] == [good.key, poor.key, unstarted.key]
    best = configs[0]
    assert best.mean == 490.0 and best.std == pytest.approx(np.std([500, 480], ddof=1))
    assert best.finished == 2 and best.finals == (500.0, 480.0)
    assert configs[1].scores == (22.0, 100.0) and configs[1].finished == 1  # a stopped seed: its last eval
    assert configs[2].mean is None
    paths = write_results(tmp_path, plan, trials, configs)
    lines = paths[0].read_text().splitlines()
    assert lines[0].startswith("rank,config,learning_rate,return_mean_mean,return_mean_std")
    assert lines[1].startswith(f"1,{good.key},0.001,490,")
    assert len(paths[1].read_text().splitlines()) == 7
    assert json.loads(paths[2].read_text())["counts"] == {"finished": 3, "stopped": 1, "pending": 2}
    table = format_table(plan, configs)
    assert "490 ± 14.1" in table and "2/2" in table and "n/a" in table
    from sweep.plots import plot_sweep

    assert plot_sweep(plan, trials, configs, tmp_path / "sweep.png").stat().st_size > 10_000


def test_a_configuration_asha_stopped_in_every_seed_ranks_below_a_finished_one(tmp_path):
    # A stopped trial's score is its last report at a lower rung; a high early number there is not
    # the full budget's, so it must not make the configuration "best".
    plan = small_plan(params=["learning_rate=grid:1e-3,3e-4,1e-4"])
    write_sweep(tmp_path, plan)
    finished, stopped, unstarted = plan.configurations
    fake_trial(tmp_path, finished.key, 1, finished.params, FINISHED, [(100, 50.0), (1024, 90.0)], final=100.0)
    fake_trial(tmp_path, finished.key, 2, finished.params, STOPPED, [(100, 20.0), (200, 30.0)])
    fake_trial(tmp_path, stopped.key, 1, stopped.params, STOPPED, [(100, 200.0), (200, 300.0)])
    fake_trial(tmp_path, stopped.key, 2, stopped.params, STOPPED, [(100, 250.0)])
    configs = rank(plan, collect(tmp_path, plan))
    assert [c.key for c in configs] == [finished.key, stopped.key, unstarted.key]
    assert configs[0].mean == 65.0 and configs[1].mean == 275.0 and configs[1].finished == 0


# ---------------------------------------------------------------------------------------------
# The command line: bad input is one line and exit 2, before Ray starts or anything is written
# ---------------------------------------------------------------------------------------------


def run_main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sweep", "cartpole", "--param", "learning_rate=loguniform:1e-5"], "two bounds"),
        (["sweep", "cartpole", "--param", "lr=uniform:0.1:0.2"], "unknown --param key 'lr'"),
        (["sweep", "cartpole", "--param", "gamma=uniform:0.9:0.99", "--address", "127.0.0.1:1"],
         "cannot reach the Ray cluster at 127.0.0.1:1"),
        (["sweep", "--resume", "@dir"], "not a sweep directory"),
        (["sweep", "--resume", "@dir", "--param", "gamma=grid:0.9"], "drop --param"),
        (["sweep", "--param", "gamma=grid:0.9"], "give a preset"),
        (["sweep", "cartpole", "--seeds", "0"], "positive integer"),
        (["sweep", "cartpole", "--scheduler", "hyperband"], "invalid choice"),
        (["sweep", "cartpole", "--metric", "x_pos_mean"], "Mario presets only"),
    ],
)  # fmt: skip
def test_bad_sweep_input_exits_2_with_one_line(argv, fragment, tmp_path, capsys):
    argv = [str(tmp_path) if a == "@dir" else a for a in argv]
    code, out, err = run_main(argv, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_directory_holding_a_sweep_is_not_started_again(tmp_path, capsys):
    write_sweep(tmp_path, small_plan())
    code, _, err = run_main(["sweep", "cartpole", "--dir", str(tmp_path)], capsys)
    assert code == 2 and f"lab sweep --resume {tmp_path}" in err


def test_the_command_modules_name_what_sweep_and_compare_accept():
    from lab import compare as compare_command
    from sweep import runs

    assert sweep_command.METRICS == sweep_spec.METRICS
    assert sweep_command.SCHEDULERS == sweep_spec.SCHEDULERS
    assert tuple(runs.METRICS) == compare_command.METRICS


# ---------------------------------------------------------------------------------------------
# On Ray: a sweep whose driver is killed with SIGKILL, then resumed (subprocesses, slow)
# ---------------------------------------------------------------------------------------------


def lab(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs
    )


def statuses(sweep_dir: Path) -> dict[str, str]:
    found = {}
    for path in sorted((sweep_dir / "trials").glob("*/trial.json")):
        record = TrialRecord.read(path.parent)
        if record is not None:
            found[path.parent.name] = record.status
    return found


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_without_training_a_finished_trial_twice(tmp_path):
    sweep_dir = tmp_path / "sweep"
    argv = [sys.executable, "-m", "lab", "sweep", "cartpole", "--param", "learning_rate=grid:1e-3,3e-4",
            "--seeds", "3", "--steps", "4096", "--set", "eval_episodes=3", "--dir", str(sweep_dir)]  # fmt: skip
    # A session of its own: the Ray agents that outlive a SIGKILLed driver share its process group.
    driver = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 600
        while time.time() < deadline and FINISHED not in statuses(sweep_dir).values():
            assert driver.poll() is None, "the sweep ended before the kill"
            time.sleep(1)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        time.sleep(3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    before = statuses(sweep_dir)
    finished_before = sorted(name for name, status in before.items() if status == FINISHED)
    assert finished_before and len(finished_before) < 6, before
    mtimes = {
        name: (sweep_dir / "trials" / name / "metrics.json").stat().st_mtime_ns for name in finished_before
    }

    resumed = lab("sweep", "--resume", str(sweep_dir), "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    after = statuses(sweep_dir)
    assert len(after) == 6 and set(after.values()) <= {FINISHED, STOPPED}, after
    for name in finished_before:
        record = TrialRecord.read(sweep_dir / "trials" / name)
        assert record.trainings == 1, (name, record.attempts)
        assert (sweep_dir / "trials" / name / "metrics.json").stat().st_mtime_ns == mtimes[name]
    assert sum(summary["counts"].values()) == 6 and summary["best"]["run_dirs"]
    for name in ("results.csv", "trials.csv", "results.json", "sweep.png"):
        assert (sweep_dir / name).is_file()
    # every trial is a lab run: eval loads the best one; compare takes the whole sweep
    # the best configuration is one with a finished seed, though ASHA may have stopped the others
    best = next(d for d in summary["best"]["run_dirs"] if after[Path(d).name] == FINISHED)
    assert lab("eval", best, "--episodes", "2").returncode == 0
    compared = lab(
        "compare", str(sweep_dir), "--out", str(tmp_path / "compare.png"), "--json", "--reps", "200"
    )
    assert compared.returncode == 0, compared.stderr[-2000:]
    groups = json.loads(compared.stdout.strip().splitlines()[-1])["groups"]
    # Groups are labelled by the fields in which they differ; when the scheduler stopped every
    # trial of one learning rate (no final evaluation), one group is left and no field differs.
    labels = {g["label"] for g in groups}
    if len(groups) > 1:
        assert labels == {"learning_rate=0.001", "learning_rate=0.0003"}, labels
    else:
        assert labels == {"ppo on cartpole"}, labels


def test_tunes_status_tells_a_scheduler_stop_from_an_interrupted_sweep(tmp_path):
    plan = small_plan(params=["learning_rate=grid:1e-3"], seeds=2)
    write_sweep(tmp_path, plan)
    key = plan.configurations[0].key
    params = plan.configurations[0].params
    fake_trial(tmp_path, key, 1, params, STOPPED, [(100, 20.0)])  # stopped as the sweep was interrupted
    fake_trial(tmp_path, key, 2, params, "running", [(100, 30.0)])  # ended by Tune before it could say
    tune_status = {f"{key}-seed1": "RUNNING", f"{key}-seed2": "TERMINATED"}
    assert [t.status for t in collect(tmp_path, plan, tune_status)] == ["running", STOPPED]
    assert [t.status for t in collect(tmp_path, plan)] == [STOPPED, "running"]
