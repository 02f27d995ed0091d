"""Overload and client disconnects over real HTTP on loopback, on a real local Ray cluster (2 CPUs).

The endpoint is made small with deployment options (Serve's own keys, as serve/serve.yaml sets them):
one BitLlavaModel replica with `max_ongoing_requests` 2 (its engine batches 2) and
`max_queued_requests` 2, so it holds 4 requests at a time; each request generates many tokens
(`max_tokens` + `ignore_eos`).

- Overload: 3x that many retry-free clients (half of them streaming) send requests back to back for a
  bounded time while another polls `/ready`. No request hangs past a short deadline; every refused one
  is a prompt 503 with `Retry-After` and an OpenAI error body; every accepted one completes, in about
  the time its place in the queue allows; `/ready` answers 200 throughout; the replica stays up.
- Disconnects: streams closed after their first token, and a non-streamed request whose client gives
  up, free their batch slots at once (the replica's `ping()` reports nothing running long before the
  generations would have ended), and the next requests are accepted.

Without a cluster: Ray Serve's `BackPressureError` becomes the OpenAI error with `Retry-After`, and the
shipped Serve configs (serve/serve.yaml, the RayService's serveConfigV2) bound every queue, with the
ingress's limits above what it can hand the model.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from dataclasses import dataclass, field

from pathlib import Path

import pytest
import requests
import yaml
from ray.serve.exceptions import BackPressureError

from serve.app import default_config_path, deployment_options, load_serve_config
from serve.errors import error_response
from serve.ingress import READY_PING_TIMEOUT_S, upstream_error
from serve.settings import ServeSettings

pytestmark = pytest.mark.slow

APP = "bitllava-overload"
MODEL_NAME = "bitllava-tiny"
MAX_ONGOING = 2  # BitLlavaModel: requests on the one replica (= its engine's batch)
MAX_QUEUED = 2  # BitLlavaModel: requests the ingress's handle queues for it
CAPACITY = MAX_ONGOING + MAX_QUEUED
RETRY_AFTER_S = 2
LONG_TOKENS = 440  # the tiny model's context is 512 (prompt included)
LOAD_TOKENS = 120
LOAD_S = 5.0  # how long the overload lasts
REFUSED_BACKOFF_S = 0.25  # a refused client's pause before its next request (bounds the request rate)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("status,retry_after_s,header,kind", [
    (503, 2, "2", "service_unavailable_error"), (429, 0.2, "1", "rate_limit_error"),
    (503, None, "1", "service_unavailable_error"),  # a deployment without retry_after_s: 1 s
])
def test_backpressure_is_an_openai_error_with_retry_after(status, retry_after_s, header, kind):
    err = upstream_error(BackPressureError(num_queued_requests=2, max_queued_requests=2, status_code=status,
                                           retry_after_s=retry_after_s))
    response = error_response(err)
    assert response.status_code == status and response.headers["retry-after"] == header
    error = json.loads(response.body)["error"]
    assert error["type"] == kind and error["code"] == "overloaded" and "retry" in error["message"]


def _shipped_serve_configs() -> dict[str, dict]:
    [service] = [d for d in yaml.safe_load_all(open(REPO / "infra" / "kuberay" / "rayservice.yaml"))
                 if d and d.get("kind") == "RayService"]
    return {"serve/serve.yaml": deployment_options(load_serve_config(default_config_path())["application"]),
            "rayservice serveConfigV2": deployment_options(yaml.safe_load(service["spec"]["serveConfigV2"])
                                                           ["applications"][0])}


@pytest.mark.parametrize("name", sorted(_shipped_serve_configs()))
def test_shipped_configs_bound_every_queue(name):
    options = _shipped_serve_configs()[name]
    for deployment, opts in options.items():
        assert opts.get("max_queued_requests", -1) >= 1, f"{name}: {deployment} queues without a limit"
        assert opts["backpressure_config"]["retry_after_s"] >= 1, f"{name}: {deployment} sends no Retry-After"
    model, ingress = options["BitLlavaModel"], options["ChatIngress"]
    # one ingress replica holds at most every model replica's slots plus its own queue for them; its own
    # limit is above that, so /ready and the model's refusals (OpenAI bodies) never wait at the proxy
    handed = model["autoscaling_config"]["max_replicas"] * model["max_ongoing_requests"] + model["max_queued_requests"]
    assert ingress["max_ongoing_requests"] > handed, f"{name}: ChatIngress can fill up with model requests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(index: int, max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Tell a long story about shape {index}"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def app(packed_dir):
    import ray
    from ray import serve

    from serve.app import make_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings.from_args({
        "model": packed_dir, "model_name": MODEL_NAME, "limits": {"max_tokens": LONG_TOKENS},
        "engine": {"dtype": "float32", "max_batch_size": MAX_ONGOING},
    })
    deployments = {
        "ChatIngress": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 32,
                        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
                        "ray_actor_options": {"num_cpus": 0.25}},
        "BitLlavaModel": {"num_replicas": 1, "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED,
                          "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
                          "ray_actor_options": {"num_cpus": 1}},
    }
    serve.run(make_app(settings, deployments), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def ping(timeout_s: float = 30) -> dict:
    """The model replica's own state (waiting, running, pid), through a DeploymentHandle of this process."""
    from ray import serve

    return serve.get_deployment_handle("BitLlavaModel", app_name=APP).ping.remote().result(timeout_s=timeout_s)


