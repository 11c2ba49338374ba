"""The offline demo: the paper's recipe in a tiny world, through the real entry points on CPU
(``make demo``).

- :mod:`.config`   typed demo configuration (``configs/demo.yaml``, ``configs/demo_ci.yaml``)
- :mod:`.world`    skills and their checker, prompts (train / validation / held-out), tiny
                   models and the rows that make them, the lm-eval tasks
- :mod:`.pipeline` the stages, each a subprocess of the entry point a cluster runs
                   (generate, judge, build_pairs, train_infifpo under torchrun, score, merge,
                   export_hf, evaluate)
- :mod:`.report`   ``report.md``, ``summary.json`` and the plots
- :mod:`.seeds`    the table over seeds (``make demo-seeds``)
- :mod:`.sweep`    the settings sweep on validation prompts (``make demo-sweep``)

Entry points: ``recipes/demo.py``, ``recipes/demo_seeds.py``, ``recipes/demo_sweep.py``.
"""
