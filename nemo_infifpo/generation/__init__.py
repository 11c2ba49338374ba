"""The paper's data-construction stage: from prompts to SFT rows and preference pairs.

- :mod:`.prompts` -- prompt rows (``prompt`` + optional ``id`` + extra columns)
- :mod:`.sampling` -- sampling settings, per-prompt seeds, what a generated sample becomes
- :mod:`.backends` -- transformers and vLLM generation
- :mod:`.generate` -- :func:`run_generation` (``recipes/generate.py``)
- :mod:`.judges` -- reward-model and function judges
- :mod:`.judging` -- :func:`run_judge` (``recipes/judge.py``)
- :mod:`.pairs` -- the selection rules and the split
- :mod:`.build` -- :func:`build_pairs` (``recipes/build_pairs.py``), streaming
- :mod:`.outputs` -- sharded, resumable, fingerprinted record outputs
- :mod:`.verifiers` -- function judges for rows with a reference answer

Heavy modules (torch, transformers, vLLM) load only when a job runs.
"""