def idle_within(seconds: float) -> float:
    """Seconds until the replica reports nothing waiting or running; fails after `seconds`."""
    started = time.monotonic()
    while True:
        state = ping()
        if state["running"] == 0 and state["waiting"] == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"the replica is still busy after {seconds}s: {state}"
        time.sleep(0.05)


def timed_request(url: str, payload: dict, timeout: float = 60) -> tuple[float, dict]:
    started = time.monotonic()
    response = requests.post(f"{url}/v1/chat/completions", json=payload, timeout=timeout)
    assert response.status_code == 200, response.text
    return time.monotonic() - started, response.json()


@dataclass
class Outcome:
    latency: float
    status: int | str  # an HTTP status, or the exception of a request that got none
    headers: dict = field(default_factory=dict)  # requests' case-insensitive headers
    body: object = None
    streamed: bool = False


def _post(url: str, payload: dict, deadline_s: float) -> Outcome:
    started = time.monotonic()
    try:
        with requests.post(f"{url}/v1/chat/completions", json=payload, stream=payload["stream"],
                           timeout=deadline_s) as response:
            if response.status_code != 200 or not payload["stream"]:
                parsed = response.json()
            else:
                parsed = [line for line in response.iter_lines(decode_unicode=True) if line]
            status, headers = response.status_code, response.headers
    except Exception as err:  # noqa: BLE001 - a hung or broken request
        return Outcome(time.monotonic() - started, type(err).__name__, body=repr(err), streamed=payload["stream"])
    return Outcome(time.monotonic() - started, status, headers, parsed, payload["stream"])


def _completed(outcome: Outcome, tokens: int) -> bool:
    if outcome.streamed:
        if outcome.body[-1] != "data: [DONE]":
            return False
        last = json.loads(outcome.body[-2][len("data: "):])
        return last["choices"][0]["finish_reason"] == "length"
    return outcome.body["choices"][0]["finish_reason"] == "length" and \
        outcome.body["usage"]["completion_tokens"] == tokens


