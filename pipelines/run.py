"""`bitllava run CONFIG`: data -> align -> instruct -> eval -> pack -> deploy, on one Ray cluster.

Each step writes its output under the config's `out` root and a marker `_steps/<step>.json` holding
the hash of its settings and inputs; a step whose marker matches is skipped, so a re-run after a
failure continues where it stopped. One MLflow parent run per invocation, a nested run per step.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import sys
import time

from components import storage
from components.tracking import create_run, resolve_tracking_uri
from pipelines.config import PipelineConfig


def _log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


STEPS = ("init", "synth", "preprocess-align", "preprocess-instruct", "train-align", "train-share", "train-instruct",
         "eval", "pack", "deploy")


def step_names(cfg: PipelineConfig) -> list[str]:
    """This config's steps in order (what `run --until` and the Kubeflow tasks name)."""
    names = ["init"] + (["synth"] if cfg.data.synth else []) + ["preprocess-align", "preprocess-instruct"]
    names += [f"train-{stage}" for stage in cfg.train_stages]
    return names + (["eval"] if cfg.eval.tasks else []) + ["pack", "deploy"]


class StopPipeline(Exception):
    """Raised after the step named by `until` (a Kubeflow task runs the pipeline up to its own step)."""


class StepRunner:
    """Runs steps in order, skipping those already done with the same settings and inputs."""

    def __init__(self, cfg: PipelineConfig, tracking_uri: str, parent_run_id: str, until: str | None = None):
        self.cfg, self.tracking_uri, self.parent, self.until = cfg, tracking_uri, parent_run_id, until
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict] = {}

    def marker(self, name: str) -> str:
        return storage.join(self.cfg.out, "_steps", f"{name}.json")

    def run(self, name: str, settings: dict, inputs: list[str], fn) -> dict:
        key = hashlib.sha256(json.dumps({"step": name, "settings": settings,
                                         "inputs": [self.keys[i] for i in inputs]},
                                        sort_keys=True, default=str).encode()).hexdigest()
        self.keys[name] = key
        if storage.exists(self.marker(name)):
            done = json.loads(storage.read_bytes(self.marker(name)))
            if done["key"] == key:
                _log(f"{name}: up to date, skipped")
                self.results[name] = done["result"]
                self.check_until(name)
                return done["result"]
        _log(f"{name}: running")
        start = time.time()
        result = fn()
        result = {**result, "seconds": round(time.time() - start, 1)}
        storage.write_bytes_atomic(self.marker(name), json.dumps({"key": key, "result": result}).encode())
        self.results[name] = result
        _log(f"{name}: done in {result['seconds']}s")
        self.check_until(name)
        return result

    def check_until(self, name: str) -> None:
        if self.until and (name == self.until or (self.until == "eval" and name.startswith("eval-")
                                                  and name == f"eval-{self.cfg.eval.tasks[-1]}")):
            raise StopPipeline(name)

    def nested_run(self, name: str, params: dict, metrics: dict) -> None:
        from components.tracking_outbox import log_or_keep

        run_id = create_run(self.tracking_uri, self.cfg.mlflow.experiment, name, self.parent,
                            params=params)
        log_or_keep(self.tracking_uri, run_id, self.cfg.out, metrics=metrics, status="FINISHED")


