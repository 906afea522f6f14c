"""``lab fit --engine scratch`` and ``lab fit optim``: the scratch engine under the lab's tasks.

Fast tests check the twins (a task's torch net and its scratch copy give the same outputs), that a
short scratch run follows the torch run of the same seed step for step, resume, the slide's XOR
network, the optimiser race and the one-line errors. The ``slow`` tests train with the task defaults
and check the issue's targets: the scratch engine reaches the torch engine's accuracy on xor (1.0),
the spiral (>= 0.99) and the digits with the MLP (within one point).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks
from core.checkpoint import load_checkpoint
from lab import cli
from scratch import nn as snn
from scratch import surfaces
from scratch.core import Variable
from tasks import digits, optim, playground, scratch_fit, xor


def fit(name: str, run_dir: Path, *overrides: str, **fields) -> dict:
    """Runs task ``name`` on the CPU into ``run_dir`` with ``--set`` style overrides."""
    return tasks.run(name, run_dir, overrides=["device=cpu", *overrides], **fields)


def fit_optim(run_dir: Path, *overrides: str) -> dict:
    """Runs ``lab fit optim`` into ``run_dir`` with ``--set`` style overrides."""
    return tasks.run("optim", run_dir, overrides=list(overrides))


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``lab ARGV`` -> (exit status, stdout, stderr)."""
    sys.stderr.reconfigure(errors="backslashreplace")
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# The twins
# ---------------------------------------------------------------------------------------------


