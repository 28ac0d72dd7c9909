"""Training on pruned video prompts (``jobs.sft --video-prune-rates``): the forward's inputs with each video's
features cut by the rule serving applies (``model.pruning``) into the fewer placeholders its example kept
(``train.examples.pruned_example``), so a model trained this way sees what a request with that budget gives it.

transformers' forward splices all of a video's features or none, so the embeddings are built here, as
``model.media_embeds`` builds them for serving, and the model gets ``inputs_embeds`` (its images, if any, still
spliced by transformers: their placeholders keep their token embedding)."""

from __future__ import annotations

from typing import Any

from video_llava.train.examples import VIDEO_KEPT


def pruned_video_inputs(model: Any, batch: dict[str, Any], video_token_id: int, per_frame: int) -> dict[str, Any]:
    """The forward's keyword arguments for a batch whose videos were pruned (``batch[VIDEO_KEPT]``): its videos'
    features, each cut to its kept count, in place of its video placeholders; everything else as the batch has it.
    ``model``: the unwrapped model (its ``get_input_embeddings`` and ``get_video_features``)."""
    import torch

    from video_llava.model.pruning import prune_video

    ids, videos = batch["input_ids"], batch["pixel_values_videos"]
    embeds = model.get_input_embeddings()(ids)
    out = model.get_video_features(pixel_values_videos=videos.to(embeds.dtype), return_dict=True)
    features = [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]
    kept = [prune_video(f, videos.shape[1], per_frame, int(n)) for f, n in zip(features, batch[VIDEO_KEPT])]
    mask = (ids == video_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, torch.cat(kept).to(embeds.dtype))
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "pixel_values_videos", VIDEO_KEPT)}
    return {"inputs_embeds": embeds, **rest}
