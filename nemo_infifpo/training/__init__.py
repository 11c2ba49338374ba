"""InfiFPO training of the pivot on megatron-core (TP/PP/DP), one concern per module.

==================  ==========================================================================
``config``          typed config (Hydra YAML -> dataclasses), validated before anything runs
``dataset``         scored rows re-tokenized with the pivot's ResponseTokenizer; fingerprint check
``sampler``         seeded global batches and each data-parallel rank's share
``batches``         pairs -> padded or packed micro-batches (chosen + rejected together)
``objective``       per-micro-batch loss in the [sum, count] reduction contract
``model``           MegatronInfiFPOModel (NeMo ModelPT): the GPTModel and its forward step
``optimizer``       gradient sync + AdamW + clipping: megatron (GPU) / torch (CPU), one interface
``schedule``        linear warm-up + cosine learning rate
``parity``          step-0 check: the pivot reproduces the precomputed p0 scores
``checkpoint``      atomic, resumable, reshardable checkpoints (model part = nemo_infifpo.models)
``metrics``         metrics.jsonl, TensorBoard, W&B, progress bar, MFU
``signals``         SIGTERM/SIGUSR1 -> finish the step, save, exit 0
``loop``            :func:`train`, the loop that ties them together
==================  ==========================================================================

Heavy modules (megatron, NeMo) are imported by the modules that need them, not here, so
``nemo_infifpo.training.config`` stays cheap to import for validation.
"""
