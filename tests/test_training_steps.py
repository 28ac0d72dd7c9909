"""A training step at scale, against the plain step it replaces: micro-batches with gradient accumulation give one
large batch's update; gradient checkpointing changes memory, not the loss or the gradients; bf16 autocast trains
with float32 weights and optimizer state, its loss close to float32's."""

from __future__ import annotations

import copy

import pytest

from video_llava.data.synthetic_video import COLORS, MovingShape, render_frames
from video_llava.model.prompts import build_prompt
from video_llava.train.examples import answer_tokens, collate, sft_example
from video_llava.train.step import chunks, enable_gradient_checkpointing, optimizer_step


@pytest.fixture(scope="module")
def model_and_examples(embedded_cache):
    from video_llava.model.embedded import embedded_path
    from video_llava.model.loading import load_checkpoint

    model, processor = load_checkpoint(embedded_path())
    prompt = build_prompt(processor, "What color is the circle?")
    answers = ["red", "a green one", "blue", "it is yellow", "purple", "orange, moving left", "red", "green"]
    examples = []
    for i, (color, answer) in enumerate(zip(list(COLORS) * 2, answers)):
        frames = render_frames([MovingShape("circle", color, "right", start=(0.1 * i, 0.5))], num_frames=4,
                               width=64, height=48)
        examples.append(sft_example(processor, prompt, answer, frames))  # answers of different lengths
    return model, processor, examples


def one_step(model, processor, examples, micro: int, precision: str = "fp32", checkpointing: bool = False,
             adam: bool = False, max_grad_norm: float = 0.0):
    """A copy of ``model`` after one step over ``examples`` in micro-batches of ``micro``: (model, the step's
    ``StepResult``, optimizer).
    SGD with lr 1 unless ``adam``: the weights move by the gradient itself (Adam's first step moves every weight by
    about lr x its gradient's sign, which float noise flips where a gradient is near 0)."""
    import torch

    model = copy.deepcopy(model).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3) if adam else torch.optim.SGD(trained, lr=1.0)
    parts = [collate(part, processor.tokenizer.pad_token_id) for part in chunks(examples, micro)]
    tokens = [answer_tokens(part) for part in parts]
    result = optimizer_step(model, optimizer, [(p, n / sum(tokens)) for p, n in zip(parts, tokens)],
                            lambda batch: model(**batch).loss, precision, "cpu", max_grad_norm=max_grad_norm)
    return model, result, optimizer


def max_difference(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def relative_difference(a, b, start) -> float:
    """How far two updates of ``start`` differ, as a share of the larger update of any weight (float32 sums in
    another order differ by about 1e-5 of it: the patch embedding adds up every pixel of every frame)."""
    return max_difference(a, b) / max_difference(a, start)


def test_four_micro_batches_of_two_update_the_weights_as_one_batch_of_eight(model_and_examples):
    model, processor, examples = model_and_examples
    whole, whole_step, _ = one_step(model, processor, examples, micro=8)
    accumulated, accumulated_step, _ = one_step(model, processor, examples, micro=2)
    assert accumulated_step.loss == pytest.approx(whole_step.loss, rel=1e-5)
    assert accumulated_step.grad_norm == pytest.approx(whole_step.grad_norm, rel=1e-4)
    assert relative_difference(whole, accumulated, model) < 1e-4
    assert max_difference(whole, model) > 1e-4  # the step did change the weights
    unweighted = [collate(part, processor.tokenizer.pad_token_id) for part in chunks(examples, 2)]
    assert len({answer_tokens(p) for p in unweighted}) > 1  # the micro-batches differ in tokens: weights mattered


def test_gradient_checkpointing_changes_memory_not_the_loss_or_the_update(model_and_examples):
    model, processor, examples = model_and_examples
    plain, plain_step, _ = one_step(model, processor, examples, micro=4)
    recomputed, recomputed_step, _ = one_step(model, processor, examples, micro=4, checkpointing=True)
    assert recomputed.model.language_model.gradient_checkpointing
    assert recomputed_step.loss == pytest.approx(plain_step.loss, rel=1e-6)
    assert relative_difference(plain, recomputed, model) < 1e-4


def test_bf16_trains_with_float32_weights_and_optimizer_state_close_to_float32(model_and_examples):
    import torch

    model, processor, examples = model_and_examples
    _, fp32_step, _ = one_step(model, processor, examples, micro=4)
    bf16, bf16_step, optimizer = one_step(model, processor, examples, micro=4, precision="bf16", adam=True)
    assert bf16_step.loss == pytest.approx(fp32_step.loss, rel=0.05) and bf16_step.loss != fp32_step.loss
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    states = [s for s in optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert max_difference(bf16, model) > 1e-4


def test_clipping_scales_the_update_to_the_norm_asked_and_logs_the_norm_before(model_and_examples):
    """With SGD at lr 1 the weights move by the gradient itself: clipped, the move's global norm is the limit asked
    and its direction the unclipped gradient's; the step reports the norm before clipping."""
    import torch

    model, processor, examples = model_and_examples
    free, free_step, _ = one_step(model, processor, examples, micro=4)
    clipped, clipped_step, _ = one_step(model, processor, examples, micro=4, max_grad_norm=0.01)

    def moves(trained):
        return torch.cat([(a - b).flatten() for a, b in zip(trained.parameters(), model.parameters())])

    assert free_step.grad_norm > 0.1  # so a limit of 0.01 does clip
    assert clipped_step.grad_norm == pytest.approx(free_step.grad_norm, rel=1e-5)
    assert float(moves(free).norm()) == pytest.approx(free_step.grad_norm, rel=1e-3)
    assert float(moves(clipped).norm()) == pytest.approx(0.01, rel=1e-3)
    assert torch.allclose(moves(clipped), moves(free) * (0.01 / free_step.grad_norm), atol=1e-7)
