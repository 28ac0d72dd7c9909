"""A replica over two ranks through real Serve and HTTP: ``model.tensor_parallel_size: 2`` reserves a placement group
of two bundles on one node (the replica, rank 0, in the first; rank 1's actor in the second) and answers with the
tokens and log-probabilities of the model in one process."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest import HEIGHT, WIDTH
from tests.live_service import running_service
from tests.test_families_serve import client_of, decoded, image_part, png, text
from video_llava.data.synthetic_video import SAMPLE_SHAPES, render_frames

pytestmark = pytest.mark.slow

IMAGE = png(render_frames(SAMPLE_SHAPES, num_frames=1, width=WIDTH, height=HEIGHT)[0])
SETTINGS = {"device": "cpu", "dtype": "float32", "max_new_tokens": 8, "num_frames": 4, "max_frames": 16}


@pytest.fixture(scope="module")
def base():
    args = {
        "model": {**SETTINGS, "tensor_parallel_size": 2},
        "batching": {"max_batch_size": 4},
        # the two CPUs of the test cluster: one for the replica (rank 0), one for rank 1; the ingress takes none
        "deployment": {"num_cpus": 1, "num_cpus_per_rank": 1, "ingress_num_cpus": 0, "decode_worker_memory_mb": 400},
    }
    with running_service(args) as url:
        yield url


def test_the_replica_reserves_one_bundle_per_rank_on_one_node(base):
    import ray

    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [(g["strategy"], list(g["bundles"].values())) for g in groups] == [
        ("STRICT_PACK", [{"CPU": 1.0}, {"CPU": 1.0}])]
    assert ray.available_resources().get("CPU", 0) == 0  # both bundles taken: rank 0 and rank 1 run


def test_two_ranks_answer_over_http_as_the_model_in_one_process(base):
    from video_llava.engine.params import SamplingParams
    from video_llava.model.qa_model import VideoQAModel
    from video_llava.model.settings import ModelSettings

    completion = client_of(base).chat.completions.create(
        model="embedded", max_tokens=8, temperature=0, logprobs=True,
        messages=[{"role": "user", "content": [image_part(IMAGE), text("What is in the image?")]}])
    local = VideoQAModel(ModelSettings(**SETTINGS))
    prepared = local.prepare(decoded(IMAGE), "What is in the image?", max_new_tokens=8)
    (answer,) = local.engine.generate([prepared], SamplingParams(8, logprobs=True))
    local.close()
    served = [(t.token, t.logprob) for t in completion.choices[0].logprobs.content]
    assert completion.choices[0].message.content == answer.text
    assert [t for t, _ in served] == [t.token for t in answer.logprobs]
    assert np.allclose([p for _, p in served], [t.logprob for t in answer.logprobs], atol=1e-4)
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
