"""Explainability of the lab's agents and models: attribution maps, faithfulness checks, pictures.

The core works on a plain ``torch.nn.Module`` (or any callable) and a score function, so PPO
actor-critics, DQN Q-networks and supervised models all plug in the same way:

- ``explain.methods``: score functions (``make_score_fn``) and the methods ``saliency``,
  ``gradient_x_input``, ``integrated_gradients``, ``grad_cam``, ``perturbation`` (``METHODS``,
  ``get_method``), ``to_heatmap`` for display.
- ``explain.faithfulness``: ``deletion_curve``, ``deletion_ratio``, ``cascading_randomization``.
- ``explain.checks``: one method on many frames, its cost and the three checks as typed records
  (``MethodReport``), and the table ``lab explain`` prints.
- ``explain.render``: ``overlay``, ``side_by_side``, ``agent_frame``, ``save_png`` and matplotlib plots
  for vectors, digits and text (import it as ``from explain import render``; it needs cv2 and matplotlib).

Integration with the layers below, imported on their own (they pull in envs, agents or tasks):

- ``explain.agents``: a trained agent as a module (``AgentNet``, memory carried per frame) and the
  greedy play that records what it saw (``play``).
- ``explain.supervised``: ``lab fit`` runs rebuilt with their held-out data (digits, sentiment, sequence).
- ``explain.text``: token attributions on the embedding (captum's LayerIntegratedGradients), attention
  weights, and the checks on tokens.
"""

from __future__ import annotations

from explain.faithfulness import (
    DeletionCurve,
    DeletionRatio,
    LayerRandomization,
    RandomizationReport,
    cascading_randomization,
    deletion_curve,
    deletion_ratio,
)
from explain.methods import (
    METHODS,
    SCORE_KINDS,
    IntegratedGradientsResult,
    Method,
    ScoreFn,
    TargetScore,
    completeness_error,
    get_method,
    grad_cam,
    gradient_x_input,
    integrated_gradients,
    integrated_gradients_with_delta,
    last_conv_layer,
    make_score_fn,
    module_method,
    perturbation,
    saliency,
    to_float_obs,
    to_heatmap,
)

__all__ = [
    "METHODS",
    "SCORE_KINDS",
    "DeletionCurve",
    "DeletionRatio",
    "IntegratedGradientsResult",
    "LayerRandomization",
    "Method",
    "RandomizationReport",
    "ScoreFn",
    "TargetScore",
    "cascading_randomization",
    "completeness_error",
    "deletion_curve",
    "deletion_ratio",
    "get_method",
    "grad_cam",
    "gradient_x_input",
    "integrated_gradients",
    "integrated_gradients_with_delta",
    "last_conv_layer",
    "make_score_fn",
    "module_method",
    "perturbation",
    "saliency",
    "to_float_obs",
    "to_heatmap",
]
