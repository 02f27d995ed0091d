"""The Serve application over real HTTP on loopback, on a real local Ray cluster (2 CPUs).

Part 1, one app with an API key and small limits: the unmodified `openai` client (completions,
streaming, models), multi-image requests with base64 data URLs checked token for token against
transformers' generate, concurrent requests batched on one replica, auth, every bad input -> 4xx
with an OpenAI error body while the same replica keeps serving, request ids in the logs, metrics
on Ray's Prometheus endpoint.

Part 2, a bounded load test (retry-free clients): Serve autoscaling adds a model replica and no
request fails; then a replica process is SIGKILLed: Serve replaces it, and the only failed
requests are ones that were in flight on it, each a 503 with an error body.
"""

from __future__ import annotations

import base64
import collections
import glob
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import openai
import pytest
import requests
import torch
from PIL import Image

from model.packed.packed_checkpoint import load_packed
from model.vision import preprocess_images
from serve.images import load_image
from serve.openai_schema import ChatCompletionRequest
from serve.prompt import parse_messages, render_prompt
from serve.settings import Limits, ServeSettings

pytestmark = pytest.mark.slow

MODEL_NAME = "bitllava-tiny"
API_KEY = "test-key-0123456789"
LIMITS = dict(max_request_bytes=300_000, max_image_bytes=100_000, max_image_pixels=256 * 256, max_images=3,
              max_prompt_tokens=300, max_tokens=64, default_max_tokens=16)
MODEL_MAX_ONGOING = 4  # of the load test's model replicas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(size=(64, 64), color="red", noise=False) -> bytes:
    if noise:
        raw = torch.randint(0, 256, (size[0] * size[1] * 3,), generator=torch.Generator().manual_seed(1),
                            dtype=torch.uint8).numpy().tobytes()
        image = Image.frombytes("RGB", size, raw)
    else:
        image = Image.new("RGB", size, color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


# --------------------------------------------------------------------------- cluster and app


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    node = ray._private.worker._global_node  # where this cluster's logs and metrics are (no public API)
    yield {"url": f"http://127.0.0.1:{port}", "session_dir": node.get_session_dir_path(),
           "metrics_url": f"http://127.0.0.1:{node.metrics_export_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(packed_dir):
    """The packed model in this process, as the replicas load it (float32), for expected outputs."""
    return load_packed(packed_dir, dtype=torch.float32)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path in ("/allowed/red.png", "/other/red.png"):
            body = png()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/allowed/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/other/red.png")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@dataclass
class App:
    url: str
    settings: ServeSettings
    image_base: str

    def post(self, body, key: str | None = API_KEY, raw: bytes | None = None, **kwargs):
        headers = kwargs.pop("headers", {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if raw is not None:
            headers["Content-Type"] = "application/json"
            return requests.post(f"{self.url}/v1/chat/completions", data=raw, headers=headers, timeout=120, **kwargs)
        return requests.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120, **kwargs)

    def client(self, key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def model_pid(self) -> int:
        response = requests.get(f"{self.url}/ready", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["pid"]


@pytest.fixture(scope="module")
def api_app(cluster, packed_dir, image_server):
    from ray import serve

    from serve.app import make_app

    settings = ServeSettings.from_args({
        "model": packed_dir, "model_name": MODEL_NAME, "api_key": API_KEY, "limits": LIMITS,
        "image_url_allowlist": [f"{image_server}/allowed/"],
        "engine": {"dtype": "float32", "max_batch_size": 8},
    })
    deployments = {
        "ChatIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "BitLlavaModel": {"num_replicas": 1, "max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 1.5}},
    }
    serve.run(make_app(settings, deployments), name="bitllava-api", route_prefix="/")
    app = App(cluster["url"], settings, image_server)
    app.first_pid = app.model_pid()
    yield app
    if "bitllava-api" in serve.status().applications:
        serve.delete("bitllava-api")


def expected_reply(reference, messages, max_tokens):
    """(prompt ids, reply text, completion tokens) the server must produce for a greedy request."""
    request = ChatCompletionRequest.model_validate({"model": MODEL_NAME, "messages": messages})
    chat = parse_messages(request.messages)
    config, tokenizer = reference.model.config, reference.tokenizer
    ids = render_prompt(chat, tokenizer, config.template, config.num_image_tokens)
    kwargs = {}
    if chat.images:
        images = [load_image(i.url, Limits(), [], i.param) for i in chat.images]
        kwargs["pixel_values"] = preprocess_images(images, reference.image_processor)
    x = torch.tensor([ids])
    out = reference.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, **kwargs)
    new = out[0, len(ids):].tolist()
    text_ids = [t for t in new if t != tokenizer.eos_token_id]
    text = tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).lstrip()
    return ids, text, new


MULTI_IMAGE = [user("Compare ", image_part(data_url(png((64, 64), "red"))), " with ",
                    image_part(data_url(png((80, 40), "blue")))),]


# --------------------------------------------------------------------------- part 1: the API


def test_openai_client_multi_image_completion(api_app, reference):
    ids, text, new = expected_reply(reference, MULTI_IMAGE, 12)
    response = api_app.client().chat.completions.create(model=MODEL_NAME, messages=MULTI_IMAGE, max_tokens=12,
                                                        temperature=0)
    assert response.object == "chat.completion" and response.model == MODEL_NAME
    assert response.id.startswith("chatcmpl-")
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == ("stop" if new[-1] == reference.tokenizer.eos_token_id else "length")
    assert response.usage.prompt_tokens == len(ids)  # two images of num_image_tokens each, system prompt, text
    assert response.usage.completion_tokens == len(new)
    assert response.usage.total_tokens == len(ids) + len(new)
    # a system message and an earlier exchange (multi-turn), max_tokens left to the server's default
    messages = [{"role": "system", "content": "Answer briefly."}, user(image_part(data_url(png())), "What color?"),
                {"role": "assistant", "content": "red"}, user("And the shape?")]
    ids, text, new = expected_reply(reference, messages, LIMITS["default_max_tokens"])
    response = api_app.client().chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0)
    assert response.choices[0].message.content == text and response.usage.completion_tokens == len(new)
    assert response.usage.prompt_tokens == len(ids)


