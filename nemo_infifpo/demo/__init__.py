"""The offline demo: a tiny fusion world run through the real pipeline on CPU (``make demo``).

- :mod:`.config`   typed demo configuration (``configs/demo.yaml``, ``configs/demo_ci.yaml``)
- :mod:`.world`    skills with checkable answers, tokenizers, tiny models, SFT/preference data
- :mod:`.pipeline` the stages, each a subprocess of the same entry point the cluster runs
                   (``recipes/train_infifpo.py`` under torchrun, ``recipes/score.py``, ...)
- :mod:`.evaluate` held-out preference accuracy and greedy exact match with transformers
- :mod:`.report`   ``report.md``, ``summary.json`` and the plots

Entry point: ``python recipes/demo.py [--config-name demo_ci] [key=value ...]``.
"""
