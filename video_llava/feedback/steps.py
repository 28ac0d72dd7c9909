"""Ray Data steps of AI feedback: sample answers with the current model, judge them, pick preference pairs.

Used by ``feedback.pipeline`` for ``jobs/make_preferences.py`` (K samples at temperature 1.0, top_p 0.95, as in
LLaVA-Hound) and ``jobs/eval.py`` (one greedy answer). Each step is a callable class whose ``__call__`` maps a batch of rows
(dict of columns) so Ray Data can run it in an actor pool; a bad video or a judge failure becomes an ``error``
row with the reason, never a crashed job.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from video_llava.data.records import load_media, open_image


def row_media(batch: dict[str, Any], i: int, frames: int) -> Any:
    """Row ``i``'s media: its ``images`` (a JSON list, benchmarks with several images a question), else its video
    or image."""
    import json

    images = json.loads(batch["images"][i]) if "images" in batch and batch["images"][i] else []
    if images:
        return [open_image(uri) for uri in images]
    return load_media(batch["video"][i], batch["image"][i], frames)


class AnswerSampler:
    """A model replica: ``samples`` answers per row, sampled from one prefill (seeded by the row id: answer k draws
    with seed + k), the rows of a batch generated together by the continuous-batching engine, with those of the
    other ``batches_in_flight`` calls running at once in threads of the actor."""

    def __init__(self, settings: dict[str, Any], samples: int, temperature: float, top_p: float,
                 max_new_tokens: int, frames: int, seed: int = 0, batches_in_flight: int = 1,
                 option_probs: bool = False):
        from video_llava.engine import Engine
        from video_llava.model.qa_model import VideoQAModel
        from video_llava.model.settings import ModelSettings

        self.model = VideoQAModel(ModelSettings.model_validate(settings))
        running = max(8, samples) * batches_in_flight  # media made ready ahead while the other rows decode
        self.engine = Engine(self.model, max_running=running, preprocess_ahead=running)
        self.samples, self.temperature, self.top_p = samples, temperature, top_p
        self.max_new_tokens, self.frames, self.seed = max_new_tokens, frames, seed
        self.option_probs = option_probs

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        n = len(batch["id"])
        candidates: list[list[str]] = [[] for _ in range(n)]
        errors = [""] * n
        from video_llava.engine import SamplingParams

        prepared, params = {}, {}
        for i in range(n):
            try:
                prepared[i] = self.model.prepare(row_media(batch, i, self.frames), batch["question"][i],
                                                 self.max_new_tokens)
                seed = self.seed + zlib.crc32(str(batch["id"][i]).encode())  # same row, same samples, any batching
                params[i] = SamplingParams(prepared[i].max_new_tokens, self.temperature, self.top_p, seed,
                                           n=self.samples)
            except Exception as exc:  # a broken video costs one row, reported with its reason
                errors[i] = f"sample: {type(exc).__name__}: {str(exc)[:300]}"
        for i, result in zip(prepared, self.engine.run(list(prepared.values()), list(params.values()))):
            if isinstance(result, BaseException):
                errors[i] = f"sample: {type(result).__name__}: {str(result)[:300]}"
            else:
                candidates[i] = [a.text for a in result]
        out = {**{k: list(v) for k, v in batch.items()}, "candidates": candidates, "error": errors,
               "model": [self.model.model_id] * n}
        if self.option_probs:
            out["correct_option_prob"] = [self._correct_option_prob(prepared[i], batch["qa_type"][i],
                                                                    batch["reference"][i])
                                          if i in prepared and not errors[i] else None for i in range(n)]
        return out

    def _correct_option_prob(self, prepared: Any, qa_type: str, reference: str) -> float | None:
        """The probability the model gives the reference among its question type's possible answers (a softmax of
        their log-probabilities); ``None`` for a question without a closed answer set."""
        from video_llava.data.synthetic_qa import QA_TYPES, answer_choices

        if qa_type not in QA_TYPES or reference not in answer_choices(qa_type):
            return None
        options = answer_choices(qa_type)
        # each option as it may be said: on its own and after a space (byte-level BPE tokenizers, the embedded
        # default's among them, answer " red" as one token where "red" alone is several)
        both = self.model.option_logprobs(prepared, options + [" " + option for option in options])
        logps = np.logaddexp(both[:len(options)], both[len(options):])
        weights = np.exp(logps - logps.max())
        return float(weights[options.index(reference)] / weights.sum())


class JudgeStep:
    """Scores every candidate of a row and, with ``min_margin``, picks the best and worst as chosen/rejected."""

    def __init__(self, judge_config: dict[str, Any], min_margin: int = 1):
        from video_llava.feedback.judges import JudgeConfig, SpecJudge, make_judge

        self.judge = make_judge(JudgeConfig.model_validate(judge_config))
        self.min_margin = min_margin
        # descriptions: a pair sets a faithful description against one that names what the clip does not hold
        self.faithful = SpecJudge.FAITHFUL if isinstance(self.judge, SpecJudge) else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from video_llava.feedback.judges import JudgeError

        n = len(batch["id"])
        out: dict[str, list] = {k: [] for k in ("scores", "reasons", "status", "chosen", "rejected",
                                                "chosen_score", "rejected_score", "margin")}
        errors = list(batch["error"])
        for i in range(n):
            candidates = list(batch["candidates"][i])
            scores, reasons = [], []
            if not errors[i]:
                try:
                    for text in candidates:
                        verdict = self.judge.judge(batch["caption"][i], batch["question"][i], batch["reference"][i],
                                                   text, spec=str(batch["spec"][i]) if "spec" in batch else "")
                        scores.append(verdict.score)
                        reasons.append(verdict.reason)
                except JudgeError as exc:
                    errors[i], scores, reasons = f"judge: {exc}", [], []
            row = pick_pair(candidates, scores, self.min_margin, self.faithful) if not errors[i] else None
            out["scores"].append(scores)
            out["reasons"].append(reasons)
            out["status"].append("error" if errors[i] else ("pair" if row else "no_pair"))
            best, worst = row or (None, None)
            out["chosen"].append(candidates[best] if row else "")
            out["rejected"].append(candidates[worst] if row else "")
            out["chosen_score"].append(scores[best] if row else 0)
            out["rejected_score"].append(scores[worst] if row else 0)
            out["margin"].append(scores[best] - scores[worst] if row else 0)
        columns = {**{k: list(v) for k, v in batch.items()}, **out, "error": errors}
        columns["candidates"] = [[str(c) for c in row] for row in batch["candidates"]]
        columns["reasons"] = [[str(r) for r in row] for row in out["reasons"]]
        return _arrow(columns)


def _arrow(columns: dict[str, list]):
    """The batch as a pyarrow Table with list columns typed as lists: left to Ray, equal-length lists become tensor
    columns, which its JSON writer turns into their first element (and an all-empty list column vanishes)."""
    import pyarrow as pa

    types = {"candidates": pa.list_(pa.string()), "reasons": pa.list_(pa.string()), "scores": pa.list_(pa.int64())}
    return pa.table({k: pa.array([v.item() if isinstance(v, np.generic) else v for v in values], type=types.get(k))
                     for k, values in columns.items()})


def pick_pair(candidates: list[str], scores: list[int], min_margin: int,
              faithful: int | None = None) -> tuple[int, int] | None:
    """Indices (best, worst) when the best outscores the worst by ``min_margin`` with different texts, else None;
    with ``faithful``, only when the best scores at least that and the worst below it."""
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    if scores[best] - scores[worst] < max(min_margin, 1) or candidates[best].strip() == candidates[worst].strip():
        return None
    if faithful is not None and not scores[worst] < faithful <= scores[best]:
        return None
    return best, worst