def test_streaming_with_the_openai_client_and_raw_sse(api_app, reference):
    _, text, new = expected_reply(reference, MULTI_IMAGE, 12)
    stream = api_app.client().chat.completions.create(model=MODEL_NAME, messages=MULTI_IMAGE, max_tokens=12,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)
    assert len(with_choices) >= 3  # role, content, finish: tokens arrive as they are generated

    response = api_app.post({"model": MODEL_NAME, "messages": MULTI_IMAGE, "max_tokens": 12, "temperature": 0,
                             "stream": True}, stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text


def test_model_replica_computes_with_the_cpus_it_reserves(api_app):
    # num_cpus 1.5 -> 2 threads on the engine's own thread (Ray alone would give it 1 OpenMP thread)
    from ray import serve

    state = serve.get_deployment_handle("BitLlavaModel", app_name="bitllava-api").ping.remote().result(timeout_s=60)
    assert state["engine_threads"] == 2


def test_models_health_and_ready(api_app):
    models = api_app.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert api_app.client().models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        api_app.client().models.retrieve("gpt-4")
    health = requests.get(f"{api_app.url}/health", timeout=30)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert api_app.model_pid() == api_app.first_pid


def test_api_key_is_required_and_checked(api_app):
    for key, code in ((None, "missing_api_key"), ("wrong-key", "invalid_api_key")):
        response = api_app.post({"model": MODEL_NAME, "messages": [user("hi")]}, key=key)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == code and response.json()["error"]["type"] == "authentication_error"
    response = requests.post(f"{api_app.url}/v1/chat/completions", json={}, timeout=30,
                             headers={"Authorization": f"Basic {API_KEY}"})
    assert response.status_code == 401
    assert requests.get(f"{api_app.url}/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError) as info:
        api_app.client("not-the-key").chat.completions.create(model=MODEL_NAME, messages=[user("hi")], max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def _bomb_png(side: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _body(*messages, **extra):
    return {"model": MODEL_NAME, "messages": list(messages), "max_tokens": 4, **extra}


BAD_INPUTS = {
    # case: (request body or raw bytes, status, error code, param or None)
    "malformed-json": (b'{"model": "bitllava-tiny", "messages": [', 400, "invalid_json", None),
    "json-not-an-object": (b"[1, 2]", 400, "invalid_json", None),
    "bad-base64": (_body(user("Hi", image_part("data:image/png;base64,iVBORw0KGgo%%%not-base64"))), 400,
                   "invalid_base64", "messages[0].content[1].image_url"),
    "non-image-bytes": (_body(user(image_part(data_url(b"GIF? no, just some text bytes" * 4)), "Hi")), 400,
                        "invalid_image", "messages[0].content[0].image_url"),
    "non-image-media-type": (_body(user(image_part(data_url(png(), "application/pdf")))), 400, "invalid_image",
                             "messages[0].content[0].image_url"),
    "unknown-model": (dict(_body(user("Hi")), model="gpt-4o"), 404, "model_not_found", "model"),
    "too-many-images": (_body(user(*[image_part(data_url(png())) for _ in range(4)], "Hi")), 400,
                        "too_many_images", "messages"),
    "too-long-prompt": (_body(user("the red circle is left of the blue square " * 60)), 400, "prompt_too_long",
                        "messages"),
    "max-tokens-too-large": (dict(_body(user("Hi")), max_tokens=65), 400, "max_tokens_too_large", "max_tokens"),
    "remote-url-not-allowlisted": (_body(user(image_part("https://example.com/cat.png"))), 400,
                                   "image_url_not_allowed", "messages[0].content[0].image_url"),
    "image-too-many-pixels": (_body(user(image_part(data_url(png((300, 300)))))), 400, "image_too_large",
                              "messages[0].content[0].image_url"),
    "decompression-bomb": (_body(user(image_part(data_url(_bomb_png(30000))))), 400, "image_too_large",
                           "messages[0].content[0].image_url"),
    "image-too-many-bytes": (_body(user(image_part(data_url(png((200, 200), noise=True))))), 400,
                             "image_too_large", "messages[0].content[0].image_url"),
    "request-too-large": (_body(user("x" * 310_000)), 413, "request_too_large", None),
    "unknown-field": (dict(_body(user("Hi")), tools=[]), 400, "unknown_parameter", "tools"),
    "n-above-1": (dict(_body(user("Hi")), n=2), 400, "invalid_value", "n"),
    "missing-messages": ({"model": MODEL_NAME}, 400, "invalid_value", "messages"),
    "image-placeholder-in-text": (_body(user("see <image>")), 400, "invalid_content", "messages[0].content[0].text"),
    "ends-with-assistant": (_body(user("Hi"), {"role": "assistant", "content": "Hello"}), 400, "invalid_messages",
                            "messages"),
    "temperature-out-of-range": (dict(_body(user("Hi")), temperature=5), 400, "invalid_value", "temperature"),
    "streamed-request-with-a-bad-image": (_body(user(image_part(data_url(b"not an image"))), stream=True), 400,
                                          "invalid_image", "messages[0].content[0].image_url"),
    "image-part-without-url": (_body({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}), 400,
                               "invalid_value", "messages[0].content[0].image_url.url"),
    "content-neither-text-nor-parts": (_body({"role": "user", "content": 5}), 400, "invalid_value",
                                      "messages[0].content"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_and_the_replica_keeps_serving(api_app, case):
    body, status, code, param = BAD_INPUTS[case]
    response = api_app.post(None, raw=body) if isinstance(body, bytes) else api_app.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    good = api_app.post(_body(user(image_part(data_url(png())), "What color?")))
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    assert api_app.model_pid() == api_app.first_pid  # the same model replica, never restarted


def test_wrong_method_and_route_get_error_bodies(api_app):
    response = requests.get(f"{api_app.url}/v1/chat/completions", timeout=30)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    response = requests.get(f"{api_app.url}/v1/embeddings", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_allowlisted_image_urls_are_fetched_but_not_redirected(api_app, reference):
    by_url = [user(image_part(f"{api_app.image_base}/allowed/red.png"), "What color?")]
    by_data = [user(image_part(data_url(png())), "What color?")]
    _, text, _ = expected_reply(reference, by_data, 8)
    response = api_app.client().chat.completions.create(model=MODEL_NAME, messages=by_url, max_tokens=8,
                                                        temperature=0)
    assert response.choices[0].message.content == text
    for path in ("/allowed/redirect.png", "/allowed/missing.png"):  # a redirect could leave the allowlist
        response = api_app.post(_body(user(image_part(f"{api_app.image_base}{path}"))))
        assert response.status_code == 400 and response.json()["error"]["code"] == "image_fetch_failed"
    response = api_app.post(_body(user(image_part(f"{api_app.image_base}/other/red.png"))))
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_url_not_allowed"


def test_concurrent_requests_are_batched_correctly(api_app, reference):
    """Eight requests at once on one replica (max_batch_size 8): each gets exactly its own greedy reply."""
    colors = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
    requests_ = [([user(image_part(data_url(png((48 + 8 * i, 64), c))), f"Is there a {c} shape?")], 6 + i)
                 for i, c in enumerate(colors)]
    requests_[3] = ([user("How many circles are there?")], 20)  # text-only, longer
    expected = [expected_reply(reference, m, n)[1] for m, n in requests_]
    results = [None] * len(requests_)

    def call(i):
        messages, n = requests_[i]
        results[i] = api_app.client().chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=n,
                                                              temperature=0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].message.content for r in results] == expected


def test_request_ids_are_returned_and_logged(api_app, cluster):
    request_id = f"test-request-{int(time.time() * 1000)}"
    response = api_app.post(_body(user("Hello there")), headers={"X-Request-Id": request_id})
    assert response.status_code == 200 and response.headers["x-request-id"] == request_id
    assert response.json()["id"] == f"chatcmpl-{request_id}"
    refused = api_app.post(_body(user("Hi")), key="wrong", headers={"X-Request-Id": request_id + "-refused"})
    assert refused.headers["x-request-id"] == request_id + "-refused"
    logs = glob.glob(os.path.join(cluster["session_dir"], "logs", "serve", "replica_bitllava-api_*.log"))
    deadline = time.time() + 30
    while True:
        found = subprocess.run(["grep", "-h", request_id] + logs, capture_output=True, text=True).stdout
        ingress = [line for line in found.splitlines() if "ChatIngress" in line and f"request_id={request_id} " in line]
        model = [line for line in found.splitlines() if "BitLlavaModel" in line and "generation length" in line]
        refusal = [line for line in found.splitlines() if "refused: 401 invalid_api_key" in line]
        if (ingress and model and refusal) or time.time() > deadline:
            break
        time.sleep(1)
    assert ingress and model and refusal, found


def _scrape(url: str) -> dict[str, float]:
    """{metric line without value: value} of a Prometheus text page, our metrics only."""
    out = {}
    for line in requests.get(url, timeout=30).text.splitlines():
        if line.startswith("ray_bitllava_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _total(metrics: dict[str, float], name: str, **tags) -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name
               and all(f'{t}="{val}"' in k for t, val in tags.items()))


def test_metrics_are_exported_through_ray(api_app, cluster):
    # earlier tests streamed, refused and batched requests; Ray exports metrics every few seconds
    want = {
        ("ray_bitllava_requests_total", (("status", "200"),)),
        ("ray_bitllava_requests_total", (("status", "401"),)),
        ("ray_bitllava_requests_total", (("status", "400"),)),
        ("ray_bitllava_request_latency_seconds_count", ()),
        ("ray_bitllava_time_to_first_token_seconds_count", ()),
        ("ray_bitllava_completion_tokens_total", ()),
        ("ray_bitllava_generated_tokens_total", ()),
        ("ray_bitllava_batch_size_count", ()),
    }
    deadline = time.time() + 60
    while True:  # until the latest export holds everything the earlier tests did
        metrics = _scrape(cluster["metrics_url"])
        missing = [(n, t) for n, t in want if _total(metrics, n, **dict(t)) <= 0]
        # some decode steps ran several requests at once (the concurrent test)
        single = _total(metrics, "ray_bitllava_batch_size_bucket", le="1.0")
        batched = _total(metrics, "ray_bitllava_batch_size_count") > single
        if (not missing and batched) or time.time() > deadline:
            break
        time.sleep(2)
    assert not missing, f"not exported: {missing}"
    names = {k.split("{")[0] for k in metrics}
    assert {"ray_bitllava_queue_length", "ray_bitllava_running_requests", "ray_bitllava_tokens_per_second"} <= names
    assert batched, f"no decode step ran more than one request: {single} single-row steps of " \
                    f"{_total(metrics, 'ray_bitllava_batch_size_count')}"
    assert 'deployment="BitLlavaModel"' in next(k for k in metrics if k.startswith("ray_bitllava_generated_tokens"))


# --------------------------------------------------------------------------- part 2: load, autoscaling, failure


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | str
    body: dict | str


class Load:
    """Retry-free clients sending non-streamed requests back to back until stopped."""

    def __init__(self, url: str, clients: int, max_requests: int):
        self.url, self.clients, self.max_requests = url, clients, max_requests
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        session = requests.Session()
        body = {"model": MODEL_NAME, "messages": [user(f"Describe picture number {index} in detail")],
                "max_tokens": 24, "temperature": 0}
        while not self._stop.is_set() and len(self.outcomes) < self.max_requests:
            started = time.monotonic()
            try:
                response = session.post(f"{self.url}/v1/chat/completions", json=body, timeout=120)
                status, payload = response.status_code, response.json()
            except Exception as err:  # noqa: BLE001 - counted as a lost request
                status, payload = type(err).__name__, repr(err)
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), status, payload))

    def start(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)
        return self.outcomes


def _model_replicas() -> tuple[int, set[str]]:
    """(RUNNING replicas of BitLlavaModel, names of its live replica actors)."""
    import ray
    from ray import serve

    status = serve.status().applications["bitllava-load"].deployments["BitLlavaModel"]
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::bitllava-load#BitLlavaModel#")}
    return status.replica_states.get("RUNNING", 0), names


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _replica_pid(name: str) -> int:
    import ray

    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@pytest.fixture(scope="module")
def load_app(cluster, packed_dir, request):
    """The app with autoscaling tuned to react within seconds (1..2 model replicas, target 1 request)."""
    from ray import serve

    from serve.app import make_app

    if "bitllava-api" in serve.status().applications:  # free the CPUs of part 1
        serve.delete("bitllava-api")
    settings = ServeSettings.from_args({"model": packed_dir, "model_name": MODEL_NAME,
                                        "engine": {"dtype": "float32", "max_batch_size": MODEL_MAX_ONGOING}})
    deployments = {
        "ChatIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "BitLlavaModel": {
            "max_ongoing_requests": MODEL_MAX_ONGOING, "ray_actor_options": {"num_cpus": 0.5},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 1, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
                                   "look_back_period_s": 2},
        },
    }
    serve.run(make_app(settings, deployments), name="bitllava-load", route_prefix="/")
    yield cluster["url"]
    serve.delete("bitllava-load")


