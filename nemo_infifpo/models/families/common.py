"""Weight rules every supported family shares: embedding, norms, attention output, MLP output.

Megatron names are GPTModel parameter names in the local-spec layout (see ``mapping``).
"""

from __future__ import annotations

from nemo_infifpo.models.architecture import ArchitectureSpec
from nemo_infifpo.models.mapping import LAYER, Copy, WeightRule

MEGATRON_LAYER = f"decoder.layers.{LAYER}"
HF_LAYER = f"model.layers.{LAYER}"

# TP axes: column-parallel layers split their output rows (0), row-parallel ones their
# input columns (1); norms are replicated on every TP rank.
COLUMN_PARALLEL = 0
ROW_PARALLEL = 1


def embedding_rule() -> Copy:
    return Copy("embedding.word_embeddings.weight", "model.embed_tokens.weight", COLUMN_PARALLEL, pads_vocab=True)


def output_rules(arch: ArchitectureSpec) -> tuple[WeightRule, ...]:
    """Final norm and LM head. A tied model exports no ``lm_head``; megatron's last pipeline
    stage still holds a copy of the embedding when PP > 1, filled from the same HF tensor."""
    head_source = "model.embed_tokens.weight" if arch.tied_embeddings else "lm_head.weight"
    return (
        Copy("decoder.final_layernorm.weight", "model.norm.weight"),
        Copy(
            "output_layer.weight",
            head_source,
            COLUMN_PARALLEL,
            pads_vocab=True,
            exported=not arch.tied_embeddings,
        ),
    )


def layer_norm_rules() -> tuple[WeightRule, ...]:
    return (
        Copy(f"{MEGATRON_LAYER}.input_layernorm.weight", f"{HF_LAYER}.input_layernorm.weight"),
        Copy(f"{MEGATRON_LAYER}.pre_mlp_layernorm.weight", f"{HF_LAYER}.post_attention_layernorm.weight"),
    )


def output_projection_rules() -> tuple[WeightRule, ...]:
    return (
        Copy(f"{MEGATRON_LAYER}.self_attention.linear_proj.weight", f"{HF_LAYER}.self_attn.o_proj.weight", ROW_PARALLEL),
        Copy(f"{MEGATRON_LAYER}.mlp.linear_fc2.weight", f"{HF_LAYER}.mlp.down_proj.weight", ROW_PARALLEL),
    )
