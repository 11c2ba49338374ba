"""Scoring jobs: per-model sequence log-prob sums and token counts, sharded and resumable,
and the merge of the pivot's and the sources' scores into the training set.

- :mod:`.job` -- :class:`ScoreConfig`, :func:`run_scoring` (what ``recipes/score.py`` runs)
- :mod:`.batching` -- length-sorted token-budget batches
- :mod:`.backends` -- the megatron-core and Hugging Face back ends
- :mod:`.manifest` -- fingerprints, the manifest, resume checks
- :mod:`.shards` -- shard assignment and the per-shard files
- :mod:`.merge` -- :func:`merge_scores` (what ``recipes/merge_scores.py`` runs)

Heavy modules (torch models, megatron) load only when a job runs.
"""

from nemo_infifpo.scoring.job import ScoreConfig, ScoringSummary, run_scoring
from nemo_infifpo.scoring.manifest import ScoringIdentity, ScoringMismatchError
from nemo_infifpo.scoring.merge import MergeError, merge_scores

__all__ = [
    "MergeError",
    "ScoreConfig",
    "ScoringIdentity",
    "ScoringMismatchError",
    "ScoringSummary",
    "merge_scores",
    "run_scoring",
]
