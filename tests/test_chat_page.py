"""The chat page (`GET /`, serve/static/) in a real headless browser against the served tiny model.

Debian's chromium (`make setup` installs it) driven by Playwright, against the Serve app on a real
local Ray cluster, with an API key: two images uploaded through the file input, a question typed
and sent; the answer appears piece by piece as the stream arrives and ends as what the API answers
the same request; a follow-up question carries the conversation. A too-large image and a wrong API
key show the server's own error messages.
"""

from __future__ import annotations

import fnmatch
import io
import os
import socket
import tomllib

import pytest
import requests
import torch
from PIL import Image

from serve.settings import ServeSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags chromium keeps trying (and failing) to reach Google's hosts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODEL_NAME = "bitllava-tiny"
API_KEY = "chat-page-key-0123"
LIMITS = dict(max_request_bytes=1_000_000, max_image_bytes=20_000, max_tokens=64, default_max_tokens=16)
TIMEOUT_MS = 60_000

# Every text the page's answer bubbles show, in order, with the time: recorded by a MutationObserver
# from the page's first script on (the page sets an answer's text once per streamed delta).
RECORD_ANSWERS = """
window.__answers = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.classList && r.target.classList.contains("assistant")) {
        for (const node of r.addedNodes) window.__answers.push([performance.now(), node.textContent]);
      }
    }
  }).observe(document.getElementById("log"), { childList: true, subtree: true });
});
"""


def png(path, size=(64, 64), color="red", noise=False) -> str:
    if noise:  # incompressible: the file is about 3 bytes a pixel
        raw = torch.randint(0, 256, (size[0] * size[1] * 3,), generator=torch.Generator().manual_seed(1),
                            dtype=torch.uint8).numpy().tobytes()
        image = Image.frombytes("RGB", size, raw)
    else:
        image = Image.new("RGB", size, color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return str(path)


def test_the_chat_page_ships_with_the_package():
    """Every file under serve/static matches pyproject's package-data of `serve` (a wheel carries it)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["serve"]
    static = os.path.join(ROOT, "serve", "static")
    files = sorted(os.listdir(static))
    assert {"index.html", "chat.js", "chat.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), f"serve/static/{name} is not package-data"


# --------------------------------------------------------------------------- served app and browser


@pytest.fixture(scope="module")
def served(packed_dir):
    """The Serve app of the packed tiny model with an API key, on a local Ray cluster; yields its URL."""
    import ray
    from ray import serve

    from serve.app import make_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings.from_args({"model": packed_dir, "model_name": MODEL_NAME, "api_key": API_KEY,
                                        "limits": LIMITS, "engine": {"dtype": "float32"}})
    deployments = {"ChatIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                   "BitLlavaModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}
    serve.run(make_app(settings, deployments), name="bitllava-chat-page", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def sync_playwright():
    """Playwright's sync API, once Debian's chromium is known to be there (missing, the test fails: never skips)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the chat page's browser test needs Debian's chromium; `make setup` "
                    "installs it (its `browser` target: apt-get install chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `make setup` (it is a dev dependency)", pytrace=False)
    return sync_playwright


@pytest.fixture(scope="module")
def browser(sync_playwright, served):  # Serve first: started with Playwright running, it took 2x as long
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.add_init_script(RECORD_ANSWERS)
    page.goto(f"{served}/")
    page.wait_for_function("document.getElementById('model').textContent !== ''")
    yield page
    context.close()


def ask(page, question: str, images: list[str] = (), key: str = API_KEY):
    """Upload `images`, type `question`, send; returns the request the page sent."""
    page.fill("#api-key", key)
    if images:
        page.set_input_files("#images", list(images))
        page.wait_for_function(f"document.querySelectorAll('#previews img').length === {len(images)}")
    page.fill("#question", question)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as request:
        page.click("#send")
    page.wait_for_selector("#send:not([disabled])")
    return request.value


@pytest.mark.slow
def test_upload_ask_and_watch_the_answer_stream_in(page, served, tmp_path):
    assert page.title() == "bitllava chat"
    assert page.text_content("#model") == MODEL_NAME
    assert page.is_visible("#key-row")  # the server wants a key: the page asks for one
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    sent = ask(page, "What is in these images?", [png(tmp_path / "red.png"), png(tmp_path / "blue.png", color="blue")])

    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    body = sent.post_data_json
    assert body["model"] == MODEL_NAME and body["stream"] is True
    assert body["max_tokens"] == 12 and body["temperature"] == 0
    (message,) = body["messages"]
    urls = [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert message["content"][-1] == {"type": "text", "text": "What is in these images?"}
    assert page.is_hidden("#error"), page.text_content("#error")

    # the same request through the API, not streamed: the text the page must end with
    expected = requests.post(f"{served}/v1/chat/completions", json={**body, "stream": False}, timeout=60,
                             headers={"Authorization": f"Bearer {API_KEY}"})
    assert expected.status_code == 200, expected.text
    text = expected.json()["choices"][0]["message"]["content"]
    answers = page.locator(".message.assistant")
    assert answers.count() == 1 and answers.first.text_content() == text
    assert answers.first.get_attribute("data-finish-reason") == expected.json()["choices"][0]["finish_reason"]
    shown = [t for _, t in page.evaluate("window.__answers") if t]
    assert len(shown) >= 2 and shown[-1] == text, shown  # shown piece by piece, not at the end only
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(shown, shown[1:])), shown
    assert page.locator(".message.user img").count() == 2
    assert page.input_value("#question") == "" and page.locator("#previews img").count() == 0

    follow_up = ask(page, "And the second one?").post_data_json
    assert [m["role"] for m in follow_up["messages"]] == ["user", "assistant", "user"]
    assert follow_up["messages"][1]["content"] == text
    assert page.locator(".message.assistant").count() == 2 and page.is_hidden("#error")


@pytest.mark.slow
def test_a_too_large_image_shows_the_servers_message(page, served, tmp_path):
    big = png(tmp_path / "noise.png", size=(128, 128), noise=True)
    assert os.path.getsize(big) > LIMITS["max_image_bytes"]
    sent = ask(page, "Describe the image.", [big])

    refused = requests.post(f"{served}/v1/chat/completions", json=sent.post_data_json, timeout=60,
                            headers={"Authorization": f"Bearer {API_KEY}"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "image_too_large"
    message = refused.json()["error"]["message"]
    assert str(LIMITS["max_image_bytes"]) in message
    page.wait_for_selector("#error:not([hidden])")
    assert message in page.text_content("#error")
    assert page.locator(".message.assistant").count() == 0  # no answer bubble is left behind
    assert page.locator("#previews img").count() == 1 and page.input_value("#question") == "Describe the image."

    # the person removes the image and asks again: answered, the error is gone
    page.click("#previews button")
    ask(page, "Describe the image.")
    assert page.is_hidden("#error") and page.locator(".message.assistant").count() == 1


@pytest.mark.slow
def test_a_wrong_api_key_shows_the_servers_message(page):
    ask(page, "Hello?", key="not-the-key")
    page.wait_for_selector("#error:not([hidden])")
    assert "incorrect API key" in page.text_content("#error")
