"""Evaluation: the backbone (AR) and the two-tower model (diffusion) on the same tasks.

Files: ``harness.py`` (``evaluate``: one call, one report), ``tasks.py`` (the task
registry and the exact-match scorer), ``tiny_world_tasks.py`` (the tiny world's tasks,
registered there),
``likelihood.py`` (log-likelihoods of both towers, perplexity, diffusion ELBO),
``report.py`` (report.json / report.md / plot / W&B), ``lm_eval_adapter.py`` (``TwoTowerLM``
for lm-evaluation-harness; the tiny world's task YAMLs are in
``lm_eval_tasks/``).
See docs/evaluation.md.
"""
