"""The serving pieces without a cluster: settings and the shipped Serve config, image and message
checks, OpenAI request validation, the batching engine (against transformers' generate), and
s3:// model copies (on a real S3-compatible server).

The HTTP application itself is tested on a real Ray cluster in tests/test_serve_http.py.
"""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from model.chat import user_turn
from model.conversation import prompt_ids
from model.packed.packed_checkpoint import load_packed, save_packed
from model.presets import build_from_preset
from model.vision import preprocess_images
from serve.app import DEPLOYMENTS, IMPORT_PATH, build_app, default_config_path, deployment_options, \
    load_serve_config, make_app
from serve.engine import BatchEngine, GenerationRequest, SamplingParams, _held_back
from serve.errors import APIError, pydantic_param
from serve.images import load_image, url_allowed
from serve.model_files import local_model_folder
from serve.openai_schema import ChatCompletionRequest
from serve.prompt import parse_messages, render_prompt
from serve.settings import Limits, ServeSettings

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loaded(packed_dir):
    return load_packed(packed_dir, dtype=torch.float32)


def png_bytes(size=(64, 64), color="red", mode="RGB", noise=False) -> bytes:
    image = Image.new(mode, size, color)
    if noise:
        image = Image.frombytes("RGB", size, torch.randint(0, 256, (size[0] * size[1] * 3,),
                                                             generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.uint8).numpy().tobytes())
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's shape), with no pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- settings and Serve config


def test_settings_defaults_and_validation():
    settings = ServeSettings.from_args({"model": "/m", "limits": {"max_images": 2}, "engine": {"dtype": "float32"}})
    assert settings.limits.max_images == 2 and settings.engine.dtype == "float32"
    assert settings.resolve_api_key() is None
    bad = [
        ({"model": "/m", "limts": {}}, "unknown key(s) ['limts']"),
        ({"model": "/m", "limits": {"max_image": 3}}, "args.limits: unknown key(s) ['max_image']"),
        ({"model": "/m", "limits": {"max_images": 0}}, "limits.max_images must be a positive integer"),
        ({"model": "/m", "limits": {"max_tokens": 8, "default_max_tokens": 16}}, "default_max_tokens"),
        ({"model": "/m", "engine": {"dtype": "float16"}}, "engine.dtype must be one of"),
        ({"model": "/m", "image_url_allowlist": ["ftp://x/"]}, "image_url_allowlist entry"),
        ({"model": "/m", "api_key": "a", "api_key_env": "B"}, "not both"),
        ({}, "missing 1 required positional argument: 'model'"),
    ]
    for args, message in bad:
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            ServeSettings.from_args(args)


