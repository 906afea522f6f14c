"""``lab explain``: attribution maps of a trained agent or model, and whether they can be trusted.

    lab explain RUN_OR_CKPT [--method NAME[,NAME...]|all] [--episodes N] [--out FILE.mp4|.gif|.png] [--json]

- Agents with image observations (Mario, PPO or DQN): a video of greedy play, the game frame next to
  the same frame under the heat map, with the action, its probability (PPO) and the value or Q gap
  printed on it, at the frame rate of ``lab watch``. ``--head value`` explains PPO's value head.
- Agents with vector observations (CartPole, Acrobot, MiniGrid): the attribution of each feature over
  an episode, as a plot. A recurrent agent is explained with the memory it had at each step.
- ``lab fit`` runs: digits (a grid of test images with their maps, true and predicted labels),
  sentiment and sequence models (token attributions, and attention weights for Transformers, drawn
  over the text).

Every run also checks its maps (``explain.checks``): deletion curves against a random order,
cascading randomisation of the weights, and integrated gradients' completeness. The table is printed,
written to a JSON file next to the picture, and summarised in the video's caption. ``lab watch --explain
METHOD`` is a shortcut to the video of one method.

Imports of torch, captum and the lab's packages happen inside the functions, so ``lab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lab.errors import UsageError

IMAGE_SUFFIXES = (".mp4", ".gif", ".png")
DEFAULT_TEXT_EXAMPLES = 8
DEFAULT_DIGIT_EXAMPLES = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``lab explain``."""
    parser.add_argument("run", metavar="RUN_OR_CKPT", help="an agent run (lab train) or a lab fit run")
    parser.add_argument(
        "--method",
        default=None,
        help="saliency, gradient_x_input, integrated_gradients, grad_cam, perturbation; several joined by "
        "commas, or all (the picture shows the first). Default: saliency for image agents, "
        "integrated_gradients for vectors and text, grad_cam,integrated_gradients for digits",
    )
    parser.add_argument(
        "--episodes", type=_positive_int, default=1, help="agents: episodes to play (default 1)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="picture or video: .mp4/.gif/.png for image agents, .png otherwise "
        "(default RUN/explain/<method>.<ext>); the JSON report goes next to it",
    )
    parser.add_argument(
        "--head",
        choices=["policy", "value"],
        default="policy",
        help="PPO: explain the action's log-probability (policy) or the value V(s)",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the env")
    parser.add_argument(
        "--max-steps", type=_positive_int, default=1000, help="agents: cut an episode after this many steps"
    )
    parser.add_argument(
        "--stride",
        type=_positive_int,
        default=1,
        help="agents: explain every N-th frame and hold its map for the frames between (perturbation is slow)",
    )
    parser.add_argument(
        "--patch-stride",
        type=_positive_int,
        default=None,
        help="perturbation: pixels between the blurred patches (default 5; 10 is about 4 times faster)",
    )
    parser.add_argument(
        "--ig-steps",
        type=_positive_int,
        default=None,
        help="points of integrated gradients' path (default 48)",
    )
    parser.add_argument(
        "--ig-baseline",
        default="zero",
        help="integrated gradients from black frames (zero) or blurred ones (blur, images only); "
        "zero,blur runs both (default zero)",
    )
    parser.add_argument(
        "--check-frames",
        type=_positive_int,
        default=200,
        help="frames (or examples) of the deletion check, spread over the episode (default 200)",
    )
    parser.add_argument(
        "--sanity-frames",
        type=_positive_int,
        default=16,
        help="frames of the randomisation check, which recomputes the maps once per layer (default 16)",
    )
    parser.add_argument("--no-checks", action="store_true", help="draw the maps only, skip the checks")
    parser.add_argument("--examples", type=_positive_int, default=None, help="lab fit runs: examples drawn")
    parser.add_argument(
        "--small", action="store_true", help="half size, every other frame (a GIF small enough for a README)"
    )
    parser.add_argument(
        "--human",
        action="store_true",
        help="image agents: show the explained play in a window, write nothing",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary as the last line")


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, "a non-negative integer")


def _integer(text: str, smallest: int, what: str) -> int:
    # lab.cli has the same converters; importing them here would make cli and explain import each other.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < smallest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> dict[str, Any]:
    """Explains an agent run or a ``lab fit`` run; returns the JSON summary."""
    from explain.supervised import is_fit_run

    if is_fit_run(args.run):
        return explain_fit(args)
    return explain_agent(args)


def parse_methods(text: str | None, default: list[str]) -> list[str]:
    """The methods asked for: a comma-separated list, ``all``, or ``default`` when None.

    Raises:
        UsageError: An unknown method (one line with the valid ones).
    """
    from explain.methods import METHODS

    if text is None:
        return list(default)
    names = (
        list(METHODS) if text.strip() == "all" else [name.strip() for name in text.split(",") if name.strip()]
    )
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise UsageError(
            f"lab explain: unknown method '{(unknown or [text])[0]}'; valid: {', '.join(METHODS)}, all"
        )
    return list(dict.fromkeys(names))  # in order, once each


IG_BASELINES = ("zero", "blur")


def method_variants(
    methods: list[str], args: argparse.Namespace, image: bool
) -> list[tuple[str, dict[str, Any]]]:
    """``(method, options)`` for each method asked for; IG once per ``--ig-baseline``.

    Raises:
        UsageError: An unknown baseline, or a blurred one for observations that are not images.
    """
    baselines = [name.strip() for name in str(args.ig_baseline).split(",") if name.strip()]
    unknown = [name for name in baselines if name not in IG_BASELINES]
    if unknown or not baselines:
        raise UsageError(
            f"lab explain: unknown --ig-baseline '{(unknown or [args.ig_baseline])[0]}'; valid: {', '.join(IG_BASELINES)}"
        )
    if "blur" in baselines and not image:
        raise UsageError("lab explain: --ig-baseline blur needs image observations; valid here: zero")
    variants: list[tuple[str, dict[str, Any]]] = []
    for name in methods:
        if name == "perturbation" and args.patch_stride is not None:
            variants.append((name, {"stride": args.patch_stride}))
            continue
        if name != "integrated_gradients":
            variants.append((name, {}))
            continue
        for baseline in dict.fromkeys(baselines):
            options: dict[str, Any] = {"baseline": baseline}
            if args.ig_steps is not None:
                options["steps"] = args.ig_steps
            variants.append((name, options))
    return variants


def output_paths(
    args: argparse.Namespace, run_dir: Path, stem: str, suffix: str, valid: tuple[str, ...]
) -> tuple[Path, Path]:
    """The picture (``--out`` or ``RUN/explain/<stem><suffix>``) and the JSON report next to it.

    Raises:
        UsageError: An ``--out`` whose suffix this run cannot produce.
    """
    out = Path(args.out) if args.out else run_dir / "explain" / f"{stem}{suffix}"
    if out.suffix.lower() not in valid:
        raise UsageError(f"lab explain: --out must end in {', '.join(valid)} for this run, got {out.name!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, out.with_suffix(".json")


def print_table(title: str, reports: list[Any]) -> None:
    from explain.checks import format_table

    print(title)
    print(format_table(reports))


def finish(
    summary: dict[str, Any], json_path: Path, args: argparse.Namespace, title: str, reports: list[Any]
) -> dict[str, Any]:
    """Writes the JSON report, prints the table and where things went; returns the summary."""
    from core.files import atomic_write_json, jsonable

    summary["outputs"] = {**summary.get("outputs", {}), "json": str(json_path)}
    atomic_write_json(json_path, jsonable(summary))
    if not args.json:
        print_table(title, reports)
        for kind, path in summary["outputs"].items():
            print(f"{kind}: {path}")
    return summary


# ---------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------


def explain_agent(args: argparse.Namespace) -> dict[str, Any]:
    """``lab explain`` on an agent run: play, explain every (``--stride``-th) frame, check, draw."""
    import torch

    from agents import load_agent
    from explain import checks
    from explain.agents import agent_net, agent_subject, check_method, play, target_of

    loaded = load_agent(args.run, "cpu", getattr(args, "stochastic", False), args.seed)
    obs_shape = tuple(loaded.meta["obs_shape"])
    image = len(obs_shape) >= 2
    methods = parse_methods(args.method, ["saliency"] if image else ["integrated_gradients"])
    network = agent_net(loaded).network
    try:
        for name in methods:
            check_method(name, network, obs_shape)
        target_of(loaded.meta["algo"], args.head)
    except ValueError as error:
        raise UsageError(f"lab explain: {error}") from None
    variants = method_variants(methods, args, image)
    if args.human:
        if not image:
            raise UsageError(
                "lab explain --human needs an agent with image observations; this one sees vectors"
            )
        return explain_live(args, loaded, methods[0])
    stem = methods[0] + ("-value" if args.head == "value" else "")
    out, json_path = output_paths(
        args, loaded.run_dir, stem, ".mp4" if image else ".png", IMAGE_SUFFIXES if image else (".png",)
    )
    started = time.perf_counter()
    recording = play(loaded, args.episodes, args.seed, args.max_steps, render=image)
    play_seconds = time.perf_counter() - started
    subject = agent_subject(loaded, recording, args.head)
    explained = torch.arange(0, subject.frames, args.stride)
    subject = checks.subset(subject, explained)
    reports, first_maps = [], None
    for name, options in variants:
        result, report = checks.explain_and_check(
            subject,
            name,
            options,
            checks=not args.no_checks,
            sanity_frames=args.sanity_frames,
            check_frames=args.check_frames,
        )
        reports.append(report)
        first_maps = result.maps if first_maps is None else first_maps
    target = subject.target
    if image:
        picture = draw_agent_video(args, out, recording, first_maps, reports[0], target.name)
    else:
        picture = draw_feature_plot(out, loaded, recording, first_maps, args.stride, methods[0], target.name)
    summary: dict[str, Any] = {
        "run": str(args.run),
        "checkpoint": str(loaded.sidecar),
        "env": loaded.config.env,
        "algo": loaded.meta["algo"],
        "net": getattr(loaded.config, "net", None),
        "memory": getattr(loaded.config, "memory", "none"),
        "head": args.head,
        "target": {"explains": target.kind, "deletion_watches": target.deletion_kind},
        "frames": len(recording.steps),
        "explained_frames": len(explained),
        "stride": args.stride,
        "play_seconds": round(play_seconds, 2),
        "episodes": [vars(episode) for episode in recording.episodes],
        "methods": [report.to_json() for report in reports],
        "outputs": {"picture": str(picture)},
    }
    title = (
        f"{loaded.meta['algo'].upper()} on {loaded.config.env}, {target.name} head: "
        f"{len(explained)} frames of {len(recording.steps)}"
    )
    return finish(summary, json_path, args, title, reports)


def caption_line(recording: Any, step: Any, index: int, algo: str) -> str:
    """The first caption line of a frame: episode, step, action, its probability, value, position."""
    text = f"ep {step.episode + 1}  t {index}  {recording.action_name(step.action)}"
    if step.prob is not None:
        text += f"  p={step.prob:.2f}"
    text += f"  {'V' if algo == 'ppo' else 'maxQ'}={step.value:.2f}"
    if step.x_pos is not None:
        text += f"  x={step.x_pos}"
    return text


def draw_agent_video(
    args: argparse.Namespace, out: Path, recording: Any, maps: Any, report: Any, target_name: str
) -> Path:
    """Writes the side-by-side video (or, for a .png, four moments of it stacked)."""
    import numpy as np

    from envs.video import write_video
    from explain import render

    algo = "ppo" if recording.steps[0].prob is not None else "dqn"
    heat = render.display_heatmaps(maps)  # (K, h, w), smoothed for the eye
    checks_line = f"{report.label} ({target_name}): {report.caption()}".rstrip(": ")
    fps = recording.fps
    # --small: every other frame at half size and half the frame rate, so it plays at the same speed.
    every, scale, font = (2, 0.5, 0.33) if args.small else (1, 1.0, 0.45)
    frames = render.same_height(
        [
            render.agent_frame(
                step.frame,
                heat[min(index // args.stride, len(heat) - 1)],
                caption_line(recording, step, index, algo) + "\n" + checks_line,
                recording.crop_top,
                scale=scale,
                font_scale=font,
            )
            for index, step in enumerate(recording.steps)
            if index % every == 0
        ]
    )
    if out.suffix.lower() == ".png":
        moments = np.linspace(0, len(frames) - 1, min(4, len(frames))).round().astype(int)
        return render.save_png(np.concatenate([frames[i] for i in moments], axis=0), out)
    return write_video(frames, out, fps=fps / every)


def draw_feature_plot(
    out: Path, loaded: Any, recording: Any, maps: Any, stride: int, method: str, target_name: str
) -> Path:
    """Per-feature attributions over the episode(s) for vector observations."""
    from explain import render
    from explain.agents import feature_groups, grouped_attributions

    groups = feature_groups(loaded.config.env, int(maps[0].numel()))
    values, names = grouped_attributions(maps, groups)
    memory = getattr(loaded.config, "memory", "none")
    title = (
        f"{method} of the {target_name} of {loaded.meta['algo'].upper()}"
        + (f" ({memory} memory carried through the episode)" if memory != "none" else "")
        + f" on {loaded.config.env}"
        + (f", every {stride}th step" if stride > 1 else "")
    )
    return render.feature_attribution_plot(values, names, out, title=title)


def explain_live(args: argparse.Namespace, loaded: Any, method: str) -> dict[str, Any]:
    """Plays and explains step by step in a window (``lab/viewer.py``); writes nothing."""
    import torch

    from explain import render
    from explain.agents import AgentNet, Step, agent_net, cam_module_of, play, target_of
    from explain.checks import Subject, method_maps
    from lab.viewer import Viewer, require_display

    require_display("write a video instead: lab explain RUN --out FILE.mp4", command="lab explain --human")
    template = agent_net(loaded)
    target = target_of(template.algo, args.head)
    recording_ref: list[Any] = []
    options = method_variants([method], args, image=True)[0][1]
    title = f"lab explain: {method} on {loaded.config.env}"

    with Viewer(title, fps=_render_fps(loaded.config.env)) as viewer:

        def show(step: Step) -> bool:
            memory = [step.state] if step.state is not None else None
            module = AgentNet(template.network, template.algo, memory, torch.tensor([step.start]))
            subject = Subject(
                module,
                torch.as_tensor(step.obs[None]),
                torch.tensor([step.action]),
                target,
                lambda copy: cam_module_of(copy, args.head),
            )
            heat = render.display_heatmaps(method_maps(subject, method, options=options).maps)[0]
            index = len(recording_ref)
            recording_ref.append(step)
            text = f"ep {step.episode + 1}  t {index}  action {step.action}  V={step.value:.2f}  {method}"
            return viewer.show(render.agent_frame(step.frame, heat, text))

        recording = play(loaded, args.episodes, args.seed, args.max_steps, render=True, on_step=show)
    return {
        "run": str(args.run),
        "method": method,
        "frames": len(recording.steps),
        "shown": viewer.frames_drawn,
    }


def _render_fps(env_name: str) -> float:
    import envs

    env = envs.make(env_name)
    try:
        return float(env.metadata.get("render_fps") or 30)
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------
# lab fit runs
# ---------------------------------------------------------------------------------------------


def explain_fit(args: argparse.Namespace) -> dict[str, Any]:
    """``lab explain`` on a ``lab fit`` run: digits or text."""
    from explain.supervised import load_fit_run

    if args.human:
        raise UsageError("lab explain --human needs an agent run; a lab fit run is drawn to a .png")
    try:
        run = load_fit_run(args.run)
    except ValueError as error:
        raise UsageError(f"lab explain: {error}") from None
    if run.task == "digits":
        return explain_digits(args, run)
    return explain_text(args, run)


def explain_digits(args: argparse.Namespace, run: Any) -> dict[str, Any]:
    """Grad-CAM and integrated gradients (by default) on the held-out digits, drawn as a grid."""
    from torch import nn

    from explain import checks, render
    from explain.methods import get_method, last_conv_layer
    from explain.supervised import digits_subject

    has_conv = any(isinstance(layer, nn.Conv2d) for layer in run.model.modules())
    methods = parse_methods(
        args.method, ["grad_cam", "integrated_gradients"] if has_conv else ["integrated_gradients"]
    )
    for name in methods:
        if get_method(name).needs_conv:
            try:
                last_conv_layer(run.model.encoder)
            except ValueError as error:
                raise UsageError(f"lab explain: {error}") from None
    variants = method_variants(methods, args, image=True)
    out, json_path = output_paths(args, run.run_dir, f"digits-{methods[0]}", ".png", (".png",))
    subject, labels = digits_subject(run)
    subject = checks.subset(subject, checks.evenly_spaced(subject.frames, args.check_frames))
    labels = labels[checks.evenly_spaced(len(labels), args.check_frames)]
    reports, maps = [], {}
    for name, options in variants:
        result, report = checks.explain_and_check(
            subject, name, options, not args.no_checks, args.sanity_frames
        )
        reports.append(report)
        maps[report.label] = result.maps
    shown = checks.evenly_spaced(subject.frames, args.examples or DEFAULT_DIGIT_EXAMPLES)
    picture = render.image_grid_plot(
        subject.obs[shown],
        {name: values[shown] for name, values in maps.items()},
        labels[shown].tolist(),
        subject.index[shown].tolist(),
        out,
        columns=4,
        title=f"digits ({run.config.net}): " + ", ".join(methods) + " of the predicted class",
    )
    summary = {
        "run": str(args.run),
        "checkpoint": str(run.sidecar),
        "task": run.task,
        "net": run.config.net,
        "examples": subject.frames,
        "accuracy": float((subject.index == labels).float().mean()),
        "methods": [report.to_json() for report in reports],
        "outputs": {"picture": str(picture)},
    }
    return finish(
        summary, json_path, args, f"digits ({run.config.net}): {subject.frames} test images", reports
    )


def explain_text(args: argparse.Namespace, run: Any) -> dict[str, Any]:
    """Token integrated gradients (and attention weights for Transformers) drawn over the text."""
    from explain import render
    from explain.checks import evenly_spaced
    from explain.supervised import select_examples, text_examples
    from explain.text import attention_weights, explain_tokens

    methods = parse_methods(args.method, ["integrated_gradients"])
    if methods != ["integrated_gradients"]:
        raise UsageError(
            "lab explain: text models are explained with integrated_gradients on the token embedding "
            "(and attention weights for Transformers); valid: integrated_gradients"
        )
    out, json_path = output_paths(args, run.run_dir, f"{run.task}-integrated_gradients", ".png", (".png",))
    examples = text_examples(run)
    examples = select_examples(examples, evenly_spaced(len(examples.labels), args.check_frames))
    steps = args.ig_steps or 48
    attributions, predicted, report = explain_tokens(
        run.model, examples.batch, steps, not args.no_checks, args.sanity_frames
    )
    shown = evenly_spaced(len(predicted), args.examples or DEFAULT_TEXT_EXAMPLES)
    shown_examples = select_examples(examples, shown)
    attention = attention_weights(run.model, shown_examples.batch)
    rows = []
    names = examples.class_names
    for row, index in enumerate(shown.tolist()):
        words = examples.words[index]
        truth, guess = names[int(examples.labels[index])], names[int(predicted[index])]
        caption = f"true {truth} / predicted {guess}: integrated gradients"
        rows.append(render.TokenRow(words, attributions.scores[index, : len(words)], caption))
        if attention is not None:
            rows.append(
                render.TokenRow(words, attention[row, : len(words)], "attention (last block)", signed=False)
            )
    picture = render.token_rows_plot(
        rows, out, title=f"{run.task} ({run.config.net}): why the model predicts what it does"
    )
    summary = {
        "run": str(args.run),
        "checkpoint": str(run.sidecar),
        "task": run.task,
        "net": run.config.net,
        "examples": len(predicted),
        "accuracy": float((predicted == examples.labels).float().mean()),
        "attention": attention is not None,
        "methods": [report.to_json()],
        "outputs": {"picture": str(picture)},
    }
    return finish(
        summary, json_path, args, f"{run.task} ({run.config.net}): {len(predicted)} test examples", [report]
    )


# ---------------------------------------------------------------------------------------------
# lab watch --explain
# ---------------------------------------------------------------------------------------------


def watch_explain(args: argparse.Namespace) -> dict[str, Any]:
    """``lab watch RUN --explain METHOD``: the video of ``lab explain RUN --method METHOD`` (with checks)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    explain_args = parser.parse_args([str(args.run)])
    explain_args.method = args.explain
    for name in ("episodes", "out", "human", "seed", "max_steps", "small", "json", "stochastic"):
        if getattr(args, name, None) is not None:  # watch's own defaults may be None ("not given")
            setattr(explain_args, name, getattr(args, name))
    return cmd_explain(explain_args)
