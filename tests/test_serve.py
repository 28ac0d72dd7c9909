"""The REST service end to end: real Ray, real Serve on 127.0.0.1, real HTTP, a real S3 endpoint (moto)."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.server
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import shapes_video
from tests.live_service import ROOT, SAMPLE, assert_still_answers, error_of, qa_upload, running_service
from video_llava.ray_runtime import free_port

pytestmark = pytest.mark.slow

MAX_UPLOAD = 2 * 2**20
MAX_QUESTION_CHARS = 9000


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves the test's video directory; /to-metadata redirects to a link-local address."""

    REDIRECTS = {"/to-metadata": "http://169.254.169.254/latest/meta-data/", "/to-data": "data:,x",
                 "/to-bad-port": "http://127.0.0.1:99999/x.mp4"}

    def do_GET(self):
        if self.path in self.REDIRECTS:
            self.send_response(302)
            self.send_header("Location", self.REDIRECTS[self.path])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "sample.mp4").write_bytes(SAMPLE.read_bytes())
    (root / "notes.txt").write_text("not a video")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="videos")
    client.put_object(Bucket="videos", Key="clips/sample.mp4", Body=SAMPLE.read_bytes())
    client.put_object(Bucket="videos", Key="clips/broken.mp4", Body=b"\x00\x00\x00 ftypisom broken")
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def service(embedded_cache, http_files, s3):
    args = {
        "model": {"max_new_tokens": 8},
        "limits": {
            "max_upload_bytes": MAX_UPLOAD,
            "max_question_chars": MAX_QUESTION_CHARS,
            "max_duration_s": 30,
            "url_allowlist": ["127.0.0.1"],  # the test's own HTTP server
            "s3_endpoint_url": s3,
            "s3_buckets": ["videos"],
            "enable_docs": True,
        },
        "batching": {"max_batch_size": 8, "max_batch_tokens": "auto", "kv_memory_share": 0.5},
        "deployment": {"num_cpus": 1, "ingress_num_cpus": 0.5, "max_ongoing_requests": 64, "max_queued_requests": 256},
    }
    with running_service(args) as base:
        yield base




# ---- happy paths -------------------------------------------------------------------------------------------
def test_upload_qa_answers_with_counts_and_timings(service):
    response = qa_upload(service, SAMPLE.read_bytes(), num_frames=16)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "embedded" and isinstance(body["answer"], str)
    assert body["num_frames"] == 16 and len(body["sampled_indices"]) == 16
    assert body["usage"]["visual_tokens"] == 16 * 144 and 1 <= body["usage"]["completion_tokens"] <= 8
    assert set(body["timings"]) >= {"decode_s", "queue_s", "generate_s"}
    assert body["video"]["frame_count"] == 48


def test_an_hd_video_reaches_the_model_at_twice_its_towers_side_not_below(service, tmp_path):
    """The embedded default's processor reads 336-pixel frames: decoded at a 672 short side, its own resize does the
    last step (tests/test_frame_size.py compares the pixel values)."""
    clip = shapes_video(tmp_path / "hd.mp4", num_frames=6, width=1280, height=720)
    response = qa_upload(service, clip.read_bytes(), num_frames=2)
    assert response.status_code == 200, response.text
    assert response.json()["video"]["frame_shape"] == [672, 1194, 3]


def test_fps_sampling_per_request(service):
    response = qa_upload(service, SAMPLE.read_bytes(), sampling="fps", sample_fps=2)
    assert response.status_code == 200, response.text
    assert response.json()["sampled_indices"] == [0, 6, 12, 18, 24, 30, 36, 42]


def test_url_qa_from_an_allow_listed_http_server(service, http_files):
    base_url, _ = http_files
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": f"{base_url}/sample.mp4", "question": "What moves?", "num_frames": 8}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["num_frames"] == 8 and response.json()["timings"]["fetch_s"] > 0


def test_s3_qa_against_moto(service):
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": "s3://videos/clips/sample.mp4", "question": "What?", "num_frames": 8}, timeout=120)
    assert response.status_code == 200, response.text


def test_data_url_qa(service):
    url = "data:video/mp4;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": url, "question": "What?", "num_frames": 4}, timeout=120)
    assert response.status_code == 200, response.text