def test_api_key_env_fails_closed(monkeypatch):
    settings = ServeSettings.from_args({"model": "/m", "api_key_env": "BITLLAVA_TEST_KEY"})
    monkeypatch.delenv("BITLLAVA_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="BITLLAVA_TEST_KEY"):
        settings.resolve_api_key()
    monkeypatch.setenv("BITLLAVA_TEST_KEY", "s3cret")
    assert settings.resolve_api_key() == "s3cret"


def _strict_serve_errors(raw: dict) -> list[str]:
    """ServeDeploySchema plus the unknown-key and autoscaling checks it leaves out."""
    ServeDeploySchema.model_validate(raw)
    errors = []
    for app in raw["applications"]:
        errors += sorted(set(app) - set(ServeApplicationSchema.model_fields))
        for dep in app.get("deployments", []):
            errors += sorted(set(dep) - set(DeploymentSchema.model_fields))
            errors += sorted(set(dep.get("ray_actor_options", {})) - set(RayActorOptionsSchema.model_fields))
            errors += sorted(set(dep.get("autoscaling_config", {})) - set(AutoscalingConfig.model_fields))
            AutoscalingConfig.model_validate(dep.get("autoscaling_config", {}))
    return errors


def test_shipped_serve_yaml_validates_and_builds():
    path = default_config_path()
    assert Path(path) == REPO / "serve" / "serve.yaml"
    raw = yaml.safe_load(open(path))
    assert _strict_serve_errors(raw) == []
    config = load_serve_config(path)
    app = config["application"]
    assert app["import_path"] == IMPORT_PATH
    settings = ServeSettings.from_args(app["args"])  # every args key is a known setting
    options = deployment_options(app)
    assert set(options) == set(DEPLOYMENTS)
    # one model replica with the ingress at its most replicas fits a 2-CPU machine, and computes on
    # both cores; autoscaling may add model replicas where a cluster has the CPUs
    model_cpus = options["BitLlavaModel"]["ray_actor_options"]["num_cpus"]
    ingress = options["ChatIngress"]
    assert ingress["ray_actor_options"]["num_cpus"] * ingress["autoscaling_config"]["max_replicas"] + model_cpus <= 2
    assert math.ceil(model_cpus) == 2 and settings.engine.torch_threads is None
    assert options["BitLlavaModel"]["autoscaling_config"]["max_replicas"] > 1
    assert settings.engine.max_batch_size >= options["BitLlavaModel"]["max_ongoing_requests"]
    make_app(settings, options)  # Serve accepts every option by name


def test_rayservice_serve_config_matches_this_app():
    """infra/kuberay/rayservice.yaml's serveConfigV2 names these deployments and valid args."""
    [service] = [d for d in yaml.safe_load_all(open(REPO / "infra" / "kuberay" / "rayservice.yaml"))
                 if d and d.get("kind") == "RayService"]
    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = raw["applications"]
    assert app["import_path"] == IMPORT_PATH
    options = deployment_options(ServeDeploySchema.model_validate(raw).model_dump(exclude_unset=True)
                                 ["applications"][0])
    assert set(options) == set(DEPLOYMENTS)
    make_app(ServeSettings.from_args(app["args"]), options)
    build_app(app["args"])


def test_serve_config_errors_name_the_problem(tmp_path):
    raw = yaml.safe_load(open(default_config_path()))
    raw["applications"][0]["deployments"].append({"name": "Typo", "num_replicas": 1})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_serve_config(str(path))
    with pytest.raises(ValueError, match="unknown deployment.*Typo"):
        make_app(ServeSettings.from_args(config["application"]["args"]), deployment_options(config["application"]))
    raw["applications"][0]["import_path"] = "other.app:build"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="exactly one application with import_path serve.app:build_app"):
        load_serve_config(str(path))
    path.write_text("applications: [{name: x}]")
    with pytest.raises(ValueError, match="not a valid Serve config"):
        load_serve_config(str(path))


# --------------------------------------------------------------------------- images


def _code(fn) -> str:
    with pytest.raises(APIError) as info:
        fn()
    assert 400 <= info.value.status < 500 and info.value.body()["error"]["message"]
    return info.value.code


def test_images_from_data_urls_and_every_refusal():
    limits = Limits(max_image_bytes=100_000, max_image_pixels=256 * 256)
    image = load_image(data_url(png_bytes((80, 40), "blue")), limits, [], "p")
    assert image.mode == "RGB" and image.size == (80, 40)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), "green").save(jpeg, "JPEG")
    assert load_image(data_url(jpeg.getvalue(), "image/jpeg"), limits, [], "p").size == (32, 32)

    assert _code(lambda: load_image("data:image/png;base64,@@@notbase64", limits, [], "p")) == "invalid_base64"
    assert _code(lambda: load_image(data_url(b"this is not an image at all"), limits, [], "p")) == "invalid_image"
    assert _code(lambda: load_image(data_url(png_bytes(), "text/plain"), limits, [], "p")) == "invalid_image"
    assert _code(lambda: load_image("data:image/png," + "abc", limits, [], "p")) == "invalid_image_url"
    assert _code(lambda: load_image(data_url(png_bytes()[:60]), limits, [], "p")) == "invalid_image"  # truncated
    assert _code(lambda: load_image(data_url(png_bytes((200, 200), noise=True)), limits, [], "p")) == \
        "image_too_large"  # 120 kB of noise
    assert _code(lambda: load_image(data_url(png_bytes((300, 300))), limits, [], "p")) == "image_too_large"
    for side in (1000, 20000):  # decompression bombs: refused from the header (PIL's own bomb check at 20000)
        assert _code(lambda: load_image(data_url(png_header_only(side, side)), limits, [], "p")) == "image_too_large"
    assert _code(lambda: load_image("https://example.com/cat.png", limits, [], "p")) == "image_url_not_allowed"
    assert _code(lambda: load_image("file:///etc/passwd", limits, [], "p")) == "invalid_image_url"


