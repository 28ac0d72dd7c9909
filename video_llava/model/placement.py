"""How many devices a checkpoint needs: its weights per tensor-parallel rank, counted on the meta device (no memory,
no download past the config), against one device's memory. Checked at start, before any weight is read, so a
replica that asks for too few GPUs fails with the numbers instead of running out of memory while loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WEIGHTS_SHARE = 0.85  # of a device's memory the weights may take: the KV pool and activations need the rest
SHARDED = ("language_model.layers.", "lm_head.")  # what tp_plan splits across ranks (the rest is replicated)


class PlacementError(ValueError):
    """The weights do not fit the devices asked for; the message names the numbers and the size that fits."""


@dataclass(frozen=True)
class WeightBytes:
    """A checkpoint's weights in the dtype it loads in: the part tensor parallelism splits, and the rest."""

    sharded: int
    replicated: int

    def per_rank(self, ranks: int) -> int:
        return self.replicated + -(-self.sharded // ranks)


def weight_bytes(model_class: type, config: Any, dtype: Any) -> WeightBytes:
    """Bytes of ``model_class(config)``'s parameters in ``dtype``, built on the meta device."""
    import torch

    with torch.device("meta"):
        model = model_class._from_config(config)  # parameters only: their count, not their dtype, is read
    sharded = replicated = 0
    for name, param in model.named_parameters():
        size = param.numel() * dtype.itemsize
        if any(part in name for part in SHARDED):
            sharded += size
        else:
            replicated += size
    return WeightBytes(sharded, replicated)


def device_memory(device: Any, configured_gb: float | None) -> int | None:
    """One device's memory in bytes: ``configured_gb`` where set, else a GPU's total; None on a CPU (not checked)."""
    if configured_gb is not None:
        return int(configured_gb * 2**30)
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_fits(name: str, weights: WeightBytes, ranks: int, memory: int | None, heads: int) -> None:
    """Raise ``PlacementError`` unless a rank's share of ``weights`` fits ``WEIGHTS_SHARE`` of ``memory``; the
    message names the smallest rank count that fits (one that divides the ``heads`` KV heads)."""
    if memory is None:
        return
    room = WEIGHTS_SHARE * memory
    if weights.per_rank(ranks) <= room:
        return
    fits = next((n for n in range(ranks + 1, 2 * heads + 1) if heads % n == 0 and weights.per_rank(n) <= room), None)
    advice = f"set model.tensor_parallel_size: {fits} (and as many GPUs)" if fits else \
        "no tensor_parallel_size that divides its KV heads fits: use devices with more memory"
    raise PlacementError(
        f"{name}: {size(weights.per_rank(ranks))} of weights per device with tensor_parallel_size {ranks} "
        f"({size(weights.sharded + weights.replicated)} in all) exceed {WEIGHTS_SHARE:.0%} of a device's "
        f"{size(memory)} ({size(room)}; the rest is for the KV pool and activations): {advice}")


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def check_divides(heads: int, attention_heads: int, ranks: int) -> None:
    """Tensor parallelism splits the attention by heads: ``ranks`` must divide both head counts."""
    if heads % ranks or attention_heads % ranks:
        raise PlacementError(f"tensor_parallel_size {ranks} must divide the model's {attention_heads} attention heads "
                             f"and {heads} KV heads")


def main(argv: list[str] | None = None) -> int:
    """``python -m video_llava.model.placement MODEL``: the weights per device at each tensor-parallel size that
    divides the model's heads, and whether they fit a device of ``--device-memory-gb`` (an 80 GB GPU by default)."""
    import argparse

    import torch
    from transformers import AutoConfig

    from video_llava.model.embedded import embedded_path
    from video_llava.model.families import family_of

    parser = argparse.ArgumentParser(prog="python -m video_llava.model.placement", description=main.__doc__)
    parser.add_argument("model", help="a hub id (its config cached or reachable) or a checkpoint directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device-memory-gb", type=float, default=79.2, help="one device's memory in GiB (79.2: an "
                        "80 GB H100 as torch reports it)")
    args = parser.parse_args(argv)
    source = str(embedded_path()) if args.model == "embedded" else args.model
    config = AutoConfig.from_pretrained(source)
    weights = weight_bytes(family_of(config, source).model_class(), config, getattr(torch, args.dtype))
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    memory = int(args.device_memory_gb * 2**30)
    print(f"{args.model}: {size(weights.sharded + weights.replicated)} of {args.dtype} weights "
          f"({size(weights.sharded)} split by tensor parallelism, {size(weights.replicated)} on every rank); "
          f"a device of {size(memory)} takes {size(WEIGHTS_SHARE * memory)} of weights")
    for ranks in (n for n in range(1, 2 * heads + 1) if heads % n == 0 and text.num_attention_heads % n == 0):
        verdict = "fits" if weights.per_rank(ranks) <= WEIGHTS_SHARE * memory else "does not fit"
        print(f"  tensor_parallel_size {ranks}: {size(weights.per_rank(ranks))} per device, {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