def test_openai_client_chat_completion_and_stream(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": "s3://videos/clips/sample.mp4"}},
                {"type": "text", "text": "What color is the circle?"},
            ],
        }
    ]
    completion = client.chat.completions.create(model="embedded", messages=messages, max_tokens=6)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 32 * 144
    chunks = list(client.chat.completions.create(model="embedded", messages=messages, max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == completion.choices[0].message.content  # greedy: same text either way, no leading space


def test_our_metrics_are_exported_next_to_ray_serves_under_the_names_the_docs_give(service):
    assert_still_answers(service)
    error_of(qa_upload(service, b""), 422, "invalid_video")  # one rejection to count
    url = f"http://127.0.0.1:{os.environ['VIDEO_LLAVA_TEST_METRICS_PORT']}/metrics"
    documented = re.findall(r"`(ray_video_llava_\w+)`", (ROOT / "docs" / "settings.md").read_text())
    assert len(documented) == 9
    # a counter is exported from its first event: decodes_cancelled is read after one in test_hostile
    wanted = [*(name for name in documented if "decodes_cancelled" not in name), "ray_serve_"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert [name for name in wanted if name not in text] == []
    from ray import serve

    budget = serve.get_deployment_handle("ModelServer", app_name="video_llava").describe.remote().result()
    exported = re.findall(r"^ray_video_llava_kv_budget_positions\{[^}]*\} (\S+)$", text, re.M)
    assert exported and float(exported[0]) == budget["engine"]["max_tokens"]  # auto, as the replica resolved it


def test_url_fetch_over_the_size_limit_is_413(service, http_files):
    base_url, root = http_files
    (root / "big.mp4").write_bytes(b"\x00" * (MAX_UPLOAD + 10))
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": f"{base_url}/big.mp4", "question": "What?"}, timeout=60)
    error_of(response, 413, "video_too_large")


def test_models_health_and_docs(service):
    assert httpx.get(f"{service}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{service}/v1/models").json()["data"][0]["id"] == "embedded"
    assert httpx.get(f"{service}/docs").status_code == 200
    assert "/v1/video/qa" in httpx.get(f"{service}/openapi.json").json()["paths"]


def test_32_concurrent_requests_are_all_answered_in_shared_batches(service):
    from ray import serve

    data = SAMPLE.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: qa_upload(service, data, f"Question {i}?", num_frames=8), range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    handle = serve.get_deployment_handle("ModelServer", app_name="video_llava")
    assert max(handle.recent_batch_sizes.remote().result()) > 1


# ---- bad input: 4xx with a JSON reason, and the service keeps answering -----------------------------------------
@pytest.mark.parametrize(
    "data,code",
    [(b"this is not a video" * 20, "invalid_video"), (SAMPLE.read_bytes()[:4000], "invalid_video")],
    ids=["text", "truncated"],
)
def test_corrupt_upload_returns_422_and_service_keeps_answering(service, data, code):
    error_of(qa_upload(service, data), 422, code)
    assert_still_answers(service)


def test_empty_upload_is_422(service):
    error_of(qa_upload(service, b""), 422, "invalid_video")


def test_oversized_upload_is_413(service):
    error_of(qa_upload(service, b"\x00" * (MAX_UPLOAD + 1)), 413, "video_too_large")
    assert_still_answers(service)


def test_video_over_the_duration_limit_is_422(service, tmp_path):
    long_clip = shapes_video(tmp_path / "slow.mp4", num_frames=40, fps=1.0, width=64, height=48).read_bytes()
    body = error_of(qa_upload(service, long_clip), 422, "video_too_long")
    assert "limit is 30 s" in body["message"]


def test_question_over_the_character_limit_is_400(service):
    error_of(qa_upload(service, SAMPLE.read_bytes(), "why " * 3000), 400, "context_length_exceeded")


def test_question_too_long_for_the_context_names_the_token_budget(service, tmp_path):
    clip = shapes_video(tmp_path / "long.mp4", num_frames=60, width=64, height=48).read_bytes()
    question = "動画" * 2500  # 5000 characters (under the limit), ~15000 byte-level tokens (over the context)
    body = error_of(qa_upload(service, clip, question, num_frames=56), 400, "context_length_exceeded")
    assert "context 12288" in body["message"] and "visual tokens" in body["message"]
    assert_still_answers(service)


def test_too_many_frames_and_bad_fields_are_400(service):
    error_of(qa_upload(service, SAMPLE.read_bytes(), num_frames=57), 400, "too_many_frames")
    error_of(qa_upload(service, SAMPLE.read_bytes(), num_frames="many"), 400)
    error_of(qa_upload(service, SAMPLE.read_bytes(), temperature=-1), 400)
    error_of(httpx.post(f"{service}/v1/video/qa", files={"video": ("a.mp4", SAMPLE.read_bytes())}, timeout=60), 400)
    error_of(httpx.post(f"{service}/v1/video/qa", content=b"{not json", headers={"content-type": "application/json"}), 400)
    error_of(httpx.post(f"{service}/v1/video/qa", content=b"x", headers={"content-type": "text/plain"}), 415)


def test_non_video_url_and_missing_objects_are_4xx(service, http_files):
    base_url, _ = http_files
    post = lambda url: httpx.post(f"{service}/v1/video/qa", json={"video_url": url, "question": "What?"}, timeout=120)
    error_of(post(f"{base_url}/notes.txt"), 422, "invalid_video")
    error_of(post(f"{base_url}/missing.mp4"), 400, "fetch_failed")
    error_of(post("s3://videos/clips/none.mp4"), 400, "video_not_found")
    error_of(post("s3://no-such-bucket/x.mp4"), 400, "video_not_found")
    error_of(post("s3://videos"), 400, "invalid_video_url")
    error_of(post("s3://videos/clips/broken.mp4"), 422, "invalid_video")
    error_of(post("data:video/mp4;base64,@@@"), 400, "invalid_video_url")
    assert_still_answers(service)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "/etc/passwd",
        "ftp://example.com/a.mp4",
        "http://10.1.2.3/a.mp4",
        "http://192.168.0.10/a.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8000/a.mp4",
        "http://0.0.0.0/a.mp4",
    ],
)
def test_ssrf_attempts_are_refused(service, url):
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": url, "question": "What?"}, timeout=60)
    error_of(response, 400, "url_not_allowed")


@pytest.mark.parametrize("url", ["http://h:99999/a.mp4", "http://h:abc/a.mp4", "http://[::1/x", f"http://{'a' * 64}.com/x",
                                 "http://a..b/x.mp4"])
def test_malformed_urls_are_400_not_500_and_the_service_keeps_answering(service, url):
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": url, "question": "What?"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_video_url", "fetch_failed")
    assert_still_answers(service)


