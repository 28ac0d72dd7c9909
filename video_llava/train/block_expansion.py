"""Grow a checkpoint's language model by appending decoder blocks that start as the identity.

LLaMA Pro's block expansion (Wu et al., 2024): a new block whose attention output projection and MLP down
projection are zero adds nothing to the residual stream, so the grown model computes exactly what the old one
did, and fine-tuning then puts the extra depth to use without losing what was learned. transformers has no
helper for this (its ``resize_token_embeddings`` grows vocabularies, not depth), hence these few lines. Unlike
LLaMA Pro, which copies the block below, the new blocks' other weights keep the model's seeded random init.
"""

from __future__ import annotations

from pathlib import Path


def expand_llm(source: str | Path, dest: str | Path, layers: int, seed: int = 0) -> dict[str, int]:
    """Write ``source`` with its LLM grown to ``layers`` decoder blocks (new ones on top) to ``dest``, with the
    processor and tokenizer. Returns the old and new block counts; refuses to shrink or keep the depth."""
    import torch

    from video_llava.model.loading import load_checkpoint

    old, processor = load_checkpoint(source)  # the checkpoint's family's classes
    config = old.config
    before = config.text_config.num_hidden_layers
    if layers <= before:
        raise ValueError(f"the LLM already has {before} blocks; --layers must be more, got {layers}")
    config.text_config.num_hidden_layers = layers
    if getattr(config.text_config, "layer_types", None):
        config.text_config.layer_types = [config.text_config.layer_types[0]] * layers
    torch.manual_seed(seed)
    grown = type(old)(config)
    missing, unexpected = grown.load_state_dict(old.state_dict(), strict=False)
    new_prefixes = tuple(f"model.language_model.layers.{i}." for i in range(before, layers))
    if unexpected or any(not k.startswith(new_prefixes) for k in missing):
        raise RuntimeError(f"unexpected weights when growing: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for block in grown.model.language_model.layers[before:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    grown.generation_config = old.generation_config
    dest = Path(dest)
    grown.save_pretrained(dest)
    processor.save_pretrained(dest)
    return {"layers_before": before, "layers": layers}
