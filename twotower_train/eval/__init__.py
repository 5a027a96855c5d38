"""Evaluation: the backbone (AR) and the two-tower model (diffusion) on the same tasks.

Files: ``harness.py`` (``evaluate``: one call, one report), ``tasks.py`` (the task
registry and the exact-match scorer; the tiny world registers its tasks there),
``likelihood.py`` (log-likelihoods of both towers, perplexity, diffusion ELBO),
``report.py`` (report.json / report.md / plot / W&B), ``lm_eval_adapter.py`` (``TwoTowerLM``
for lm-evaluation-harness; the tiny world's task YAMLs are in
``twotower_train/tiny_world/lm_eval_tasks/``), ``bench_decode.py`` (decoding benchmark).
See docs/evaluation.md.
"""
