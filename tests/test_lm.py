"""``lab fit lm`` and ``nets.gpt``: the corpus and its split, windows and bits, the decoder-only GPT,
a smoke run that writes samples, bit-exact resume, and (slow) a learning run on the standard library."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import nets
import tasks
from core.checkpoint import load_checkpoint
from nets.gpt import GPT
from tasks import lm, loop
from tasks.loop import TaskError

# Tiny settings: a few seconds per run on one thread.
TINY = [
    "device=cpu",
    "width=32",
    "layers=2",
    "heads=4",
    "context=16",
    "batch_size=8",
    "epoch_steps=3",
    "eval_tokens=512",
    "sample_tokens=40",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of 30 small Python-like files (so the split by file has files on both sides)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        body = "".join(f"    x{j} = {i} * {j}  # line {j}\n" for j in range(40))
        (folder / f"module_{i:02d}.py").write_text(f"def function_{i}(x):\n{body}    return x\n")
    return folder


def fit(run_dir: Path, *overrides: str, **fields):
    return tasks.run("lm", run_dir, overrides=[*TINY, *overrides], **fields)


# ---------------------------------------------------------------------------------------------
# Corpus and split
# ---------------------------------------------------------------------------------------------


def test_the_split_is_by_file_fixed_and_disjoint(corpus):
    data = lm.load_corpus(str(corpus), "*.py", val_percent=20.0)
    assert data.train_files + data.val_files == 30 and 0 < data.val_files < 30
    # The same files every time, from their paths alone.
    names = sorted(p.name for p in corpus.glob("*.py"))
    held = [name for name in names if lm.held_out(name, 20.0)]
    assert len(held) == data.val_files
    val_text = bytes(data.val.tolist())
    train_text = bytes(data.train.tolist())
    for name in names:
        marker = f"def function_{int(name[7:9])}(x)".encode()
        assert (marker in val_text) == (name in held) and (marker in train_text) != (name in held)
    # Files are joined by NUL: one fewer separator than files on each side.
    assert val_text.count(b"\0") == data.val_files - 1


def test_a_lone_file_is_split_by_bytes_and_binary_files_are_skipped(tmp_path, corpus):
    (corpus / "blob.py").write_bytes(b"\x00\x01binary")
    data = lm.load_corpus(str(corpus), "*.py", val_percent=20.0)
    assert b"binary" not in bytes(data.train.tolist()) + bytes(data.val.tolist())
    single = corpus / "module_00.py"
    data = lm.load_corpus(str(single), "*", val_percent=10.0)
    size = single.stat().st_size
    assert data.val_files == 0 and data.train.numel() == int(size * 0.9)
    assert data.train.numel() + data.val.numel() == size


def test_bad_corpora_are_task_errors_naming_the_fix(tmp_path, corpus):
    with pytest.raises(TaskError, match="not a file or folder"):
        lm.load_corpus(str(tmp_path / "missing"), "*.py", 5.0)
    with pytest.raises(TaskError, match=r"no text files matching glob='\*.txt'"):
        lm.load_corpus(str(corpus), "*.txt", 5.0)
    with pytest.raises(TaskError, match="too few for context=512"):
        fit(tmp_path / "run", "context=512", corpus=str(corpus / "module_00.py"))


def test_the_default_corpus_is_this_pythons_standard_library():
    folder = lm.stdlib_folder()
    assert (folder / "os.py").is_file()
    texts = lm.read_text_files(folder / "json", "*.py")
    assert "__init__.py" in texts and all("site-packages" not in name for name in texts)


# ---------------------------------------------------------------------------------------------
# Windows and bits
# ---------------------------------------------------------------------------------------------


def test_training_windows_cover_every_offset_and_stay_inside_the_stream():
    stream = torch.arange(100, dtype=torch.uint8)
    windows = lm.TrainingWindows(stream, context=8)
    assert windows.stride == 4
    generator = torch.Generator().manual_seed(0)
    shifted = torch.cat([windows.shift((windows.starts,), generator)[0] for _ in range(50)])
    assert set(shifted.tolist()) == set(range(int(shifted.max()) + 1))  # every start can be drawn
    assert int(shifted.max()) + 8 + 1 <= 100  # the window of the latest start fits

    class Echo(torch.nn.Module):  # logits that put all mass on the input byte itself
        def forward(self, tokens):
            return torch.nn.functional.one_hot(tokens, 256).float() * 50.0

    # Targets are the inputs moved by one byte: predicting "the next byte is this byte + 1" is exact.
    class Next(torch.nn.Module):
        def forward(self, tokens):
            return torch.nn.functional.one_hot((tokens + 1) % 256, 256).float() * 50.0

    starts = (torch.tensor([0, 10, 50]),)
    assert windows.loss(Next(), starts).item() < 1e-6 < windows.loss(Echo(), starts).item()


def test_bits_per_character_count_utf8_characters_not_bytes():
    ascii_targets = torch.tensor(list(b"abcd"))
    metrics = lm.bits_metrics(4 * math.log(2), ascii_targets)  # one bit per byte
    assert metrics["bpc"] == pytest.approx(1.0) and metrics["perplexity"] == pytest.approx(2.0)
    accented = torch.tensor(list("éé".encode()))  # 4 bytes, 2 characters
    assert lm.characters(accented) == 2
    assert lm.bits_metrics(4 * math.log(2), accented)["bpc"] == pytest.approx(2.0)


def test_unigram_baseline_is_eight_bits_on_uniform_bytes_and_less_on_text():
    uniform = torch.arange(256, dtype=torch.uint8).repeat(40)
    ascii_targets = torch.arange(128).repeat(2)  # every byte a character
    assert lm.unigram_bpc(uniform, ascii_targets) == pytest.approx(8.0, abs=1e-6)
    text = torch.tensor(list(b"hello world, hello python " * 50), dtype=torch.uint8)
    assert lm.unigram_bpc(text, text.long()) < 4.0


def test_validation_windows_do_not_overlap():
    stream = torch.arange(200, dtype=torch.uint8)
    inputs, targets = lm.validation_windows(stream, context=10, tokens=100)
    assert inputs.shape == targets.shape == (10, 10)
    assert torch.equal(targets, inputs + 1)
    assert len(set(targets.flatten().tolist())) == 100


# ---------------------------------------------------------------------------------------------
# The GPT
# ---------------------------------------------------------------------------------------------


def test_gpt_is_causal_and_registered():
    torch.manual_seed(0)
    model = nets.build("gpt", vocab_size=256, d_model=32, depth=2, heads=4, context=16).eval()
    assert nets.kind("gpt") == "language" and model.out_dim == 256
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_generate_repeats_with_the_generator_and_sees_only_its_context():
    torch.manual_seed(0)
    model = GPT(vocab_size=256, d_model=32, depth=1, heads=4, context=8)
    prompt = torch.tensor([list(b"def ")])
    first = model.generate(prompt, 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    again = model.generate(prompt, 20, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert first.shape == (1, 24) and torch.equal(first, again) and torch.equal(first[:, :4], prompt)
    with pytest.raises(ValueError, match="temperature must be positive"):
        model.generate(prompt, 1, temperature=0.0)


def test_heads_must_divide_the_width(tmp_path, corpus):
    with pytest.raises(ValueError, match="heads=3 must divide width=32"):
        fit(tmp_path, "heads=3", corpus=str(corpus))


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def test_a_run_reports_bits_and_the_baseline_and_writes_samples(tmp_path, corpus):
    metrics = fit(tmp_path, "epochs=2", "samples=2", "prompt=import", corpus=str(corpus))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["metric"] == "bpc" and on_disk["test_metric"] == metrics["test_bpc"]
    for key in ("test_loss", "test_bpc", "test_perplexity", "unigram_bpc", "train_bytes", "val_bytes"):
        assert math.isfinite(on_disk[key]), key
    assert on_disk["test_perplexity"] == pytest.approx(2 ** on_disk["test_bpc"])
    assert len(on_disk["samples"]) == 2 and all(text.startswith("import") for text in on_disk["samples"])
    assert on_disk["report"][0].startswith("validation: ") and "unigram baseline" in on_disk["report"][0]
    assert (tmp_path / "samples.txt").read_text().startswith("import")
    assert (tmp_path / "learning_curve.png").is_file() and len(on_disk["history"]) == 2


def test_a_run_resumes_bit_exactly_after_an_interrupt(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(loop, "CHECKPOINT_SECONDS", 0.0)
    overrides = ["epochs=2", "samples=1", "dropout=0.1"]  # dropout: the global generator is restored too
    straight = fit(tmp_path / "straight", *overrides, corpus=str(corpus))
    calls = itertools.count(1)
    real_step = torch.optim.AdamW.step

    def step_or_interrupt(self, *args, **kwargs):
        if next(calls) == 5:  # in epoch 2 (3 steps per epoch)
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step_or_interrupt)
        with pytest.raises(KeyboardInterrupt):
            fit(tmp_path / "resumed", *overrides, corpus=str(corpus))
    resumed = fit(tmp_path / "resumed", *overrides, corpus=str(corpus), resume=True)
    for metrics in (straight, resumed):
        for key in ("seconds", "run_dir"):
            metrics.pop(key)
    assert resumed == straight
    weights = [
        load_checkpoint(tmp_path / run / "checkpoints" / "final.json")[0]["model"]
        for run in ("straight", "resumed")
    ]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.mark.slow
def test_the_gpt_learns_python_far_below_the_unigram_baseline(tmp_path):
    """About a minute on one thread: 240 steps of a small GPT on the standard library."""
    metrics = tasks.run(
        "lm",
        tmp_path,
        overrides=[
            "device=cpu",
            "width=64",
            "layers=2",
            "context=64",
            "batch_size=32",
            "epochs=4",
            "epoch_steps=60",
        ],
    )
    assert metrics["unigram_bpc"] > 4.0
    assert metrics["test_bpc"] < metrics["unigram_bpc"] - 1.0, metrics["history"]