def test_url_allowlist_matches_scheme_host_port_and_path_prefix():
    allow = ["https://images.example.com/public/", "http://127.0.0.1:8080/"]
    assert url_allowed("https://images.example.com/public/a.png", allow)
    assert url_allowed("https://IMAGES.example.com:443/public/x/y.jpg", allow)
    assert url_allowed("http://127.0.0.1:8080/anything.png", allow)
    for url in ("http://images.example.com/public/a.png",  # scheme
                "https://images.example.com/private/a.png",  # path
                "https://images.example.com.evil.net/public/a.png",  # host suffix trick
                "https://evil.net/public/a.png#images.example.com",
                "https://images.example.com@evil.net/public/a.png",  # user-info trick
                "http://127.0.0.1:8081/a.png",  # port
                "http://127.0.0.1/a.png",
                "http://127.0.0.1:99999/a.png"):  # malformed port
        assert not url_allowed(url, allow), url


# --------------------------------------------------------------------------- requests and messages


def test_request_schema_refuses_what_it_cannot_honour():
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                               "stop": "x", "max_completion_tokens": 5})
    assert ok.stop == ["x"] and ok.requested_max_tokens() == 5
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]}).stop \
        == []
    cases = {
        "n": {"n": 2}, "tools": {"tools": []}, "temperature": {"temperature": 3}, "top_p": {"top_p": 0},
        "max_tokens": {"max_tokens": 0}, "stop": {"stop": ["a", "b", "c", "d", "e"]},
        "presence_penalty": {"presence_penalty": 0.5}, "messages": {"messages": []},
    }
    for name, extra in cases.items():
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
        with pytest.raises(Exception) as info:
            ChatCompletionRequest.model_validate(body)
        assert pydantic_param(info.value.errors()[0]["loc"]).startswith(name), (name, info.value.errors()[0]["loc"])
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}]})
    deepest = max(info.value.errors(), key=lambda e: len(e["loc"]))
    assert pydantic_param(deepest["loc"]) == "messages[0].content[0].image_url.url"


def _messages(*items):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": list(items)}).messages


def test_messages_become_the_training_template(loaded):
    tokenizer, config = loaded.tokenizer, loaded.model.config
    one = _messages({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                                 {"type": "text", "text": "What color?"}]})
    ids = render_prompt(parse_messages(one), tokenizer, config.template, config.num_image_tokens)
    # the same prompt as `bitllava generate` builds (model.chat.user_turn)
    assert ids == prompt_ids([user_turn("What color?", 1)], tokenizer, config.template, 1, config.num_image_tokens)

    chat = parse_messages(_messages(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                     {"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": " and "},
                                     {"type": "image_url", "image_url": {"url": "data:b"}}]},
        {"role": "assistant", "content": "Two shapes."},
        {"role": "user", "content": "Which is red?"},
        {"role": "user", "content": "Answer in one word."}))
    assert [i.url for i in chat.images] == ["data:a", "data:b"]
    assert [i.param for i in chat.images] == ["messages[1].content[1].image_url", "messages[1].content[3].image_url"]
    assert chat.conversations == [
        {"from": "human", "value": "Be brief.\n\nCompare <image> and <image>"},
        {"from": "gpt", "value": "Two shapes."},
        {"from": "human", "value": "Which is red?\nAnswer in one word."},
    ]
    ids = render_prompt(chat, tokenizer, config.template, config.num_image_tokens)
    assert ids.count(config.image_token_id) == 2 * config.num_image_tokens

    refusals = {
        "invalid_content": [{"role": "user", "content": "look at <image> here"}],
        "invalid_messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    }
    for code, items in refusals.items():
        with pytest.raises(APIError) as info:
            parse_messages(_messages(*items))
        assert info.value.code == code and info.value.status == 400
    with pytest.raises(APIError, match="images go in user messages"):
        parse_messages(_messages({"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "data:a"}}]}, {"role": "user", "content": "x"}))


# --------------------------------------------------------------------------- the batching engine


def _request(loaded, text, images, max_tokens, **sampling):
    config = loaded.model.config
    ids = prompt_ids([user_turn(text, len(images))], loaded.tokenizer, config.template, len(images),
                     config.num_image_tokens)
    pixels = preprocess_images(images, loaded.image_processor) if images else None
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, **sampling), pixels)


def _reference(loaded, request):
    """transformers' generate, one request at a time (greedy)."""
    x = torch.tensor([request.prompt_ids])
    kwargs = {} if request.pixel_values is None else {"pixel_values": request.pixel_values}
    out = loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                max_new_tokens=request.sampling.max_tokens, eos_token_id=loaded.tokenizer.eos_token_id,
                                pad_token_id=loaded.tokenizer.pad_token_id, **kwargs)
    return out[0, x.shape[1]:].tolist()


def _run(engine, arrivals: dict[int, list]):
    """Step the engine, submitting arrivals[step] at that step; {request index: (sequence, events)}."""
    seqs, events, step = [], {}, 0
    pending = dict(arrivals)
    while pending or engine.has_work():
        for request in pending.pop(step, []):
            seqs.append(engine.submit(request))
        for seq, event in engine.step():
            events.setdefault(id(seq), []).append(event)
        step += 1
        assert engine.num_active <= engine.max_batch_size
    return [(s, events[id(s)]) for s in seqs]


def test_engine_batches_match_one_at_a_time_generation(loaded):
    red, blue, green = (Image.new("RGB", s, c) for s, c in (((64, 64), "red"), ((80, 40), "blue"),
                                                            ((64, 64), "green")))
    requests = [_request(loaded, "What color is it?", [red], 12, temperature=0),
                _request(loaded, "Compare them", [blue, green], 7, temperature=0),
                _request(loaded, "How many circles are there in the picture?", [], 20, temperature=0),
                _request(loaded, "What", [red], 5, temperature=0),
                _request(loaded, "Where is the star?", [green], 9, temperature=0)]
    expected = [_reference(loaded, r) for r in requests]
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=3)
    # arrivals while others decode; the batch is full at times (max_batch_size 3 < 5 requests)
    results = _run(engine, {0: requests[:1], 2: requests[1:3], 4: requests[3:]})
    for (seq, events), want, request in zip(results, expected, requests):
        assert seq.generated == want
        text = loaded.tokenizer.decode(want, skip_special_tokens=True, clean_up_tokenization_spaces=False).lstrip()
        assert "".join(e.text for e in events) == text
        assert events[-1].finish_reason == ("stop" if want[-1] == loaded.tokenizer.eos_token_id else "length")
        assert events[-1].completion_tokens == len(want) and events[-1].prompt_tokens == len(request.prompt_ids)
        assert all(e.finish_reason is None for e in events[:-1])
    assert engine.num_active == 0 and engine._cache is None