@pytest.mark.parametrize("path", ["/to-data", "/to-bad-port"])
def test_a_redirect_to_a_malformed_or_non_http_url_is_400_not_500(service, http_files, path):
    base_url, _ = http_files
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": f"{base_url}{path}", "question": "What?"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("invalid_video_url", "url_not_allowed", "fetch_failed")


def test_redirect_to_a_link_local_address_is_refused(service, http_files):
    base_url, _ = http_files
    response = httpx.post(f"{service}/v1/video/qa", json={"video_url": f"{base_url}/to-metadata", "question": "What?"}, timeout=60)
    body = error_of(response, 400, "url_not_allowed")
    assert "169.254.169.254" in body["message"]


def test_a_text_only_conversation_is_answered_and_an_empty_or_bad_one_is_400(service):
    """Every LLaVA checkpoint is also a chat LLM: a request without media, or with text-only turns after a video."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    text_only = client.chat.completions.create(model="embedded", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=6)
    assert text_only.choices[0].message.content and text_only.model_extra["video_llava"]["num_frames"] == 0
    later = client.chat.completions.create(model="embedded", max_tokens=6, messages=[
        *_chat_body()["messages"], {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Why?"}])
    assert later.usage.prompt_tokens > text_only.usage.prompt_tokens + 8 * 144  # the earlier video counted
    post = lambda body: httpx.post(f"{service}/v1/chat/completions", json=body, timeout=60)  # noqa: E731
    error_of(post({"messages": []}), 400)
    bad = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "http://10.0.0.1/x.mp4"}}, {"type": "text", "text": "Hi"}]}], "stream": True}
    error_of(post(bad), 400, "url_not_allowed")
    assert_still_answers(service)


def test_the_openai_contract_cases_a_peer_suite_finds(service):
    """include_usage streams a last chunk of usage; a message's name is accepted; a non-JSON content type is 415; a
    model this service does not serve is 404 model_not_found and /v1/models lists what it serves."""
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    body = _chat_body()
    whole = client.chat.completions.create(model="embedded", **body)
    chunks = list(client.chat.completions.create(model="embedded", **body, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model="embedded", **body, stream=True,
                                                stream_options={"include_usage": False}))
    assert all(c.choices for c in plain) and "".join(c.choices[0].delta.content or "" for c in plain) == \
        whole.choices[0].message.content
    error_of(httpx.post(f"{service}/v1/chat/completions", timeout=60,
                        json={**body, "stream_options": {"include_usage": True}}), 400)  # not streamed: refused
    named = [{**body["messages"][0], "name": "alice"}]
    assert client.chat.completions.create(model="embedded", messages=named).choices[0].message.content
    form = httpx.post(f"{service}/v1/chat/completions", content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/x-www-form-urlencoded"})
    error_of(form, 415, "unsupported_media_type")
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(model="some-other-model", **body)
    assert missing.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list().data] == ["embedded"]


@contextlib.contextmanager
def second_app(service: str, name: str, args: dict):
    """A second app beside the module's service, deployed under /NAME; yields ``ask(i)`` (a 56-frame question about
    the sample) and deletes the app afterwards."""
    from ray import serve

    from video_llava.serve.app import build_app
    from video_llava.serve.config import ServeArgs

    serve.run(build_app(ServeArgs.model_validate(args)), name=name, route_prefix=f"/{name}", blocking=False)
    deadline = time.time() + 120
    while httpx.get(f"{service}/{name}/healthz").status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    data = SAMPLE.read_bytes()

    def ask(i):
        return httpx.post(f"{service}/{name}/v1/video/qa", files={"video": ("a.mp4", data)},
                          data={"question": f"Q{i}?", "num_frames": "56"}, timeout=120)

    try:
        yield ask
    finally:
        serve.delete(name)


def test_full_queue_answers_503_with_retry_after_and_recovers(service):
    """A second app with room for one request in flight and one queued: a burst overflows it."""
    tight = {"model": {"max_new_tokens": 32}, "batching": {"max_batch_size": 1},
             "deployment": {"num_cpus": 0.25, "ingress_num_cpus": 0.25, "max_ongoing_requests": 1,
                            "max_queued_requests": 1, "decode_workers": 1}}
    with second_app(service, "tight", tight) as ask:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(ask, range(16)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["retry-after"] and rejected.json()["error"]["code"] == "queue_full"
        assert ask(99).status_code == 200


def test_a_full_engine_queue_answers_503_queue_full_with_retry_after_and_recovers(service):
    """Serve lets every request through to a replica whose engine runs one sequence and keeps one waiting."""
    busy = {"model": {"max_new_tokens": 32}, "batching": {"max_batch_size": 1, "max_waiting": 1},
            "deployment": {"num_cpus": 0.25, "ingress_num_cpus": 0.25, "max_ongoing_requests": 64,
                           "max_queued_requests": -1, "decode_workers": 2}}
    with second_app(service, "busy", busy) as ask:
        ask(0)  # decoded once: the burst's decodes are cache hits and reach the model together
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(ask, range(1, 17)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        rejected = next(r for r in responses if r.status_code == 503)
        error = rejected.json()["error"]
        assert error["code"] == "queue_full" and "the model is at capacity" in error["message"]
        assert rejected.headers["retry-after"]
        assert ask(99).status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_sequence_for_the_next_request(service):
    """One sequence at a time and answers that never end on their own: only cancellation can free the slot."""
    from ray import serve

    endless = {"model": {"max_new_tokens": 4000}, "batching": {"max_batch_size": 1, "ignore_eos": True},
               "deployment": {"num_cpus": 0.25, "ingress_num_cpus": 0.25, "decode_workers": 1}}
    with second_app(service, "endless", endless):
        video = "data:video/mp4;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                                          {"type": "text", "text": "Describe it."}]}],
                "stream": True, "max_tokens": 4000, "num_frames": 4}
        with httpx.stream("POST", f"{service}/endless/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: {")
                if chunks >= 3:
                    break  # and leave, 4000 tokens early
        handle = serve.get_deployment_handle("ModelServer", app_name="endless")
        deadline, engine = time.time() + 60, {}
        while time.time() < deadline:
            engine = handle.describe.remote().result()["engine"]
            if engine["cancelled"] >= 1 and engine["running"] == 0:
                break
            time.sleep(0.5)
        assert engine["cancelled"] >= 1 and engine["running"] == 0, {k: engine[k] for k in ("running", "steps", "finished", "cancelled", "prefills")}
        reply = httpx.post(f"{service}/endless/v1/video/qa", files={"video": ("a.mp4", SAMPLE.read_bytes())},
                           data={"question": "What?", "num_frames": "4", "max_new_tokens": "4"}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_load_above_the_target_starts_a_second_model_replica(service):
    """The engine keeps every request in flight on its replica, so Serve sees the load and autoscales."""
    from ray import serve

    scaling = {"model": {"max_new_tokens": 1500}, "batching": {"max_batch_size": 8, "ignore_eos": True},
               # no CPU reserved for the model replicas: this 2-CPU cluster's other app holds 1.5 of them
               "deployment": {"num_cpus": 0, "ingress_num_cpus": 0.25, "decode_workers": 1, "min_replicas": 1,
                              "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
                              "max_ongoing_requests": 8}}

    def replicas() -> int:  # started or starting: the autoscaler's decision, whatever the machine's speed
        states = serve.status().applications["scaling"].deployments["ModelServer"].replica_states
        return states.get("RUNNING", 0) + states.get("STARTING", 0)

    with second_app(service, "scaling", scaling):
        assert replicas() == 1
        data = SAMPLE.read_bytes()
        stop = threading.Event()

        def keep_asking(i):  # six requests in flight until the decision is made
            while not stop.is_set():
                httpx.post(f"{service}/scaling/v1/video/qa", files={"video": ("a.mp4", data)},
                           data={"question": f"Q{i}?", "num_frames": "4"}, timeout=300)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            for i in range(6):
                pool.submit(keep_asking, i)
            deadline = time.time() + 180
            while replicas() < 2 and time.time() < deadline:
                time.sleep(1)
            scaled = replicas()
            stop.set()
        assert scaled == 2


def test_streamed_and_whole_answers_share_decode_steps_and_give_the_same_text(service):
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="video_llava")
    steps_before = handle.describe.remote().result()["engine"]["steps"]
    post = lambda body: httpx.post(f"{service}/v1/chat/completions", json=body, timeout=120)  # noqa: E731
    questions = [f"What color is shape number {i}?" for i in range(4)]
    bodies = [_chat_body(q, stream=stream) for q in questions for stream in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    whole = [r.json()["choices"][0]["message"]["content"] for r in replies[::2]]
    streamed = ["".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                        for line in r.text.splitlines() if line.startswith("data: {"))
                for r in replies[1::2]]
    assert streamed == whole
    engine = handle.describe.remote().result()["engine"]
    assert engine["steps"] > steps_before and engine["most_running_in_a_step"] > 1
    assert isinstance(engine["max_tokens"], int)  # batching.max_batch_tokens: auto, sized from memory at startup
    assert engine["kv_positions"] <= engine["max_tokens"]


def test_a_killed_model_replica_is_replaced_and_the_service_keeps_answering(service):
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="video_llava")
    pid = handle.describe.remote().result()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 120
    answered = False
    while time.time() < deadline:
        try:
            if qa_upload(service, SAMPLE.read_bytes(), num_frames=4).status_code == 200:
                answered = True
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert answered
    assert handle.describe.remote().result()["pid"] != pid


def test_a_second_question_about_the_same_video_skips_decode_and_the_vision_tower(service, tmp_path):
    from ray import serve

    clip = shapes_video(tmp_path / "fresh.mp4", num_frames=30, width=96, height=64).read_bytes()
    handle = serve.get_deployment_handle("ModelServer", app_name="video_llava")
    first = qa_upload(service, clip, "What color is the circle?", num_frames=12).json()
    after_first = handle.describe.remote().result()
    second = qa_upload(service, clip, "Which way does it move?", num_frames=12).json()
    assert first["cached"] == {"decode": False, "vision": False}
    assert second["cached"] == {"decode": True, "vision": True}
    after_second = handle.describe.remote().result()
    assert after_second["vision_calls"] == after_first["vision_calls"]
    # and its prompt up to the video's last token was not prefilled again: its KV was kept
    assert after_second["engine"]["prefix_hits"] == after_first["engine"]["prefix_hits"] + 1
    # other sampling of the same bytes is decoded anew
    third = qa_upload(service, clip, "What?", num_frames=10).json()
    assert third["cached"] == {"decode": False, "vision": False}


def test_several_videos_in_one_chat_message_share_the_frame_budget(service, http_files):
    base_url, _ = http_files
    content = [
        {"type": "video_url", "video_url": {"url": f"{base_url}/sample.mp4"}},
        {"type": "video_url", "video_url": {"url": "s3://videos/clips/sample.mp4"}},
        {"type": "text", "text": "Do the first and the second video show the same thing?"},
    ]
    response = httpx.post(f"{service}/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "max_tokens": 4}, timeout=120)
    assert response.status_code == 200, response.text
    extra = response.json()["video_llava"]
    assert len(extra["videos"]) == 2
    assert extra["num_frames"] == 2 * 28  # default 32 frames shrink to max_frames // 2 each
    assert response.json()["usage"]["prompt_tokens"] > 56 * 144


def _chat_body(question: str = "Describe the video in detail.", **extra) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "s3://videos/clips/sample.mp4"}},
        {"type": "text", "text": question}]}], "max_tokens": 8, **extra}


def test_stop_strings_end_the_answer_before_them_streamed_or_not(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    body = _chat_body()
    full = client.chat.completions.create(model="embedded", **body).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = client.chat.completions.create(model="embedded", **body, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"  # its trailing space too
    chunks = list(client.chat.completions.create(model="embedded", **body, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_stop_string_is_matched_on_the_same_text_streamed_or_not(service):
    """A space: the answer generated as " a b ..." (its leading space dropped) ends before its first inner space,
    streamed or not; a stop string that never appears leaves the whole answer."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    body = _chat_body()
    first = client.chat.completions.create(model="embedded", **body).choices[0]
    full = first.message.content
    assert " " in full and not full.startswith(" "), full
    whole = client.chat.completions.create(model="embedded", **body, stop=[" "]).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="embedded", **body, stop=[" "], stream=True))
    assert whole == streamed == full.split(" ")[0]
    never = client.chat.completions.create(model="embedded", **body, stop=["\u2603"]).choices[0]
    assert never.message.content == full and never.finish_reason == first.finish_reason