def _ok(outcome: Outcome) -> bool:
    return outcome.status == 200 and outcome.body["choices"][0]["finish_reason"] in ("stop", "length") \
        and outcome.body["usage"]["completion_tokens"] >= 1


class LongStream:
    """One streamed request of many tokens on its own thread; records when content starts and how it ends."""

    def __init__(self, url: str, index: int, max_tokens: int):
        self.first_content: float | None = None
        self.events: list[dict] = []
        self.done = False  # ended with data: [DONE]
        self.failure: str | None = None
        body = {"model": MODEL_NAME, "messages": [user(f"Tell a long story about shape {index}")],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
                if response.status_code != 200:
                    self.failure = f"HTTP {response.status_code}: {response.text}"
                    return
                for line in response.iter_lines(decode_unicode=True):
                    if not line:
                        continue
                    assert line.startswith("data: "), line
                    if line == "data: [DONE]":
                        self.done = True
                        break
                    event = json.loads(line[len("data: "):])
                    self.events.append(event)
                    if self.first_content is None and event.get("choices") and \
                            event["choices"][0]["delta"].get("content"):
                        self.first_content = time.monotonic()
        except Exception as err:  # noqa: BLE001 - a broken connection is a lost request
            self.failure = repr(err)


def test_autoscaling_adds_a_replica_and_a_killed_replica_is_replaced(load_app):
    assert _model_replicas()[0] == 1

    # phase 1: load until autoscaling has added the second replica, then a little more; nothing may fail
    load = Load(load_app, clients=6, max_requests=3000).start()
    try:
        waited = time.monotonic()
        _wait_for(lambda: _model_replicas()[0] == 2, 120, "Serve autoscaling to start a second model replica")
        scaled_after = time.monotonic() - waited
        time.sleep(3)
    finally:
        phase1 = load.stop()
    assert len(phase1) >= 20
    failed = [o for o in phase1 if not _ok(o)]
    assert not failed, f"{len(failed)} of {len(phase1)} requests failed while scaling up: {failed[:3]}"
    print(f"autoscaled to 2 replicas after {scaled_after:.1f}s of load; {len(phase1)} requests, all 200")

    # phase 2: fill both replicas with long streams (max_ongoing_requests each: the router never puts more on
    # one), queue short requests behind them, then SIGKILL one replica process
    running, names = _model_replicas()
    assert running == 2 and len(names) == 2
    victim = sorted(names)[0]
    pid = _replica_pid(victim)
    streams = [LongStream(load_app, i, max_tokens=400) for i in range(2 * MODEL_MAX_ONGOING)]
    _wait_for(lambda: all(s.first_content for s in streams) or any(s.failure or s.done for s in streams), 120,
              "every long stream to be generating")
    assert not any(s.failure or s.done for s in streams), "a long stream ended before the kill"
    load = Load(load_app, clients=4, max_requests=3000).start()
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: (lambda r: r[0] == 2 and victim not in r[1] and len(r[1] - names) == 1)(_model_replicas()),
                  120, "Serve to replace the killed replica")
        replaced_at = time.monotonic()
        time.sleep(3)
    finally:
        phase2 = load.stop()
    for stream in streams:
        stream.thread.join(timeout=150)
    new = (_model_replicas()[1] - names).pop()
    assert _replica_pid(new) != pid  # the replacement is a live process

    # the streams in flight on the killed replica end with an error event; the others complete
    broken = [s for s in streams if not s.done]
    completed = [s for s in streams if s.done]
    print(f"killed a replica; replaced after {replaced_at - killed_at:.1f}s; streams: {len(completed)} completed, "
          f"{len(broken)} broken; queued requests: {dict(collections.Counter(o.status for o in phase2))}")
    assert len(broken) == MODEL_MAX_ONGOING and len(completed) == MODEL_MAX_ONGOING
    for stream in broken:
        assert stream.failure is None, stream.failure  # the HTTP stream itself stayed intact
        error = stream.events[-1]["error"]
        assert error["code"] == "model_replica_unavailable" and error["type"] == "service_unavailable_error"
        assert "retry" in error["message"]
    for stream in completed:
        assert stream.events[-1]["usage"]["completion_tokens"] == 400
        assert stream.events[-2]["choices"][0]["finish_reason"] == "length"

    # requests queued behind the streams, or sent after the kill, were not on the killed replica: none failed
    assert len(phase2) >= 10
    failed = [o for o in phase2 if not _ok(o)]
    assert not failed, f"{len(failed)} of {len(phase2)} requests failed: {failed[:3]}"
    assert [o for o in phase2 if o.started > replaced_at]