def test_engine_seeded_sampling_ignores_batch_neighbours(loaded):
    image = Image.new("RGB", (64, 64), "red")
    sampled = _request(loaded, "Describe the image.", [image], 10, temperature=1.5, top_p=0.9, seed=7)
    alone = _run(BatchEngine(loaded.model, loaded.tokenizer), {0: [sampled]})[0][0].generated
    others = [_request(loaded, f"Question {i}", [], 6, temperature=1.0, seed=i) for i in range(3)]
    batched = _run(BatchEngine(loaded.model, loaded.tokenizer), {0: others[:2], 1: [sampled, others[2]]})
    assert batched[2][0].generated == alone
    assert _run(BatchEngine(loaded.model, loaded.tokenizer),
                {0: [_request(loaded, "Describe the image.", [image], 10, temperature=1.5, top_p=0.9, seed=8)]}
                )[0][0].generated != alone


def test_engine_stop_sequences_end_and_hold_back_text(loaded):
    request = _request(loaded, "Describe", [], 16, temperature=0)
    [(seq, events)] = _run(BatchEngine(loaded.model, loaded.tokenizer), {0: [request]})
    full = "".join(e.text for e in events)
    assert len(full) > 6
    stop = full[4:7]
    cut = full[:full.find(stop)]
    request = _request(loaded, "Describe", [], 16, temperature=0, stop=["never-appears", stop])
    [(seq, events)] = _run(BatchEngine(loaded.model, loaded.tokenizer), {0: [request]})
    assert "".join(e.text for e in events) == cut and events[-1].finish_reason == "stop"
    assert _held_back("abcxy", ["xyz"]) == 2 and _held_back("abc", ["xyz"]) == 0 and _held_back("ab", []) == 0