def plan(cfg: PipelineConfig) -> dict:
    """What `--dry-run` prints: steps, resources, storage, estimated sizes."""
    from components.train.config import TrainConfig
    from model.presets import preset_config

    config, _ = preset_config(cfg.preset)
    vision = config.vision_config
    pixels = 3 * vision.image_size**2 * 2
    features = config.num_image_tokens * vision.hidden_size * 2
    records = {"cc595k": 595_375, "instruct": 157_712}
    if cfg.data.synth:
        from components.data.synth import SynthConfig

        synth = SynthConfig(out=storage.join(cfg.out, "synth"), seed=cfg.seed, **cfg.data.synth)
        # the instruct set: two conversations per image
        records = {"cc595k": synth.records, "instruct": 2 * (synth.instruct_images or synth.records // 2)}
    enc = {p: cfg.preprocess.encode(p) for p in ("align", "instruct")}
    train = {s: cfg.train_config(s, data="<store>", out="<out>", init="<init>") for s in cfg.train_stages}

    def resources(t: TrainConfig) -> str:
        return f"{t.workers} workers x ({'1 GPU' if t.use_gpu else f'{t.cpus_per_worker} CPU'}), ZeRO-{t.zero_stage}"

    return {
        "name": cfg.name, "preset": cfg.preset, "out": cfg.out,
        "steps": [
            {"step": "init", "output": storage.join(cfg.out, "model-init"), "vision": cfg.vision, "llm": cfg.llm},
            *([{"step": "synth", "output": storage.join(cfg.out, "synth"), **cfg.data.synth}]
              if cfg.data.synth else []),
            *({"step": f"preprocess-{p}", "encode": enc[p], "output": storage.join(cfg.out, "stores", p),
               "estimated_bytes": records["cc595k" if p == "align" else "instruct"]
               * (pixels if enc[p] == "pixels" else features)} for p in ("align", "instruct")),
            *({"step": f"train-{s}", "resources": resources(train[s]), "output": storage.join(cfg.out, s),
               "global_batch": train[s].global_batch, "lr": train[s].lr,
               "tune": {"projector": train[s].tune_projector, "llm": train[s].tune_llm,
                        "vision": train[s].tune_vision + (f" from layer {train[s].tune_vision_from_layer}"
                                                          if train[s].tune_vision == "partial" else "")}}
              for s in cfg.train_stages),
            *({"step": f"eval-{t}", "output": storage.join(cfg.out, "eval", t)} for t in cfg.eval.tasks),
            {"step": "pack", "format": cfg.pack.format, "output": storage.join(cfg.out, "packed")},
            {"step": "deploy", "keep_running": cfg.serve.keep_running},
        ],
    }


def eval_sources(cfg: PipelineConfig, synth: dict | None) -> dict:
    """Each task's eval files ({annotations, questions, ocr, test_questions, protocol, images}): the generated sets
    (`data synth`), else the config's `data.eval`."""
    if cfg.data.synth:
        ev = synth["eval"]
        sources = {
            "pope": {"annotations": [ev["pope"]["questions"][s] for s in ("random", "popular", "adversarial")],
                     "images": ev["pope"]["images"]},
            "vqav2": {"questions": ev["vqav2"]["questions"], "annotations": [ev["vqav2"]["annotations"]],
                      "images": ev["vqav2"]["images"]},
            "textvqa": {"annotations": [ev["textvqa"]["annotations"]], "ocr": ev["textvqa"].get("ocr"),
                        "images": ev["textvqa"]["images"]},
        }
        sources.update({t: ev[t] for t in ("gqa", "scienceqa", "mme", "seed", "mmbench") if t in ev})
        return sources
    return cfg.data.eval


def warn_if_local_output_on_many_nodes(out: str) -> None:
    """A local output folder is on this node only: other nodes' workers cannot read or write it."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not storage.is_s3(out):
        _log(f"warning: the output root {out} is a local folder, but the cluster has {nodes} nodes: workers on "
             f"other nodes cannot see it unless it is a shared filesystem (NFS, EFS, ...); use an s3:// URI "
             f"(`out:` in the config, or --out)")


def run_pipeline(cfg: PipelineConfig, address: str | None = None, until: str | None = None) -> dict:
    """Run every step (or the steps up to `until`); returns the summary (or the steps' results when stopped)."""
    import ray

    if until is not None and until not in STEPS:
        raise ValueError(f"unknown step {until!r}; choose one of {STEPS}")
    if until == "train-share" and cfg.share is None:
        raise ValueError("this config has no share stage: there is no train-share step")
    if until == "synth" and not cfg.data.synth:
        raise ValueError("this config generates no data: there is no synth step")
    if not ray.is_initialized():
        ray.init(address=address)
    warn_if_local_output_on_many_nodes(cfg.out)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.out)
    experiment = cfg.mlflow.experiment
    parent = create_run(tracking_uri, experiment, f"pipeline-{cfg.name}",
                        params={k: v for k, v in dataclasses.asdict(cfg).items()}, tags={"pipeline": cfg.name})
    steps = StepRunner(cfg, tracking_uri, parent, until)
    try:
        return _run_steps(cfg, steps, tracking_uri, experiment, parent)
    except StopPipeline as stop:
        _log(f"stopped after {stop}")
        return {"pipeline": cfg.name, "until": until, "steps": steps.results, "mlflow_parent_run_id": parent}


# Options added after runs existed, at the value that means "off": left out of step keys, so a run made
# before them stays done (its markers' keys are unchanged) unless the option is turned on.
LATER_OPTIONS = {"qk_norm": False, "z_loss": 0.0, "tune_projector": "full", "tune_vision": "frozen",
                 "tune_vision_from_layer": None, "projector_lr": None, "vision_lr": None}
TRAIN_DATA = {"align": "align", "share": "align", "instruct": "instruct"}  # the store each stage trains on


def _keyed_when_set(settings: dict, **off) -> dict:
    """`settings` without the later options at their "off" values (LATER_OPTIONS, and `off` for this step's)."""
    off = {**LATER_OPTIONS, **off}
    return {k: v for k, v in settings.items() if not (k in off and v == off[k])}


def _run_steps(cfg: PipelineConfig, steps: StepRunner, tracking_uri: str, experiment: str, parent: str) -> dict:
    out = cfg.out

    def do_init():
        from model.assemble import init_model
        from model.checkpoint import save_model
        from components.train.outputs import publish_folder
        import tempfile

        model, tokenizer, processor = init_model(cfg.preset, seed=cfg.seed, vision=cfg.vision, llm=cfg.llm,
                                                 qk_norm=cfg.qk_norm)
        with tempfile.TemporaryDirectory() as d:
            save_model(d, model, tokenizer, processor)
            publish_folder(d, storage.join(out, "model-init"))
        return {"model_dir": storage.join(out, "model-init")}

    key = _keyed_when_set({"preset": cfg.preset, "seed": cfg.seed, "vision": cfg.vision, "llm": cfg.llm,
                           "qk_norm": cfg.qk_norm})
    base = steps.run("init", key, [], do_init)["model_dir"]

    synth = None
    if cfg.data.synth:
        from components.data.synth import SynthConfig, synthesize

        synth = steps.run("synth", cfg.data.synth, [], lambda: synthesize(
            SynthConfig(out=storage.join(out, "synth"), seed=cfg.seed, **cfg.data.synth)))
        sources = {"cc595k": synth["cc595k"], "instruct": synth["instruct"]}
    else:
        sources = {"cc595k": cfg.data.cc595k, "instruct": cfg.data.instruct}

    from components.data.preprocess import PreprocessConfig, preprocess

    stores = {}
    for phase, source in (("align", "cc595k"), ("instruct", "instruct")):
        settings = {"encode": cfg.preprocess.encode(phase), "shard_records": cfg.preprocess.shard_records,
                    "max_length": cfg.preprocess.max_length,
                    "json": sources[source]["json"], "images": sources[source]["images"]}
        store = storage.join(out, "stores", phase)

        def do_preprocess(phase=phase, source=source, settings=settings, store=store):
            manifest = preprocess(PreprocessConfig(source=source, phase=phase, out=store, model=base, **settings))
            steps.nested_run(f"preprocess-{phase}", settings, manifest["counts"])
            return {"store": store, "counts": manifest["counts"], "content_hash": manifest["content_hash"]}

        stores[phase] = steps.run(f"preprocess-{phase}", settings, ["init"] + (["synth"] if synth else []),
                                  do_preprocess)["store"]

    from components.train.config import PHASE_TUNING
    from components.train.run import run_training

    init, previous = base, []
    for stage in cfg.train_stages:  # each stage starts from the model of the one before
        tcfg = cfg.train_config(stage, data=stores[TRAIN_DATA[stage]], out=storage.join(out, stage), init=init,
                                tracking_uri=tracking_uri, experiment=experiment, parent_run_id=parent,
                                run_name=f"train-{stage}")
        settings = _keyed_when_set({k: v for k, v in tcfg.to_dict().items()
                                    if k not in ("parent_run_id", "tracking_uri")}, tune_llm=PHASE_TUNING[tcfg.phase])
        init = steps.run(f"train-{stage}", settings, [f"preprocess-{TRAIN_DATA[stage]}"] + previous,
                         lambda tcfg=tcfg: run_training(tcfg))["model_dir"]
        previous = [f"train-{stage}"]
    model_dir = init

    from components.evaluate.run import EvalConfig, run_eval

    metrics = {}
    evals = eval_sources(cfg, synth)
    for task in cfg.eval.tasks:
        if task not in evals:
            raise ValueError(f"eval task {task!r} has no files: add them under data.eval.{task}")
        src = dict(evals[task])
        if task in cfg.eval.protocols:
            src["protocol"] = cfg.eval.protocols[task]
        settings = {"limit": cfg.eval.limit, "batch_size": cfg.eval.batch_size, "num_actors": cfg.eval.num_actors,
                    **src}
        ecfg = EvalConfig(task=task, model=model_dir, images=src.get("images"),
                          out_dir=storage.join(out, "eval", task), annotations=list(src.get("annotations", [])),
                          questions=src.get("questions"), ocr=src.get("ocr"), test_questions=src.get("test_questions"),
                          protocol=src.get("protocol"), limit=settings["limit"], batch_size=settings["batch_size"],
                          num_actors=settings["num_actors"], tracking_uri=tracking_uri, experiment=experiment,
                          mlflow_parent_run_id=parent, run_name=f"eval-{task}")
        metrics[task] = steps.run(f"eval-{task}", settings, ["train-instruct"], lambda ecfg=ecfg: run_eval(ecfg))

    from components.pack import PackConfig, run_pack

    packed = storage.join(out, "packed")

    def do_pack():
        report = run_pack(PackConfig(out=packed, checkpoint=model_dir, format=cfg.pack.format, overwrite=True))
        steps.nested_run("pack", {"format": cfg.pack.format},
                         {k: v for k, v in report.items() if isinstance(v, (int, float))})
        return {"packed_dir": packed, "report": report}

    steps.run("pack", dataclasses.asdict(cfg.pack), ["train-instruct"], do_pack)
    served = deploy(cfg, packed, synth)
    steps.results["deploy"] = served
    summary = {"pipeline": cfg.name, "mlflow_parent_run_id": parent, "tracking_uri": tracking_uri,
               "model_dir": model_dir, "packed_dir": packed,
               "eval": {t: m.get("metrics", m) for t, m in metrics.items()}, "served": served}
    from components.tracking_outbox import log_or_keep

    log_or_keep(tracking_uri, parent, cfg.out, status="FINISHED")  # a server away now: kept for `runs replay`
    return summary


def _image_data_url(path: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def deploy(cfg: PipelineConfig, packed: str, synth: dict | None) -> dict:
    """Start the Serve app on the packed model, send one chat request with an image over HTTP."""
    import urllib.request

    from ray import serve

    from serve.app import build_app

    port = cfg.serve.port
    args = {"model": packed, **({"config": cfg.serve.config} if cfg.serve.config else {})}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from components.console import is_verbose

    serve.run(build_app(args), name="bitllava", route_prefix="/",
              logging_config=None if is_verbose() else {"log_level": "WARNING"})  # no access log per request
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    content = [{"type": "text", "text": cfg.serve.prompt}]
    image = None
    if synth:
        folder = synth["eval"]["vqav2"]["images"]
        image = os.path.join(folder, sorted(os.listdir(folder))[0])
        content.insert(0, {"type": "image_url", "image_url": {"url": _image_data_url(image)}})
    body = json.dumps({"model": "bitllava", "messages": [{"role": "user", "content": content}],
                       "max_tokens": 16, "temperature": 0}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.loads(response.read())
    answer = reply["choices"][0]["message"]["content"]
    _log(f"served answer: {answer!r} (endpoint {url})")
    if not cfg.serve.keep_running:
        serve.shutdown()
    return {"endpoint": url, "prompt": content[-1]["text"], "image": image, "answer": answer,
            "usage": reply.get("usage")}
