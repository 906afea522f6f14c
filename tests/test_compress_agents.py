"""``lab compress`` end to end on CartPole-size teachers, int8 loading (``nets.quantized``), channel
pruning of an agent, the comparison table of ``lab eval``, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import agents
import envs
import nets
from agents.engine import save_training_checkpoint
from agents.episodes import env_stages, rate_interval
from compress import pipeline
from compress.agents import PolicyNet, build_network, load_teacher
from compress.compare import (
    compare_runs,
    comparison_json,
    format_comparison,
    interleaved_latency,
)
from core.checkpoint import load_checkpoint, read_sidecar
from core.files import jsonable
from core.runs import locate_checkpoint, write_run_config
from lab.cli import main
from nets.quantized import Int8Conv2d, Int8Linear, int8_skeleton

CONTROLLER = torch.tensor([0.1, 0.5, 10.0, 2.0])  # push right when w . s > 0: 500 steps of CartPole


@torch.no_grad()
def wire(chain: list[nn.Linear], gain: float = 10.0) -> None:
    """Makes a chain of Linear layers compute logits (-g, +g) * sign(w . s) through two units per layer."""
    for layer in chain:
        layer.weight.zero_()
        layer.bias.zero_()
    chain[0].weight[0], chain[0].weight[1] = CONTROLLER, -CONTROLLER
    for layer in chain[1:-1]:
        layer.weight[0, 0] = layer.weight[1, 1] = 1.0
    chain[-1].weight[1, 0] = chain[-1].weight[0, 1] = gain


def make_teacher(run_dir: Path, algo: str = "ppo") -> Path:
    """A CartPole agent run (config.json + checkpoint, as `lab train` writes them) whose network is a
    hand-wired linear controller with a return of 500: a teacher without minutes of training."""
    module = agents.ALGOS[algo]
    config = dataclasses.replace(
        module.config_from_dict(getattr(envs.get_preset("cartpole"), algo)), env="cartpole"
    )
    net = build_network(algo, config, (4,), 2)
    linears = [m for m in net.encoder.modules() if isinstance(m, nn.Linear)]
    head = net.head.actor if algo == "ppo" else net.head.advantage
    wire(linears + [m for m in head.modules() if isinstance(m, nn.Linear)])
    run_dir.mkdir(parents=True)
    write_run_config(run_dir, "algo", algo, config)
    meta = {"algo": algo, "config": jsonable(dataclasses.asdict(config)), "obs_shape": [4], "num_actions": 2}
    state = {"model": {k: v.clone() for k, v in net.state_dict().items()}, "global_step": 50_000}
    save_training_checkpoint(run_dir, 50_000, state, meta, keep=1)
    return run_dir


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {algo: make_teacher(root / algo, algo) for algo in ("ppo", "dqn")}


def run_lab(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def eval_return(run: Path, capsys, episodes: int = 5) -> float:
    code, out, err = run_lab(["eval", run, "--episodes", episodes, "--json"], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])["return_mean"]


FAST = ["--set", "num_envs=4", "--set", "rollout=32", "--set", "batch_size=64", "--set", "replay=32",
        "--set", "learning_rate=0.003", "--set", "log_every=1024", "--no-eval", "--json"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_distillation_reaches_the_teachers_return(algo, teachers, tmp_path, capsys):
    out = tmp_path / "student"
    argv = ["compress", teachers[algo], "--method", "distil", "--student-set", "hidden=16", "--steps", 3072]
    code, stdout, err = run_lab([*argv, "--out", out, *FAST], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["frames"] == 3072 and summary["parameters"] < summary["teacher_parameters"] / 20
    teacher_return = eval_return(teachers[algo], capsys)
    assert teacher_return == 500.0  # the check below means something
    assert eval_return(out, capsys) >= 0.95 * teacher_return
    _, meta = locate_checkpoint(out)
    assert meta["compression"]["method"] == "distil" and meta["config"]["hidden"] == [16]
    assert "quantization" not in meta
    state, _ = load_checkpoint(locate_checkpoint(out)[0])
    assert "optimizer" not in state  # the finished run keeps weights only
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["agreement"] > history[0]["agreement"]
    assert (out / "learning_curve.png").stat().st_size > 0


def test_a_stopped_distillation_resumes_where_it_was(teachers, tmp_path, capsys):
    out = tmp_path / "student"
    base = ["compress", teachers["ppo"], "--method", "distil", "--student-set", "hidden=8", "--out", out]
    code, _, err = run_lab([*base, "--steps", 512, *FAST], capsys)
    assert code == 0, err
    code, _, err = run_lab([*base, "--steps", 512, *FAST], capsys)
    assert code == 2 and "not empty" in err and "--resume" in err
    code, _, err = run_lab([*base, "--steps", 256, "--resume", *FAST], capsys)
    assert code == 2 and "finished" in err
    code, stdout, err = run_lab([*base, "--steps", 1024, "--resume", *FAST], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["frames"] == 1024
    sidecar, meta = locate_checkpoint(out)
    assert sidecar.name == "step_000000001024.json" and meta["config"]["hidden"] == [8]
    assert [r["step"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [512, 1024]
    for argv in (
        ["export", out, tmp_path / "exported"],
        ["watch", out, "--out", tmp_path / "clip.gif", "--max-steps", 20],
    ):
        code, _, err = run_lab(argv, capsys)
        assert code == 0, f"{argv[0]}: {err}"
    # The export keeps the distillation's own curves, not a PPO-style plot of the checkpoint's history.
    for name in ("metrics.json", "learning_curve.png"):
        assert (tmp_path / "exported" / name).read_bytes() == (out / name).read_bytes()


def test_an_interrupted_distillation_keeps_what_it_learnt(teachers, tmp_path, capsys, monkeypatch):
    out = tmp_path / "student"
    rounds = []

    def beta_then_ctrl_c(iteration: int, *args: float) -> float:
        rounds.append(iteration)
        if len(rounds) == 3:
            raise KeyboardInterrupt
        return 0.5

    monkeypatch.setattr(pipeline, "beta", beta_then_ctrl_c)
    argv = ["compress", teachers["ppo"], "--method", "distil", "--student-set", "hidden=8", "--out", out]
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in [*argv, "--steps", 4096, *FAST]])
    assert stop.value.code == 130 and "--resume" in capsys.readouterr().err
    sidecar, meta = locate_checkpoint(out)
    assert sidecar.name == "step_000000000256.json"  # two rounds of 4 envs x 32 steps
    assert not meta["compression"]["finished"] and agents.load_agent(out).policy is not None
    monkeypatch.undo()
    code, stdout, err = run_lab([*argv, "--resume", *FAST], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["frames"] == 4096


def test_a_student_can_start_from_another_runs_weights(teachers, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["compress", teachers["ppo"], "--method", "distil", "--student-set", "hidden=8", "--steps", 256]
    code, _, err = run_lab([*base, "--out", first, *FAST], capsys)
    assert code == 0, err
    # A learning rate of zero leaves the student where it started: exactly the first run's weights.
    code, _, err = run_lab(
        [*base, "--out", second, *FAST, "--set", f"init_student={first}", "--set", "learning_rate=0"], capsys
    )
    assert code == 0, err
    start, _ = load_checkpoint(locate_checkpoint(first)[0])
    after, _ = load_checkpoint(locate_checkpoint(second)[0])
    assert start["model"].keys() == after["model"].keys()
    for key, tensor in start["model"].items():
        assert torch.equal(tensor, after["model"][key]), key
    _, meta = locate_checkpoint(second)
    assert meta["compression"]["settings"]["init_student"] == str(first)
    # ... and the record names the checkpoint it read, by its weights' hash.
    first_sidecar = locate_checkpoint(first)[0]
    [started] = meta["compression"]["start_weights"]
    assert started["checkpoint"] == str(first_sidecar) and started["step"] == 256
    assert started["weights_sha256"] == read_sidecar(first_sidecar)["weights_sha256"]
    # Another student shape, or pruning (which starts from the teacher), is refused in one line.
    for method, needle in (
        (["--method", "distil", "--student-set", "hidden=16"], "init_student: "),
        (["--method", "prune", "--sparsity", "0.9"], "init_student applies to distil"),
    ):
        out = tmp_path / "refused"
        refused = ["compress", teachers["ppo"], *method, "--set", f"init_student={first}", "--out", out]
        code, _, err = run_lab([*refused, "--no-eval"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # A resume takes the weights from its own checkpoint: the run it started from may be gone.
    shutil.rmtree(first / "checkpoints")
    code, stdout, err = run_lab([*base[:-1], 512, "--out", second, "--resume", *FAST], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["frames"] == 512


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.9, 0.77])
def test_pruning_hits_the_sparsity_exactly_with_masks_folded(sparsity, teachers, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["compress", teachers["ppo"], "--method", "prune", "--sparsity", sparsity, "--steps", 1024]
    code, _, err = run_lab([*argv, "--out", out, "--set", "rounds=3", *FAST], capsys)
    assert code == 0, err
    state, meta = load_checkpoint(locate_checkpoint(out)[0])
    model = state["model"]
    assert not any(key.endswith(("_orig", "_mask")) for key in model)
    teacher_state, _ = load_checkpoint(locate_checkpoint(teachers["ppo"])[0])
    assert set(model) == set(teacher_state["model"])
    weights = [value for key, value in model.items() if key.endswith("weight")]  # every Linear of the agent
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(sparsity * total)
    assert meta["compression"]["sparsity"] == pytest.approx(round(sparsity * total) / total)
    assert eval_return(out, capsys) == 500.0  # the wires are the largest weights: they survive


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_channel_pruning_of_an_agent_is_exact_when_the_cut_channels_are_dead(algo):
    """nature (32-64-64, 512) -> nature-half (16-32-32, 256) keeps the live channels and units; a dueling
    DQN head with 512 hidden units checks that only the layers reading the features are cut."""
    base = agents.ppo.PPOConfig() if algo == "ppo" else agents.dqn.DQNConfig(head_hidden=512, dueling=True)
    config = dataclasses.replace(base, env="mario-1-1", net="nature")
    torch.manual_seed(0)
    teacher = build_network(algo, config, (4, 84, 84), 7)
    convs = [m for m in teacher.encoder.conv if isinstance(m, nn.Conv2d)]
    fc = teacher.encoder.fc[0]
    with torch.no_grad():
        for layer in [*convs, fc]:
            dead = torch.randperm(len(layer.bias))[: len(layer.bias) // 2]
            layer.weight[dead] = 0.0
            layer.bias[dead] = 0.0
            layer.bias.add_(0.01 * (layer.bias != 0))  # live channels are not zero anywhere
    student = build_network(algo, dataclasses.replace(config, net="nature-half"), (4, 84, 84), 7)
    pipeline._copy_channel_pruned(teacher, student)
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    small, big = PolicyNet(student, algo), PolicyNet(teacher, algo)
    with torch.no_grad():
        torch.testing.assert_close(small(obs), big(obs), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in student.encoder.parameters()) < 0.3 * sum(
        p.numel() for p in teacher.encoder.parameters()
    )


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------


def test_int8_skeleton_loads_a_saved_int8_agent_with_the_same_outputs(tmp_path):
    from compress.quantize import calibrate, quantize_int8
    from core.checkpoint import save_checkpoint

    config = dataclasses.replace(agents.dqn.DQNConfig(), env="mario-1-1", net="nature-tiny", head_hidden=32)
    torch.manual_seed(0)
    net = PolicyNet(build_network("dqn", config, (4, 84, 84), 7), "dqn")
    frames = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)
    quantized = quantize_int8(net, calibrate(net, frames[:24]))
    save_checkpoint(tmp_path / "int8", {"model": quantized.net.state_dict()})
    state, _ = load_checkpoint(tmp_path / "int8")
    assert state["model"]["encoder.conv.0.weight"].dtype == torch.int8
    torch.manual_seed(1)  # other random weights in the skeleton: the state must replace them all
    loaded = int8_skeleton(build_network("dqn", config, (4, 84, 84), 7))
    loaded.load_state_dict(state["model"])
    kinds = {type(m) for m in loaded.modules()}
    assert Int8Conv2d in kinds and Int8Linear in kinds and nn.Linear not in kinds and nn.Conv2d not in kinds
    with torch.no_grad():
        assert torch.equal(loaded(frames[24:]), quantized.net(frames[24:]))
        reference = net(frames[24:])[0]
    assert (loaded(frames[24:]) - reference).norm() < 0.05 * reference.norm()
    assert isinstance(int8_skeleton(nn.Linear(3, 2)), Int8Linear)


def test_int8_gradients_pass_straight_through_the_rounding():
    torch.manual_seed(0)
    for layer, shape in ((nn.Conv2d(2, 3, 3), (1, 2, 6, 6)), (nn.Linear(5, 3), (4, 5))):
        int8 = (Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear).from_float(
            layer, torch.tensor(0.02)
        )
        x = torch.rand(shape, requires_grad=True)
        int8(x).sum().backward()
        reference = x.detach().clone().requires_grad_(True)
        layer(reference).sum().backward()
        assert x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, reference.grad, rtol=0.05, atol=0.02)
        with torch.no_grad():  # the differentiable path computes what the int8 kernels do
            torch.testing.assert_close(int8(x.detach()), int8(x).detach(), rtol=1e-5, atol=1e-5)


def test_quantized_run_round_trips_and_loads_through_every_command(teachers, tmp_path, capsys):
    out = tmp_path / "int8"
    code, stdout, err = run_lab(
        [
            "compress",
            teachers["ppo"],
            "--method",
            "quantize",
            "--steps",
            256,
            "--out",
            out,
            "--no-eval",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    record = json.loads(stdout.strip().splitlines()[-1])["record"]
    assert record["agreement"] >= 0.95 and record["calibration_frames"] == 192
    state, meta = load_checkpoint(locate_checkpoint(out)[0])
    assert meta["quantization"] == "int8"
    assert state["model"]["encoder.layers.0.weight"].dtype == torch.int8
    assert state["model"]["head.actor.0.weight"].dtype == torch.int8
    loaded = agents.load_agent(out)
    network = loaded.policy.agent
    assert not any(isinstance(m, nn.Linear) for m in network.modules())
    # The loaded int8 policy acts exactly as the one quantised in memory does (same calibration).
    teacher = load_teacher(teachers["ppo"])
    frames = pipeline.play_frames(teacher, pipeline.CompressConfig(method="quantize", num_envs=8), 256)
    from compress.quantize import calibrate, quantize_int8

    again = quantize_int8(teacher.net, calibrate(teacher.net, frames[:192]))
    with torch.no_grad():
        assert torch.equal(PolicyNet(network, "ppo")(frames)[0], again(frames)[0])
    assert eval_return(out, capsys) == 500.0
    for argv in (
        ["watch", out, "--out", tmp_path / "clip.gif", "--max-steps", 30],
        ["explain", out, "--out", tmp_path / "explain.png", "--max-steps", 30, "--check-frames", 16],
        ["export", out, tmp_path / "exported"],
    ):
        code, _, err = run_lab(argv, capsys)
        assert code == 0, f"{argv[0]}: {err}"
    assert (tmp_path / "clip.gif").stat().st_size > 0
    assert locate_checkpoint(tmp_path / "exported")[1]["quantization"] == "int8"


# ---------------------------------------------------------------------------------------------
# The comparison table
# ---------------------------------------------------------------------------------------------


def test_eval_of_several_runs_prints_the_comparison_table(teachers, tmp_path, capsys):
    code, out, err = run_lab(
        ["eval", teachers["ppo"], teachers["dqn"], "--episodes", 2, "--latency-calls", 40], capsys
    )
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "latency ms" in table[0] and "sticky" not in table[0]  # CartPole: no sticky
    code, out, err = run_lab(
        ["eval", teachers["ppo"], "--table", "--episodes", 2, "--latency-calls", 40, "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    (row,) = result["rows"]
    assert row["return_mean"] == 500.0 and row["latency_calls"] == 40 and row["method"] == "trained"
    assert row["parameters"] == sum(
        p.numel() for p in agents.load_agent(teachers["ppo"]).policy.agent.parameters()
    )
    weights = next((teachers["ppo"] / "checkpoints").glob("*.safetensors"))
    assert row["bytes_on_disk"] == weights.stat().st_size  # a model-only checkpoint: the file itself
    assert row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"]
    # One run without --table keeps the single-run summary.
    code, out, _ = run_lab(["eval", teachers["ppo"], "--episodes", 2, "--json"], capsys)
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["run"] == str(teachers["ppo"]) and "per_episode" in summary
    code, _, err = run_lab(["eval", teachers["ppo"], teachers["dqn"], "--save"], capsys)
    assert code == 2 and "--save" in err


def test_compress_json_ends_with_the_table_of_teacher_and_result(teachers, tmp_path, capsys):
    out = tmp_path / "int8"
    argv = ["compress", teachers["ppo"], "--method", "quantize", "--steps", 64, "--out", out, "--episodes", 1]
    code, stdout, err = run_lab([*argv, "--json"], capsys)
    assert code == 0, err
    table = json.loads(stdout.strip().splitlines()[-1])["table"]
    assert [row["method"] for row in table["rows"]] == ["trained", "int8"]
    assert [row["run"] for row in table["rows"]] == [str(teachers["ppo"]), str(out)]
    teacher, int8 = table["rows"]
    assert teacher["parameters"] == int8["parameters"]
    assert int8["bytes_on_disk"] < teacher["bytes_on_disk"] / 2.5  # a tiny net: the file header weighs
    assert table["protocol"]["episodes"] == 1 and table["protocol"]["threads"] == 1


def test_interleaved_latency_times_every_function_and_restores_threads():
    calls = {"fast": lambda: None, "slow": lambda: sum(range(20_000))}
    threads = torch.get_num_threads()
    result = interleaved_latency(calls, total=30, block=7, warmup=2)
    assert torch.get_num_threads() == threads
    assert result["fast"].calls == result["slow"].calls == 30
    assert result["slow"].median_ms > result["fast"].median_ms
    with pytest.raises(ValueError, match="block"):
        interleaved_latency(calls, total=5, block=0)


def test_table_ratios_are_against_the_first_row(teachers):
    rows, protocol = compare_runs([teachers["ppo"], teachers["dqn"]], episodes=1, latency_calls=5)
    text = format_comparison(rows, protocol)
    assert f"{rows[1].parameters / rows[0].parameters:.1f}x more" in text
    with pytest.raises(ValueError, match="different envs"):
        compare_runs([teachers["ppo"], Path("runs/mario-1-1")], episodes=1, latency_calls=5)


def test_clear_rates_carry_their_95_percent_interval(teachers):
    # Wilson's interval for 28 of 50 (scipy's binomtest; by hand: centre 0.5558, half-width 0.1327).
    low, high = rate_interval(0.56, 50)
    assert low == pytest.approx(0.4231, abs=1e-4) and high == pytest.approx(0.6884, abs=1e-4)
    assert rate_interval(1.0, 20)[1] == 1.0 and rate_interval(1.0, 20)[0] == pytest.approx(0.8389, abs=1e-4)
    assert rate_interval(None, 50) is None and rate_interval(0.5, 0) is None
    rows, protocol = compare_runs([teachers["ppo"]], episodes=1, latency_calls=5)
    mario_row = dataclasses.replace(
        rows[0], clear_rate=1.0, episodes=20, sticky_clear_rate=0.56, sticky_episodes=50
    )
    text = format_comparison([mario_row], protocol)
    assert "95% CI" in text and "| 100% (84-100) | 56% (42-69) |" in text
    (row,) = comparison_json([mario_row], protocol)["rows"]
    assert row["sticky_clear_rate_95ci"] == pytest.approx([0.4231, 0.6884], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


def make_task_run(run_dir: Path) -> Path:
    """A run that is not an agent: a `lab fit` checkpoint (a task, no algo)."""
    from core.checkpoint import save_checkpoint

    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"run_format_version": 1, "task": "xor", "config": {}}))
    save_checkpoint(
        run_dir / "checkpoints" / "epoch_000001", {"model": {"w": torch.zeros(2)}}, {"task": "xor"}
    )
    return run_dir


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--method", "shrink"], ["unknown compression method 'shrink'", "distil, prune, quantize"]),
        (["--method", "prune", "--sparsity", "1.5"], ["sparsity must be in (0, 1)", "1.5"]),
        (["--method", "prune", "--sparsity", "0"], ["sparsity must be in (0, 1)"]),
        (["--method", "prune", "--sparsity", "0.3"], ["zeros already"]),  # the wired teacher: 50% zeros
        (["--method", "distil", "--student", "resnet"], ["unknown net 'resnet'", "nature-tiny"]),
        (
            ["--method", "distil", "--set", "tempreature=2"],
            ["unknown config key 'tempreature'", "temperature"],
        ),
        (["--method", "quantize", "--structured"], ["--structured applies to --method prune"]),
        (["--method", "prune", "--student", "nature-half"], ["prune --structured"]),
        (["--method", "distil", "--student-set", "hiden=3"], ["unknown config key 'hiden'"]),
        (
            ["--method", "distil", "--set", "stage_teachers=1-3:elsewhere"],
            ["'cartpole' never plays '1-3'", "not a Mario preset"],
        ),
        (
            ["--method", "quantize", "--set", "stage_teachers=1-3:elsewhere"],
            ["stage_teachers applies to distil and prune"],
        ),
    ],
)
def test_bad_settings_exit_2_with_one_line(extra, needles, teachers, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_lab(["compress", teachers["ppo"], *extra, "--out", out, "--no-eval"], capsys)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["task", "missing", "not a run"])
def test_what_is_not_an_agent_exits_2_with_one_line(kind, tmp_path, capsys):
    target = {
        "task": make_task_run(tmp_path / "fit"),
        "missing": tmp_path / "nowhere",
        "not a run": tmp_path,
    }[kind]
    out = tmp_path / "out"
    code, _, err = run_lab(["compress", target, "--method", "quantize", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_registry_students_are_small_nature_cnns():
    teacher = nets.build("nature", in_shape=(4, 84, 84))
    tiny = nets.build("nature-tiny", in_shape=(4, 84, 84))
    parameters = [sum(p.numel() for p in net.parameters()) for net in (teacher, tiny)]
    assert parameters[0] > 20 * parameters[1]
    custom = nets.build("nature-tiny", in_shape=(1, 8, 8), channels=(4, 4, 4), out_dim=8)
    assert custom(torch.rand(2, 1, 8, 8)).shape == (2, 8)
    assert np.prod(nets.build("nature-half", in_shape=(4, 84, 84))(torch.zeros(1, 4, 84, 84)).shape) == 256


# ---------------------------------------------------------------------------------------------
# Teachers per stage (a multi-stage Mario teacher with other teachers for named stages)
# ---------------------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "runs"


class ConstantPolicy(nn.Module):
    """Every observation gets the same logits and value: which teacher labelled a row is visible."""

    def __init__(self, logits: list[float], value: float) -> None:
        super().__init__()
        self.logits, self.value = torch.tensor(logits), value

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits.expand(len(obs), -1), torch.full((len(obs),), self.value)


def constant_teacher(logits: list[float], value: float) -> pipeline.Teacher:
    agent = SimpleNamespace(meta={"algo": "ppo", "obs_shape": [2], "num_actions": len(logits)})
    return pipeline.Teacher(agent, ConstantPolicy(logits, value))  # type: ignore[arg-type]


def test_each_row_is_labelled_by_the_teacher_of_its_stage():
    teacher = constant_teacher([0.0, 1.0, 2.0], 1.0)
    for_1_3 = constant_teacher([5.0, 0.0, 0.0], 30.0)
    obs = torch.zeros(5, 2)
    stages = ["1-1", "1-3", None, "1-3", "1-4"]
    logits, values = pipeline.label_by_stage(teacher, {"1-3": for_1_3}, obs, stages)
    assert values is not None
    assert values.tolist() == [1.0, 30.0, 1.0, 30.0, 1.0]
    assert logits.argmax(-1).tolist() == [2, 0, 2, 0, 2]
    alone, alone_values = pipeline.label_by_stage(teacher, {}, obs, stages)
    assert alone.argmax(-1).tolist() == [2] * 5 and alone_values.tolist() == [1.0] * 5


def test_env_stages_reads_each_envs_stage_from_the_infos():
    infos = {"world": np.array([1, 1, 1]), "stage": np.array([3, 1, 4])}
    assert env_stages(infos, 3) == ["1-3", "1-1", "1-4"]
    assert env_stages({}, 2) == [None, None]


def shipped(run: str) -> Path:
    if not (SHIPPED / run / "checkpoints").is_dir():
        pytest.skip(f"runs/{run} is not in this checkout")
    return SHIPPED / run


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("1-3", ["'1-3' is not STAGE:RUN"]),
        ("1-5:{cartpole}", ["never plays '1-5'", "1-1, 1-2, 1-3, 1-4"]),
        ("1-3:{cartpole}", ["cannot label 1-3", "observation shape is (4,)", "(4, 84, 84)"]),
        ("1-3:{mario},1-3:{mario}", ["names 1-3 twice"]),
        ("1-3:{tmp}/nowhere", ["nowhere"]),
    ],
)
def test_bad_stage_teachers_exit_2_with_one_line(spec, needles, teachers, tmp_path, capsys):
    world = shipped("mario-world-1-training")
    spec = spec.format(cartpole=teachers["ppo"], mario=shipped("mario-1-3-training"), tmp=tmp_path)
    out = tmp_path / "out"
    argv = ["compress", world, "--method", "distil", "--set", f"stage_teachers={spec}", "--out", out]
    code, stdout, err = run_lab([*argv, "--no-eval"], capsys)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    assert not out.exists()


def test_a_world_1_distillation_labels_1_3_with_its_own_teacher(tmp_path, capsys, monkeypatch):
    """The shipped World-1 agent as the teacher, the 1-3 agent for 1-3: each labelled row comes from
    the teacher of the stage its env plays, read from the env's infos."""
    world, stage_1_3 = shipped("mario-world-1-training"), shipped("mario-1-3-training")
    seen: list[list[str | None]] = []
    label = pipeline.label_by_stage

    def recording(teacher, stage_teachers, obs, stages):
        seen.append(list(stages))
        logits, values = label(teacher, stage_teachers, obs, stages)
        for row, stage in enumerate(stages):  # the row's labels are its stage teacher's own
            owner = stage_teachers.get(stage, teacher)
            own_logits, own_values = owner.label(obs[row : row + 1])
            torch.testing.assert_close(logits[row], own_logits[0])
            torch.testing.assert_close(values[row], own_values[0])
        return logits, values

    monkeypatch.setattr(pipeline, "label_by_stage", recording)
    out = tmp_path / "student"
    argv = ["compress", world, "--method", "distil", "--student", "nature-tiny", "--out", out, "--steps", 96,
            "--set", f"stage_teachers=1-3:{stage_1_3}", "--set", "num_envs=8", "--set", "rollout=12",
            "--set", "batch_size=32", "--set", "log_every=48", "--set", "seed=2", "--no-eval", "--json"]  # fmt: skip
    code, _, err = run_lab(argv, capsys)
    assert code == 0, err
    stages = {stage for step in seen for stage in step}
    assert "1-3" in stages and len(stages) >= 3, stages  # eight envs draw from the four stages
    _, meta = locate_checkpoint(out)
    assert meta["compression"]["settings"]["stage_teachers"] == f"1-3:{stage_1_3}"


def test_the_table_of_a_world_1_agent_gives_each_stages_clears():
    world = shipped("mario-world-1-distilled")
    rows, protocol = compare_runs([world], episodes=1, sticky_episodes=1, latency_calls=5)
    (row,) = rows
    assert protocol.stages == ("1-1", "1-2", "1-3", "1-4")
    # One greedy and one sticky episode on each stage, in turn: the overall rate is their mean.
    assert list(row.stage_clear_rates) == list(row.sticky_stage_clear_rates) == list(protocol.stages)
    assert (row.episodes, row.sticky_episodes) == (4, 4)
    assert row.clear_rate == pytest.approx(sum(row.stage_clear_rates.values()) / 4)
    assert row.sticky_clear_rate == pytest.approx(sum(row.sticky_stage_clear_rates.values()) / 4)
    text = format_comparison(rows, protocol)
    assert "clear rate (1 a stage)" in text and "per stage: clear / sticky" in text
    cells = [
        f"{label} {row.stage_clear_rates[label]:.0%}/{row.sticky_stage_clear_rates[label]:.0%}"
        for label in protocol.stages
    ]
    assert ", ".join(cells) in text
    assert comparison_json(rows, protocol)["rows"][0]["stage_clear_rates"] == row.stage_clear_rates
