"""The levers of the fit loop (``tasks.loop.Levers``, ``tasks.distributed``): each changes how a step is
computed, not what it computes; bad input is refused in one line with exit 2; and, in the slow tests,
data parallelism across two processes (DDP and FSDP2), Ctrl-C and resume, and a crashed rank."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import tasks
from benchmarks import fit_levers
from benchmarks.fit_levers import SavedBytes
from core.checkpoint import load_checkpoint
from lab.cli import main
from nets.gpt import GPT
from tasks import distributed, lm, loop
from tasks.loop import Levers, Stepper, TaskError
from tests import test_lm

ROOT = Path(__file__).resolve().parents[1]
TINY = [*test_lm.TINY, "samples=0"]  # test_lm's tiny GPT, without the samples at the end


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text file: this repository's fit loop, twice."""
    path = tmp_path / "corpus.py"
    path.write_text((ROOT / "tasks" / "loop.py").read_text() * 2)
    return path


ONE_PROCESS = distributed.Ranks()


def tiny_config(**fields) -> lm.LMConfig:
    values = dict(width=32, layers=2, heads=4, context=16, batch_size=9, grad_clip=0.0, device="cpu")
    return lm.LMConfig(**{**values, **fields})


def one_step(config: lm.LMConfig, where: distributed.Ranks = ONE_PROCESS) -> Stepper:
    """A Stepper of the tiny GPT (seed 0) after one step on a fixed batch of 9 windows (uneven halves)."""
    torch.manual_seed(0)
    model = lm.build_model(config)
    levers = loop.levers_of(config)
    if levers.checkpointing:
        loop.enable_checkpointing(model, config.net)
    stream = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    windows = lm.TrainingWindows(stream, config.context)
    stepper = Stepper(model, config, levers, where, torch.device("cpu"), windows.loss, total_steps=10)
    stepper.step((windows.starts[:9],))
    return stepper


# ---------------------------------------------------------------------------------------------
# One process: the levers compute the same step
# ---------------------------------------------------------------------------------------------


def test_levers_default_to_the_plain_loop_and_configs_without_them_get_the_defaults():
    assert loop.levers_of(tasks.get("xor").config_class()) == Levers()
    assert Levers() == Levers(precision="fp32", checkpointing=False, accumulate=1, compile=False, shard=False)
    assert loop.levers_of(tiny_config(accumulate=3)).accumulate == 3


def test_accumulation_gives_the_gradient_and_step_of_the_whole_batch():
    whole, accumulated = one_step(tiny_config()), one_step(tiny_config(accumulate=2))
    assert accumulated.pieces == 2  # 9 windows: micro-batches of 4 and 5
    for (name, a), b in zip(whole.model.named_parameters(), accumulated.model.parameters(), strict=True):
        assert_same_step(name, (a.grad, a), (b.grad, b))


def assert_same_step(name: str, expected: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> None:
    """Gradients allclose (their scale too, which Adam's step would hide) and the weights after the step
    within 1% of the learning rate (3e-3): Adam's first step divides each gradient by its own size, so
    float noise in a gradient near Adam's eps moves that weight by up to a few 1e-6)."""
    (expected_grad, expected_weight), (grad, weight) = expected, got
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-9), name
    assert torch.allclose(weight, expected_weight, rtol=0.0, atol=3e-5), name


def test_checkpointing_gives_the_same_gradients_with_dropout():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(vocab_size=256, d_model=32, depth=3, heads=4, context=16, dropout=0.2)
        model.transformer.checkpoint_blocks = checkpointing
        tokens = torch.randint(0, 256, (4, 17))
        torch.manual_seed(1)  # the same dropout masks; the recomputation must draw them again
        loss = torch.nn.functional.cross_entropy(
            model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1)
        )
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-6, atol=1e-8), name


def test_checkpointing_halves_what_the_large_model_saves_for_backward():
    """8 blocks of width 512 at context 512: the ISSUE's configuration; one forward pass each."""
    saved = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(vocab_size=256, d_model=512, depth=8, heads=8, context=512)
        model.transformer.checkpoint_blocks = checkpointing
        counter = SavedBytes(model)
        forward = counter.wrap(lambda module, batch: module(batch[0]).sum())
        forward(model, (torch.randint(0, 256, (1, 512)),))
        saved[checkpointing] = counter.per_forward[0]
    assert saved[True] <= 0.5 * saved[False], saved
    assert saved[False] > 50 * 2**20  # activations of 8 blocks x 512 positions, parameters left out


def test_checkpointing_needs_transformer_blocks():
    with pytest.raises(TaskError, match="net 'mlp' has none"):
        loop.enable_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mlp")