def test_structured_output_parses_into_the_clients_model_greedy_or_sampled_streamed_or_not(service):
    """``chat.completions.parse(response_format=PydanticModel)``: the service constrains the answer to the model's
    JSON schema (grammar-constrained decoding), so the reply validates; so do the streamed text and json_object."""
    from typing import Literal

    from openai import OpenAI
    from pydantic import BaseModel

    class Circle(BaseModel):
        color: Literal["red", "green", "blue", "yellow", "purple", "orange"]
        moving: bool

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    body = _chat_body("What color is the circle, and does it move?", max_tokens=40)
    for sampling in ({}, {"temperature": 1.0, "seed": 4}):
        parsed = client.chat.completions.parse(model="embedded", response_format=Circle, **body, **sampling)
        choice = parsed.choices[0]
        assert isinstance(choice.message.parsed, Circle) and choice.finish_reason == "stop", choice.message.content
        with client.chat.completions.stream(model="embedded", response_format=Circle, **body, **sampling) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].message.parsed == choice.message.parsed  # the same answer streamed
    anything = client.chat.completions.create(model="embedded", response_format={"type": "json_object"},
                                              **{**body, "max_tokens": 60}, temperature=0)
    assert anything.choices[0].message.content.startswith("{")


def test_a_response_format_that_cannot_be_compiled_is_400_naming_it_and_the_qa_route_takes_a_schema(service):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                        "properties": {"a": {"type": "strin"}}}}}
    body = error_of(httpx.post(f"{service}/v1/chat/completions", json=_chat_body(response_format=bad), timeout=60),
                    400, "invalid_response_format")
    assert "strin" in body["message"] and body["param"] == "response_format"
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    upload = qa_upload(service, SAMPLE.read_bytes(), json_schema=json.dumps(schema), num_frames=8,
                       max_new_tokens=30)
    assert upload.status_code == 200, upload.text
    assert json.loads(upload.json()["answer"])["color"] in ("red", "green", "blue")
    error_of(qa_upload(service, SAMPLE.read_bytes(), json_schema="{not json", num_frames=8), 400)
    assert_still_answers(service)