def test_overload_is_refused_promptly_and_accepted_requests_complete(app):
    pid = ping()["pid"]
    alone, _ = timed_request(app, body(0, LOAD_TOKENS))  # one request on an idle replica (warm)
    alone, _ = timed_request(app, body(0, LOAD_TOKENS))
    # the longest an accepted request can take: the requests ahead of it (a full batch running, a full queue)
    # finish, then its own batch runs; each batch takes about `alone` (batching 2 costs little more than 1)
    accepted_bound = 4 * alone + 3.0
    # a refusal waits for no generation (the bounds scale with `alone`: other work may share these 2 CPUs)
    refusal_bound = max(1.5, 1.5 * alone)
    ready_bound = READY_PING_TIMEOUT_S + 1.0 + alone
    deadline = accepted_bound + 5.0  # a client gives up (and counts a hung request) after this
    clients = 3 * CAPACITY
    stop_at = time.monotonic() + LOAD_S
    outcomes: list[Outcome] = []
    ready: list[tuple[float, int | str, dict | str]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        while time.monotonic() < stop_at:
            outcome = _post(app, body(index, LOAD_TOKENS, stream=index % 2 == 1), deadline)
            with lock:
                outcomes.append(outcome)
            if outcome.status != 200:
                time.sleep(REFUSED_BACKOFF_S)

    def poll_ready() -> None:
        session = requests.Session()
        while time.monotonic() < stop_at + 1:
            started = time.monotonic()
            try:
                response = session.get(f"{app}/ready", timeout=deadline)
                result = (response.status_code, response.json())
            except Exception as err:  # noqa: BLE001
                result = (type(err).__name__, repr(err))
            ready.append((time.monotonic() - started, *result))
            time.sleep(0.25)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=poll_ready, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=LOAD_S + deadline + 10)
    assert not any(t.is_alive() for t in threads), "a client thread is stuck"

    accepted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    statuses = collections.Counter(o.status for o in outcomes)
    slowest_refusal = max((o.latency for o in refused), default=0)
    slowest_accepted = max((o.latency for o in accepted), default=0)
    print(f"{clients} clients for {LOAD_S}s against capacity {CAPACITY}: {dict(statuses)}; one request alone "
          f"{alone:.2f}s, accepted up to {slowest_accepted:.2f}s (bound {accepted_bound:.2f}s), refused within "
          f"{slowest_refusal:.3f}s (bound {refusal_bound:.2f}s); /ready {collections.Counter(r[1] for r in ready)} within "
          f"{max(r[0] for r in ready):.3f}s")

    # nothing hung, and the only answers are successes and overload refusals
    assert set(statuses) <= {200, 503}, (statuses, [o for o in outcomes if o.status not in (200, 503)][:3])
    assert len(accepted) >= CAPACITY and len(refused) >= clients, statuses
    for outcome in refused:
        assert outcome.headers.get("Retry-After") == str(RETRY_AFTER_S), outcome.headers
        assert outcome.headers["content-type"] == "application/json", outcome.headers
        error = outcome.body["error"]
        assert error["type"] == "service_unavailable_error" and error["code"] == "overloaded", error
        assert "overloaded" in error["message"]
        assert outcome.latency < refusal_bound, f"a refusal took {outcome.latency:.2f}s"
    for outcome in accepted:
        assert _completed(outcome, LOAD_TOKENS), outcome.body
        assert outcome.latency < accepted_bound, f"an accepted request took {outcome.latency:.2f}s"
    # both kinds were refused: a streamed request is refused before its stream starts
    assert {o.streamed for o in refused} == {True, False}

    # /ready answered 200 throughout, promptly
    assert len(ready) >= LOAD_S / 2
    for latency, status, payload in ready:
        assert status == 200, payload
        assert payload["status"] == "ok" and payload["model"] == MODEL_NAME, payload
        assert latency < ready_bound, f"/ready took {latency:.2f}s"

    # the replica stayed up (same process) and drains to idle; the next request is served
    from ray import serve

    state = serve.status().applications[APP].deployments["BitLlavaModel"]
    assert state.status == "HEALTHY" and state.replica_states.get("RUNNING") == 1, state
    idle_within(2 * deadline)
    assert ping()["pid"] == pid
    timed_request(app, body(1, 8))


def test_closed_streams_and_abandoned_requests_free_their_batch_slots(app):
    idle_within(60)
    full, result = timed_request(app, body(2, LONG_TOKENS))  # a whole long generation, for comparison
    assert result["usage"]["completion_tokens"] == LONG_TOKENS

    # fill every slot with long streams; close each after its first content
    streams = [requests.post(f"{app}/v1/chat/completions", json=body(10 + i, LONG_TOKENS, stream=True), stream=True,
                             timeout=30) for i in range(MAX_ONGOING)]
    for response in streams:
        assert response.status_code == 200, response.text
        lines = response.iter_lines(decode_unicode=True)
        while '"content": ""' in (line := next(lines)) or not line:  # the role chunk, blank separators
            pass
        assert json.loads(line[len("data: "):])["choices"][0]["delta"]["content"]
    for response in streams:
        response.close()
    closed_at = time.monotonic()
    freed_after = idle_within(full / 2)
    print(f"a {LONG_TOKENS}-token generation takes {full:.2f}s; {MAX_ONGOING} closed streams freed their slots "
          f"{freed_after:.2f}s after the close")
    # a new request is accepted and served at once (the slots are free), long before the closed ones would end
    served, result = timed_request(app, body(20, 8))
    assert served < full / 2
    assert time.monotonic() - closed_at < full

    # a non-streamed request whose client gives up (read timeout: the connection closes) frees its slot too;
    # the client leaves at a quarter of a whole generation (0.55 s for all of it on a fast AVX-512 machine)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{app}/v1/chat/completions", json=body(30, LONG_TOKENS), timeout=(5, min(0.5, full / 4)))
    freed_after = idle_within(full / 2)
    print(f"an abandoned non-streamed request freed its slot {freed_after:.2f}s after its client left")
    assert time.monotonic() - started < full
    timed_request(app, body(31, 8))
