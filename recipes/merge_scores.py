"""Merge scoring outputs into the training set (Hydra app; see configs/merge_scores.yaml).

Single process: ``python recipes/merge_scores.py data.path=... pivot_dir=... source_dirs=[...]
output_path=...``; the work itself is :func:`nemo_infifpo.scoring.merge.merge_scores`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../configs", config_name="merge_scores", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nemo_infifpo.scoring.merge import merge_scores

    options = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(options, dict)
    data = options.get("data") or {}
    report = merge_scores(
        data["path"],
        options["pivot_dir"],
        list(options.get("source_dirs") or []),
        options["output_path"],
        source_names=options.get("source_names"),
        data_split=data.get("split"),
    )
    logging.getLogger("merge_scores").info(
        "rows in %d, out %d, excluded %d", report["rows_in"], report["rows_out"], report["rows_excluded"]
    )


if __name__ == "__main__":
    main()