def test_a_seeded_sampled_answer_is_the_same_whatever_it_is_batched_with(service):
    post = lambda body: httpx.post(f"{service}/v1/chat/completions", json=body, timeout=120)  # noqa: E731
    seeded = _chat_body(temperature=1.0, seed=1234)
    alone = post(seeded).json()["choices"][0]["message"]["content"]
    others = [_chat_body(f"What color is shape {i}?", temperature=1.0) for i in range(5)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(post, [*others[:3], seeded, *others[3:]]))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert replies[3].json()["choices"][0]["message"]["content"] == alone
    hot = [post(_chat_body(temperature=2.0, seed=s)).json()["choices"][0]["message"]["content"] for s in range(4)]
    assert len(set(hot)) > 1  # the seed, not greedy decoding, is what made the answers equal


@pytest.mark.parametrize("extra,param", [({"best_of": 2}, "best_of"),
                                         ({"tool_choice": "auto"}, "tool_choice"),
                                         ({"frequency_penalty": 0.5}, "frequency_penalty"),
                                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                                         ({"logit_bias": {"5": 10}}, "logit_bias")])
def test_parameters_the_service_does_not_implement_are_refused_by_name(service, extra, param):
    body = error_of(httpx.post(f"{service}/v1/chat/completions", json=_chat_body(**extra), timeout=60), 400,
                    "unsupported_parameter")
    assert body["param"] == param and repr(param) in body["message"]


