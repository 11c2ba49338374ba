"""Evaluation of Hugging Face checkpoints with lm-evaluation-harness (``recipes/evaluate.py``).

- :mod:`~nemo_infifpo.evaluation.config` — the recipe's options, parsed strictly;
- :mod:`~nemo_infifpo.evaluation.tasks` — task names checked against lm-eval's registry;
- :mod:`~nemo_infifpo.evaluation.fingerprint` — what makes two evaluations the same;
- :mod:`~nemo_infifpo.evaluation.harness` — one model through ``lm_eval.simple_evaluate``;
- :mod:`~nemo_infifpo.evaluation.summary` — the comparison table across models;
- :mod:`~nemo_infifpo.evaluation.run` — the whole stage: skip, evaluate, summarise.
"""