def task_models() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(label, torch Classifier as the task builds it, a batch of its inputs) for every scratch net."""
    (images, _), _ = digits.load_split(0.2, seed=0)
    points = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (16, 2)).astype(np.float32))
    return [
        ("xor", xor.build_model(xor.XorConfig()), xor.xor_table()[0]),
        ("playground", playground.build_model(playground.PlaygroundConfig()), points),
        ("digits-mlp", digits.build_model(digits.DigitsConfig(net="mlp")), images[:16]),
        ("digits-nature", digits.build_model(digits.DigitsConfig(net="nature")), images[:16]),
    ]


@pytest.mark.parametrize("index", range(4), ids=["xor", "playground", "digits-mlp", "digits-nature"])
def test_scratch_twin_gives_the_outputs_of_the_task_net(index: int) -> None:
    _, model, inputs = task_models()[index]
    twin = scratch_fit.scratch_twin(model)
    assert isinstance(twin, snn.ConvNet if index == 3 else snn.MLP)
    with torch.no_grad():
        theirs = model.double()(torch.from_numpy(scratch_fit.engine_input(twin, inputs))).numpy()
    np.testing.assert_allclose(scratch_fit.logits_of(twin, inputs), theirs, rtol=0, atol=1e-10)
    assert scratch_fit.output_difference(twin, model, inputs) < scratch_fit.OUTPUT_AGREEMENT


def test_engine_input_scales_pixels_for_the_cnn_only() -> None:
    images = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    mlp, cnn = (scratch_fit.scratch_twin(m) for _, m, _ in task_models()[2:])
    assert scratch_fit.engine_input(mlp, images).max() == 255.0  # nets.MLP casts, does not scale
    assert scratch_fit.engine_input(cnn, images).max() == 1.0  # nets' image encoders scale to [0, 1]
    assert scratch_fit.engine_input(cnn, images).dtype == np.float64


def test_output_check_sees_a_weight_that_did_not_make_it_to_torch(monkeypatch) -> None:
    _, model, inputs = task_models()[0]
    twin = scratch_fit.scratch_twin(model)
    assert scratch_fit.output_difference(twin, model, inputs) < scratch_fit.OUTPUT_AGREEMENT
    copy_weights = scratch_fit.load_into_torch

    def lossy_copy(twin, module):
        module = copy_weights(twin, module)
        with torch.no_grad():
            module.head.linear.bias[0] += 1e-6
        return module

    monkeypatch.setattr(scratch_fit, "load_into_torch", lossy_copy)
    assert scratch_fit.output_difference(twin, model, inputs) > scratch_fit.OUTPUT_AGREEMENT


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_gradient_clipping_is_torchs(max_norm: float) -> None:
    rng = np.random.default_rng(11)
    grads = [rng.normal(size=(3, 4)), rng.normal(size=(4,))]
    params = [snn.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = Variable(g.copy())
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads, strict=True):
        t.grad = torch.tensor(g)
    scratch_fit.clip_grad_norm(params, max_norm)
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    for p, t in zip(params, tensors, strict=True):
        np.testing.assert_allclose(p.grad.data, t.grad.numpy(), rtol=1e-12)


def test_scratch_engine_refuses_the_fit_loops_levers(tmp_path: Path) -> None:
    with_levers = dataclasses.make_dataclass(
        "XorWithLevers", [("precision", str, "bf16")], bases=(xor.XorConfig,)
    )
    config = with_levers(engine="scratch")
    model = xor.build_model(config)
    with pytest.raises(tasks.TaskError, match="without the fit loop's levers; drop precision$"):
        scratch_fit.fit(task="xor", config=config, model=model, train=xor.xor_table(), test=xor.xor_table(),
                        run_dir=tmp_path)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Short runs: the scratch loop follows the torch loop
# ---------------------------------------------------------------------------------------------


def test_scratch_xor_run_follows_the_torch_run_of_the_same_seed(tmp_path: Path) -> None:
    metrics = fit("xor", tmp_path, "engine=scratch", "epochs=40")
    reference = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    assert metrics["engine"] == "scratch" and metrics["torch_outputs_match"]
    assert metrics["torch_reference"]["test_accuracy"] == reference["test_accuracy"]
    assert metrics["accuracy_gap"] == metrics["test_accuracy"] - reference["test_accuracy"]
    # Same start, batches and AdamW: only float64 against float32 separates the two loss curves.
    ours = [row["train_loss"] for row in metrics["history"]]
    theirs = [row["train_loss"] for row in reference["history"]]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    for name in ("config.json", "metrics.json", "learning_curve.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "config.json").read_text())["config"]["engine"] == "scratch"
    # The final checkpoint is a torch Classifier state dict: the torch net loads it as it is.
    state, meta = load_checkpoint(tmp_path / "checkpoints" / "final.json")
    assert meta["engine"] == "scratch"
    model = xor.build_model(xor.XorConfig())
    model.load_state_dict(state["model"])
    inputs, labels = xor.xor_table()
    assert (model(inputs).argmax(-1) == labels).float().mean().item() == metrics["test_accuracy"]


def test_scratch_run_without_compare_trains_no_torch_reference(tmp_path: Path) -> None:
    metrics = fit("xor", tmp_path, "engine=scratch", "epochs=3", "compare=false")
    assert "torch_reference" not in metrics and not (tmp_path / "torch").exists()
    assert len(metrics["history"]) == 3


def test_scratch_playground_run_draws_the_boundary_with_the_torch_twin(tmp_path: Path) -> None:
    metrics = fit(
        "playground", tmp_path, "engine=scratch", "epochs=4", "num_points=80", "hidden=8,8", "batch_size=16"
    )
    assert (tmp_path / "boundary.png").is_file() and (tmp_path / "boundary.gif").is_file()
    assert not (tmp_path / "torch" / "boundary.png").exists()  # the reference trains, the task plots
    ours = [row["train_loss"] for row in metrics["history"]]
    theirs = [
        row["train_loss"] for row in json.loads((tmp_path / "torch" / "metrics.json").read_text())["history"]
    ]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)  # cosine schedule and mini-batches included


def test_scratch_digits_cnn_follows_torch_with_augmentation(tmp_path: Path) -> None:
    # nature with shift=1 (the default for image nets): the shifts come from the same generator.
    metrics = fit("digits", tmp_path, "engine=scratch", "net=nature", "epochs=1", "batch_size=256")
    assert metrics["shift"] == 1 and metrics["torch_outputs_match"]
    reference = metrics["torch_reference"]
    assert metrics["train_loss"] == pytest.approx(
        json.loads((tmp_path / "torch" / "metrics.json").read_text())["train_loss"], rel=1e-4
    )
    assert metrics["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-3)
    assert (tmp_path / "confusion.png").is_file()


def test_resumed_scratch_run_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = fit("xor", tmp_path / "whole", "engine=scratch", "compare=false", "epochs=30")
    fit("xor", tmp_path / "parts", "engine=scratch", "compare=false", "epochs=12")
    resumed = tasks.run(
        "xor", tmp_path / "parts", overrides=["device=cpu", "engine=scratch", "compare=false", "epochs=30"],
        resume=True,
    )  # fmt: skip
    assert resumed["history"] == whole["history"]
    with pytest.raises(tasks.TaskError, match="was trained with engine='scratch'"):
        tasks.run(
            "xor", tmp_path / "parts", overrides=["device=cpu", "compare=false", "epochs=40"], resume=True
        )


# ---------------------------------------------------------------------------------------------
# The slide's XOR network
# ---------------------------------------------------------------------------------------------


def test_slide_network_gives_the_xor_table_on_both_engines(tmp_path: Path) -> None:
    table = scratch_fit.slide_table()
    assert table.scratch == table.torch == [0.0, 1.0, 1.0, 0.0] and table.correct
    metrics = scratch_fit.with_slide_network({"report": ["after"]}, tmp_path)
    assert metrics["slide_network"]["correct"] and metrics["report"][-1] == "after"
    assert metrics["report"][2].split() == ["0", "0", "|", "0.0", "0.0", "|", "0"]
    assert (tmp_path / "slide_graph.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["slide_network"]["xor"] == [0, 1, 1, 0]


def test_lab_fit_xor_scratch_prints_the_slide_table_and_json_reports_both_engines(tmp_path, capsys) -> None:
    argv = ["fit", "xor", "--engine", "scratch", "--epochs", "5", "--device", "cpu", "--no-progress"]
    code, out, err = run_main([*argv, "--set", "slide=true", "--run-dir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "  1  1 |     0.0    0.0 |   0" in out and "scratch engine: test accuracy" in out
    assert out.splitlines()[-1].startswith("xor with mlp: accuracy")
    code, out, err = run_main([*argv, "--json", "--run-dir", str(tmp_path / "b")], capsys)
    summary = json.loads(out.splitlines()[-1])
    assert code == 0 and summary["engine"] == "scratch" and "report" not in summary
    assert set(summary["torch_reference"]) >= {"test_accuracy", "train_loss", "run_dir"}


# ---------------------------------------------------------------------------------------------
# lab fit optim
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", list(surfaces.SURFACES))
def test_optimizer_race_agrees_with_torch_optim_on_every_surface(surface: str) -> None:
    paths, results = optim.race(optim.OptimConfig(surface=surface, steps=200))
    assert list(results) == list(surfaces.OPTIMIZERS)
    for name, result in results.items():
        assert result.engine_difference <= optim.AGREEMENT, name
        assert paths[name].shape == (201, 2)
        assert result.steps_to_minimum == surfaces.steps_to_minimum(paths[name], surface, 1e-2)
    assert any(r.steps_to_minimum is not None for r in results.values()) == (
        surface in ("saddle", "quadratic")
    )


def test_lab_fit_optim_writes_pictures_and_steps_to_minimum(tmp_path: Path, capsys) -> None:
    code, out, err = run_main(
        [
            "fit",
            "optim",
            "--set",
            "optimizers=sgd,adam",
            "--set",
            "steps=150",
            "--json",
            "--run-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["surface"] == "quadratic" and summary["engines_agree"]
    assert set(summary["optimizers"]) == {"sgd", "adam"} and summary["test_metric"] == 1.0
    sgd = summary["optimizers"]["sgd"]
    assert sgd["steps_to_minimum"] == surfaces.steps_to_minimum(
        surfaces.run_trajectory("quadratic", "sgd", 150), "quadratic", 1e-2
    )
    assert summary["fastest"] == min(
        ("sgd", "adam"), key=lambda n: summary["optimizers"][n]["steps_to_minimum"]
    )
    for name in ("trajectories.png", "trajectories.gif", "distance.png", "trajectories.csv", "config.json"):
        assert (tmp_path / name).stat().st_size > 100, name
    rows = (tmp_path / "trajectories.csv").read_text().splitlines()
    assert rows[0] == "optimizer,step,x,y" and rows[1] == "sgd,0,-7.0,2.0" and len(rows) == 1 + 2 * 151


def test_optim_with_a_diverging_learning_rate_reports_it(tmp_path: Path) -> None:
    metrics = fit_optim(tmp_path, "optimizers=sgd", "lr=50", "steps=200", "gif=false")
    sgd = metrics["optimizers"]["sgd"]
    assert sgd["steps_to_minimum"] is None and not np.isfinite(sgd["final_value"])
    assert metrics["engines_agree"]  # both engines overflow at the same step
    json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: no NaN or Infinity


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (
            ["fit", "digits", "--engine", "scratch", "--net", "vit"],
            ["no net 'vit'", "it builds: mlp, nature"],
        ),
        (
            ["fit", "sequence", "--engine", "scratch"],
            ["torch engine only", "xor, playground, digits", "optim"],
        ),
        (
            ["fit", "optim", "--set", "surface=moon"],
            ["surface='moon'", "rosenbrock, beale, saddle, quadratic"],
        ),
        (["fit", "optim", "--set", "optimizers=adam,lion"], ["'lion'", "sgd, momentum, nesterov, adagrad"]),
        (["fit", "optim", "--set", "start=1,2,3"], ["two numbers"]),
        (["fit", "optim", "--epochs", "5"], ["no --epochs setting", "--help-config"]),
    ],
)
def test_what_the_engine_lacks_is_one_line_and_exit_2(argv, needles, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_engine_cannot_change_on_resume_and_optim_does_not_resume(tmp_path, capsys) -> None:
    fit("xor", tmp_path / "x", "engine=scratch", "compare=false", "epochs=2")
    code, _, err = run_main(["fit", "--resume", str(tmp_path / "x"), "--engine", "torch"], capsys)
    assert code == 2 and "--engine cannot change" in err
    fit_optim(tmp_path / "o", "optimizers=adam", "steps=5", "gif=false")
    code, _, err = run_main(["fit", "--resume", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "no epoch checkpoint" in err
    with pytest.raises(tasks.TaskError, match="keep no checkpoints"):
        tasks.run("optim", tmp_path / "o", resume=True)


def test_engine_torch_is_accepted_by_every_task(tmp_path, capsys, monkeypatch) -> None:
    seen = {}

    def fake_run(config, run_dir, progress=True, resume=False):
        seen["config"] = config
        return {"train_loss": 0.0, "seconds": 0.0, "test_accuracy": 1.0}

    spec = tasks.get("sequence")
    monkeypatch.setitem(tasks._REGISTRY, "sequence", dataclasses.replace(spec, run=fake_run))
    code, _, err = run_main(["fit", "sequence", "--engine", "torch", "--run-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert not hasattr(seen["config"], "engine")  # sequence has one engine and no field for it


# ---------------------------------------------------------------------------------------------
# The targets (slow): same seeds, default settings, both engines
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "overrides", "target"),
    [("xor", [], 1.0), ("playground", ["dataset=spiral"], 0.99), ("digits", ["net=mlp"], None)],
    ids=["xor", "spiral", "digits-mlp"],
)
def test_scratch_engine_reaches_the_torch_engines_accuracy(task, overrides, target, tmp_path) -> None:
    metrics = fit(task, tmp_path, "engine=scratch", *overrides)
    scratch, torch_accuracy = metrics["test_accuracy"], metrics["torch_reference"]["test_accuracy"]
    assert metrics["torch_outputs_match"]
    if target is not None:
        assert scratch >= target and torch_accuracy >= target
    # Reaching torch's accuracy is the target; the same seeds round differently on other CPUs, and on
    # one of them the scratch engine ended 1.4 points above torch's digits accuracy, which is no failure.
    assert scratch >= torch_accuracy - 0.01