def test_n_answers_with_logprobs_through_the_openai_client(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    body = _chat_body("Describe the video.")
    ask = lambda: client.chat.completions.create(model="embedded", **body, n=3, temperature=1.5, seed=5,  # noqa: E731
                                                 logprobs=True, top_logprobs=2)
    reply = ask()
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content).lstrip() == choice.message.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert sum(len(c.logprobs.content) for c in reply.choices) == reply.usage.completion_tokens  # one per token
    single = client.chat.completions.create(model="embedded", **body)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is read once for the three
    assert [c.message.content for c in ask().choices] == [c.message.content for c in reply.choices]  # seeded
    error_of(httpx.post(f"{service}/v1/chat/completions", json={**body, "top_logprobs": 2}, timeout=60), 400)
    streamed = list(client.chat.completions.create(model="embedded", **body, n=3, temperature=1.5, seed=5,
                                                   logprobs=True, top_logprobs=2, stream=True))
    for i, choice in enumerate(reply.choices):  # the same choices, streamed: text in pieces, logprobs at the end
        mine = [c.choices[0] for c in streamed if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert mine[-1].finish_reason == choice.finish_reason
        assert [t.token for t in mine[-1].logprobs.content] == [t.token for t in choice.logprobs.content]


def test_top_k_1_samples_the_greedy_answer_and_a_negative_top_k_is_400(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    body = _chat_body("Describe the video.")
    greedy = client.chat.completions.create(model="embedded", **body)
    for seed in (1, 2):
        one = client.chat.completions.create(model="embedded", **body, temperature=1.5, seed=seed,
                                             extra_body={"top_k": 1})
        assert one.choices[0].message.content == greedy.choices[0].message.content
    error_of(httpx.post(f"{service}/v1/chat/completions", json={**body, "top_k": -1}, timeout=60), 400)


def test_parameters_sent_at_values_that_change_nothing_are_accepted(service):
    body = _chat_body(logprobs=False, frequency_penalty=0, presence_penalty=0.0, response_format={"type": "text"},
                      user="client-42")
    response = httpx.post(f"{service}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text


def test_a_video_token_budget_per_request_prunes_the_prompt_and_one_below_a_frame_is_400(service):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="unused")
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "s3://videos/clips/sample.mp4"}},
                                             {"type": "text", "text": "What color is the circle?"}]}]
    whole = client.chat.completions.create(model="embedded", messages=messages, max_tokens=4,
                                           extra_body={"num_frames": 8})
    half = client.chat.completions.create(model="embedded", messages=messages, max_tokens=4,
                                          extra_body={"num_frames": 8, "video_pruning_rate": 0.5})
    assert whole.usage.prompt_tokens - half.usage.prompt_tokens == 4 * 144  # usage counts the kept tokens
    kept = qa_upload(service, SAMPLE.read_bytes(), num_frames=8, video_token_budget=300)
    assert kept.status_code == 200, kept.text
    assert kept.json()["usage"]["visual_tokens"] == 300
    refused = qa_upload(service, SAMPLE.read_bytes(), num_frames=8, video_token_budget=100)
    error = error_of(refused, 400, "video_token_budget_too_small")
    assert "video_token_budget=100 is below one frame's 144 tokens" in error["message"]
    assert error_of(qa_upload(service, SAMPLE.read_bytes(), video_pruning_rate=1.0), 400)["param"] == "video_pruning_rate"
    assert_still_answers(service)
