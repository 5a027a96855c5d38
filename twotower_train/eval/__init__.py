"""Evaluation: the backbone (AR) and the two-tower model (diffusion) on the same tasks.

Files: ``harness.py`` (``EvalConfig``, ``evaluate``: one call, one report), ``tasks.py``
(built-in tasks from the tiny world), ``likelihood.py`` (log-likelihoods of both towers,
perplexity, diffusion ELBO), ``report.py`` (report.json / report.md / plot / W&B),
``lm_eval_adapter.py`` (``TwoTowerLM`` for lm-evaluation-harness) with local task YAMLs in
``lm_eval_tasks/``, ``bench_decode.py`` (decoding benchmark), ``tiny_tasks.py`` (exact match
of a plain HF model). See docs/evaluation.md.
"""