def test_engine_cancel_frees_the_slot_and_a_bad_request_fails_alone(loaded):
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch_size=2)
    long = engine.submit(_request(loaded, "Describe", [], 40, temperature=0))
    waiting = engine.submit(_request(loaded, "Hello", [], 3, temperature=0))
    engine.step()
    engine.cancel(long)
    bad = _request(loaded, "What", [Image.new("RGB", (64, 64))], 3, temperature=0)
    bad.pixel_values = torch.cat([bad.pixel_values, bad.pixel_values])  # 2 images for 1 placeholder
    bad_seq = engine.submit(bad)
    events = {}
    while engine.has_work():
        for seq, event in engine.step():
            events.setdefault(id(seq), []).append(event)
    assert long.finish_reason is None and len(long.generated) < 40  # cancelled: dropped, not finished
    assert events[id(bad_seq)][-1].finish_reason == "error" and "images" in events[id(bad_seq)][-1].error
    assert events[id(waiting)][-1].finish_reason in ("stop", "length") and waiting.generated
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit(_request(loaded, "x", [], 10_000, temperature=0))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(GenerationRequest([], SamplingParams(max_tokens=1)))


# --------------------------------------------------------------------------- model files


def test_local_model_folder(packed_dir, tmp_path):
    assert local_model_folder(packed_dir) == packed_dir
    with pytest.raises(ValueError, match="not a model folder"):
        local_model_folder(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported model URI"):
        local_model_folder("gs://bucket/model")


def test_s3_model_is_copied_once_and_refreshed(packed_dir, s3_server, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for name in sorted(p.name for p in Path(packed_dir).iterdir()):
        client.upload_file(str(Path(packed_dir) / name), "bitllava-test", f"serve/packed/{name}")
    uri = "s3://bitllava-test/serve/packed"
    cache = str(tmp_path / "cache")
    folder = local_model_folder(uri, cache)
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(p.name for p in Path(packed_dir).iterdir())
    assert load_packed(folder).multimodal
    meta = local_model_folder(uri, cache, weights=False)
    assert meta != folder and not (Path(meta) / "model.safetensors").exists()
    marker = Path(folder) / "marker"
    marker.write_text("cached")
    assert local_model_folder(uri, cache) == folder and marker.exists()  # reused while config.json is the same
    config = (Path(packed_dir) / "config.json").read_text().replace('"template": "v1"', '"template": "plain"')
    client.put_object(Bucket="bitllava-test", Key="serve/packed/config.json", Body=config.encode())
    assert local_model_folder(uri, cache) == folder and not marker.exists()  # a changed model is copied again
    assert (Path(folder) / "config.json").read_text() == config
    with pytest.raises(ValueError, match="not a model folder"):
        local_model_folder("s3://bitllava-test/nothing-here", cache)


# --------------------------------------------------------------------------- the model deployment's class


def test_model_deployment_streams_cancels_and_serves_text_only_models(tmp_path):
    """BitLlavaModel's class itself (no cluster): warm-up, its engine loop, a stream closed early frees its slot."""
    import asyncio

    from serve.model_deployment import BitLlavaModel

    model, tokenizer, _ = build_from_preset("tiny", seed=1)
    folder = str(tmp_path / "llm")
    save_packed(folder, model.language_model, tokenizer)  # an LLM-only packed folder
    replica = BitLlavaModel.func_or_class(folder, {"dtype": "float32", "max_batch_size": 2})
    assert not replica.loaded.multimodal
    chat = parse_messages(_messages({"role": "user", "content": "How many circles?"}))
    ids = render_prompt(chat, replica.loaded.tokenizer, "v1", 0)

    async def scenario():
        whole = await replica.generate(GenerationRequest(ids, SamplingParams(max_tokens=6, temperature=0)))
        streamed = [e async for e in replica.generate_stream(
            GenerationRequest(ids, SamplingParams(max_tokens=6, temperature=0)))]
        long = replica.generate_stream(GenerationRequest(ids, SamplingParams(max_tokens=400, temperature=0,
                                                                             ignore_eos=True)))
        first = [await long.__anext__(), await long.__anext__()]
        assert replica.engine.num_active == 1
        await long.aclose()  # the client went away
        for _ in range(100):
            if replica.engine.num_active == 0:
                break
            await asyncio.sleep(0.01)
        replica.check_health()  # the engine loop runs
        return whole, streamed, first, await replica.ping()

    whole, streamed, first, ping = asyncio.run(scenario())
    assert whole["error"] is None and whole["completion_tokens"] == len(streamed) <= 6
    assert whole["text"] == "".join(e.text for e in streamed) and whole["finish_reason"] == streamed[-1].finish_reason
    assert all(e.finish_reason is None for e in first)
    assert ping["running"] == 0 and ping["waiting"] == 0
    with pytest.raises(RuntimeError, match="engine loop stopped"):  # its event loop is gone: Serve replaces it
        replica.check_health()