@pytest.mark.parametrize(
    "levers",
    [["accumulate=2", "checkpointing=true"], ["precision=bf16"], ["precision=fp16"]],
    ids=["accumulate+checkpointing", "bf16", "fp16"],
)
def test_runs_with_levers_resume_bit_exactly(levers, tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(loop, "native_fp16", lambda device: True)  # CPU fp16 autocast runs, emulated
    if "precision=bf16" in levers:
        monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    overrides = [*TINY, *levers, "epochs=2", f"corpus={corpus}"]
    straight = tasks.run("lm", tmp_path / "straight", overrides=overrides)
    calls = itertools.count(1)
    real_step = torch.optim.AdamW.step

    def step_or_interrupt(self, *args, **kwargs):
        if next(calls) == 5:  # in epoch 2
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step_or_interrupt)
        with pytest.raises(KeyboardInterrupt):
            tasks.run("lm", tmp_path / "resumed", overrides=overrides)
    resumed = tasks.run("lm", tmp_path / "resumed", overrides=overrides, resume=True)
    assert resumed["history"] == straight["history"]
    states = [
        load_checkpoint(tmp_path / run / "checkpoints" / "epoch_000002.json")[0]
        for run in ("straight", "resumed")
    ]
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
    if "precision=fp16" in levers:
        assert states[0]["scaler"]["scale"] == states[1]["scaler"]["scale"] > 0


