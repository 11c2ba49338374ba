"""Merge scoring outputs into the training set (Hydra app; see configs/merge_scores.yaml).

Single process: ``python recipes/merge_scores.py data.path=... pivot_dir=... source_dirs=[...]
output_path=...``; the work itself is :func:`nemo_infifpo.scoring.merge.merge_scores`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_infifpo.logs import setup_logging


@hydra.main(config_path="../configs", config_name="merge_scores", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    from nemo_infifpo.data.errors import ConfigError, exit_on_input_error
    from nemo_infifpo.data.policy import RowPolicy
    from nemo_infifpo.scoring.merge import merge_scores

    # Bad options, data or score directories end with one message naming them, no traceback.
    with exit_on_input_error(stage="merge"):
        options = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(options, dict)
        data = options.get("data") or {}
        missing = [
            key
            for key, value in (("data.path", data.get("path")), ("pivot_dir", options.get("pivot_dir")),
                               ("output_path", options.get("output_path")))
            if value in (None, "", "???")
        ]
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")
        source_dirs = options.get("source_dirs") or []
        if not isinstance(source_dirs, list):
            raise ConfigError(f"source_dirs must be a list of directories, e.g. source_dirs=[a,b], got {source_dirs!r}")
        report = merge_scores(
            data["path"],
            options["pivot_dir"],
            source_dirs,
            options["output_path"],
            source_names=options.get("source_names"),
            data_split=data.get("split"),
            policy=RowPolicy.from_mapping(data),
        )
    logging.getLogger("merge_scores").info(
        "rows in %d, out %d, excluded %d", report["rows_in"], report["rows_out"], report["rows_excluded"]
    )

if __name__ == "__main__":
    main()