@pytest.mark.slow
def test_bf16_training_reaches_the_fp32_validation_loss_within_2_percent(tmp_path):
    """200 steps of a small GPT on the standard library, fp32 and bf16 autocast (about 2 minutes)."""
    if not loop.native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (precision=bf16 is refused here)")
    small = [
        "device=cpu",
        "width=64",
        "layers=2",
        "context=64",
        "batch_size=16",
        "epochs=4",
        "epoch_steps=50",
    ]
    losses = {
        precision: tasks.run(
            "lm", tmp_path / precision, overrides=[*small, f"precision={precision}", "samples=0"]
        )["test_loss"]
        for precision in ("fp32", "bf16")
    }
    assert losses["fp32"] < 2.6  # it learnt something (the untrained loss is ln 256 = 5.5 nats)
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * losses["fp32"], losses


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path, corpus):
    """torch.compile (inductor, a C++ compiler on the CPU) takes minutes here; the losses match eager's."""
    overrides = [*TINY, "epochs=2", f"corpus={corpus}"]
    eager = tasks.run("lm", tmp_path / "eager", overrides=overrides)
    compiled = tasks.run("lm", tmp_path / "compiled", overrides=[*overrides, "compile=true"])
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--set", "precision=fp8"], ["precision='fp8' is not valid", "fp32, bf16, fp16"]),
        (["--procs", "0"], ["--procs", "expected a positive integer"]),
        (["--set", "shard=true"], ["shard=true", "--procs 2 or more"]),
        (["--set", "precision=fp16"], ["precision=fp16", "natively", "use precision=fp32"]),
        (["--set", "accumulate=0"], ["accumulate=0 is out of range"]),
    ],
)
def test_bad_levers_exit_2_with_one_line_and_write_nothing(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "native_fp16", lambda device: False)  # a CPU without fp16, on any machine
    assert main(["fit", "lm", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(word in err for word in words), err
    assert not (tmp_path / "runs").exists()


def test_more_micro_batches_than_windows_is_a_task_error(tmp_path, corpus):
    with pytest.raises(TaskError, match="cannot give 16 micro-batches"):
        tasks.run("lm", tmp_path, overrides=[*TINY, "accumulate=16", f"corpus={corpus}"])


# ---------------------------------------------------------------------------------------------
# Two processes (slow: each launch starts two torch processes)
# ---------------------------------------------------------------------------------------------

WORKER = """
import json, sys, torch
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from tasks import distributed
from tests.test_levers import one_step, tiny_config

where = distributed.ranks()
distributed.start(torch.device("cpu"), where)
out = {{}}
for name, fields in (("ddp", {{}}), ("fsdp", {{"shard": True}})):
    stepper = one_step(tiny_config(**fields), where)
    grads = {{
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        for n, p in stepper.model.named_parameters()
    }}
    trained = stepper.trained_model()  # rank 0's
    if where.main:
        tensors = {{**{{"grad." + k: v for k, v in grads.items()}}, **trained.state_dict()}}
        save_file(tensors, f"{{sys.argv[1]}}/{{name}}.safetensors")
    out[name] = distributed.local_parameter_count(stepper.model)
json.dump(out, open(f"{{sys.argv[1]}}/rank{{where.rank}}.json", "w"))
distributed.close(together=True)
"""


@pytest.mark.slow
def test_two_processes_take_the_step_of_one_and_shards_hold_half_the_parameters(tmp_path, monkeypatch):
    """DDP on half batches (4 and 5 of 9 windows) = one process on the whole batch = accumulate=2."""
    from safetensors.torch import load_file

    (tmp_path / "levers_worker.py").write_text(WORKER.format(root=str(ROOT)))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the ranks' logs go
    outcome = distributed.launch([str(tmp_path)], 2, module="levers_worker")
    assert outcome.status == 0, outcome
    assert not list((tmp_path / "tmp").iterdir())  # the ranks' log folder is removed
    whole = one_step(tiny_config())
    total = sum(p.numel() for p in whole.model.parameters())
    for name in ("ddp", "fsdp"):
        saved = load_file(tmp_path / f"{name}.safetensors")
        for key, p in whole.model.named_parameters():
            assert_same_step(f"{name}: {key}", (p.grad, p.detach()), (saved[f"grad.{key}"], saved[key]))
    counts = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [c["ddp"] for c in counts] == [total, total]  # DDP: every rank holds everything
    for count in (c["fsdp"] for c in counts):
        assert 0.45 * total <= count <= 0.55 * total, (count, total)  # FSDP2: about half each


def lab_fit(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lab", "fit", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a job: Ctrl-C goes to it
        **kwargs,
    )


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def ranks_of(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes launched by ``parent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(
                item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item
            )
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


# Far more epochs than run before the first checkpoint (tasks.loop.CHECKPOINT_SECONDS, 5 s), so that
# the signal comes mid-run: with 40, a fast machine had finished them all when it came.
LONG_RUN = ["--set=epochs=2000", "--set=epoch_steps=20", "--procs", "2", "--no-progress"]


@pytest.mark.slow
def test_two_processes_stop_together_on_ctrl_c_and_resume(tmp_path, corpus):
    run_dir = tmp_path / "run"
    args = ["lm", "--run-dir", str(run_dir), *[f"--set={item}" for item in TINY], f"--set=corpus={corpus}"]
    args += LONG_RUN
    process = lab_fit(args)
    wait_for(lambda: list((run_dir / "checkpoints").glob("epoch_*.json")), 180, "the first epoch checkpoint")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"Resume with: lab fit --resume {run_dir} --procs 2" in err, err
    kept = int(err.split("the checkpoint after epoch ")[1].split()[0])
    assert 1 <= kept < 2000

    resumed = lab_fit(
        ["--resume", str(run_dir), "--procs", "2", "--no-progress", "--json", "--epochs", str(kept + 2)]
    )
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["procs"] == 2 and metrics["epochs"] == kept + 2
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(1, kept + 3))


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_with_a_one_line_reason(tmp_path, corpus):
    run_dir = tmp_path / "run"
    args = ["lm", "--run-dir", str(run_dir), *[f"--set={item}" for item in TINY], f"--set=corpus={corpus}"]
    args += LONG_RUN
    process = lab_fit(args)
    wait_for(lambda: list((run_dir / "checkpoints").glob("epoch_*.json")), 180, "the first epoch checkpoint")
    os.kill(ranks_of(process.pid)[1], signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "lab: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# The benchmark (benchmarks/fit_levers.py, `lab bench fit`)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_benchmark_measures_each_lever_in_its_own_process(monkeypatch, capsys):
    monkeypatch.setitem(
        fit_levers.SIZES, "tiny", fit_levers.Size(width=32, layers=2, heads=4, context=32, batch_size=8)
    )
    monkeypatch.setattr(loop, "native_fp16", lambda device: False)  # its row says why it did not run
    args = fit_levers.build_parser().parse_args(["--steps", "2", "--warmup", "1"])
    result = fit_levers.run(["tiny"], ["fp32", "checkpointing", "accumulate2", "fp16", "fsdp2"], args)
    rows = {row["lever"]: row for row in result["rows"]}
    assert "natively" in rows["fp16"]["error"]
    for lever in ("fp32", "checkpointing", "accumulate2", "fsdp2"):
        assert rows[lever]["tokens_per_cpu_second"] > 0 and rows[lever]["peak_rss_mb"] > 50, lever
    assert rows["checkpointing"]["saved_mb"] < rows["fp32"]["saved_mb"]
    assert rows["accumulate2"]["saved_mb"] == pytest.approx(rows["fp32"]["saved_mb"] / 2, rel=0.05)
    assert (
        rows["fsdp2"]["procs"] == 2 and sum(rows["fsdp2"]["local_parameters"]) >= rows["fsdp2"]["parameters"]
    )
    lines = fit_levers.table(result)
    assert len(lines) == 2 + 5 and "| tiny | fp16 | | n/a: precision=fp16" in lines[5]


def test_lab_bench_fit_refuses_an_unknown_lever_in_one_line(capsys):
    assert main(["bench", "fit", "--systems", "fp32,fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown lever fp8" in err and "checkpointing" in err
