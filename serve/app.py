"""The Serve application: `build_app(args)` for Serve config files, `run_serve` for `bitllava serve`.

    ChatIngress (FastAPI, OpenAI API) --DeploymentHandle--> BitLlavaModel (packed model, batching)

A Serve config file (serve/serve.yaml, or a KubeRay RayService's serveConfigV2) names
`import_path: serve.app:build_app`, passes `args` (validated by `serve.settings.ServeSettings`)
and holds each deployment's replicas, autoscaling_config, max_ongoing_requests and resources;
`serve deploy serve.yaml` and `serve run serve.yaml` use it as is. `bitllava serve --model PACKED_MODEL`
reads the same file, puts PACKED_MODEL into args.model, applies the deployments' settings with
`.options()` and runs the app with `serve.run`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from importlib import resources

import yaml
from ray.serve.deployment import Application

from model.packed.packed_checkpoint import read_packing
from serve.ingress import ChatIngress
from serve.model_deployment import BitLlavaModel
from serve.settings import ServeSettings

IMPORT_PATH = "serve.app:build_app"
DEPLOYMENTS = {"ChatIngress": ChatIngress, "BitLlavaModel": BitLlavaModel}


def default_config_path() -> str:
    return str(resources.files("serve") / "serve.yaml")


def make_app(settings: ServeSettings, deployments: dict[str, dict] | None = None) -> Application:
    """The application graph, each deployment with the options given for it by name (Serve's own keys)."""
    deployments = deployments or {}
    unknown = sorted(set(deployments) - set(DEPLOYMENTS))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown} in the Serve config; this app has {sorted(DEPLOYMENTS)}")
    options = {}
    for name in DEPLOYMENTS:
        try:
            options[name] = DEPLOYMENTS[name].options(**deployments.get(name, {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"deployment {name}: {err}") from err
    model = options["BitLlavaModel"].bind(settings.model, settings.to_args()["engine"], settings.cache_dir)
    return options["ChatIngress"].bind(model, settings.to_args())


def build_app(args: dict) -> Application:
    """Serve's application builder (`import_path: serve.app:build_app`); `args` as in serve/serve.yaml."""
    return make_app(ServeSettings.from_args(args))


def load_serve_config(path: str) -> dict:
    """A Serve config file, validated by Ray's `ServeDeploySchema`, as a plain dict.

    It must hold exactly one application whose import_path is serve.app:build_app.
    """
    from ray.serve.schema import ServeDeploySchema

    with open(path) as f:
        raw = yaml.safe_load(f)
    try:
        schema = ServeDeploySchema.model_validate(raw)
    except Exception as err:  # pydantic.ValidationError
        raise ValueError(f"{path} is not a valid Serve config: {err}") from err
    apps = [a for a in schema.applications if a.import_path == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{path} must hold exactly one application with import_path {IMPORT_PATH} "
                         f"(found {len(apps)})")
    config = schema.model_dump(exclude_unset=True)
    config["application"] = next(a for a in config["applications"] if a["import_path"] == IMPORT_PATH)
    return config


def deployment_options(app_config: dict) -> dict[str, dict]:
    """{deployment name: its options} of an application section of a Serve config."""
    out = {}
    for dep in app_config.get("deployments", []):
        options = dict(dep)
        out[options.pop("name")] = options
    return out


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_serve(model: str | None, config_path: str | None = None, address: str | None = None, host: str | None = None,
              port: int | None = None, wait: bool = True) -> dict:
    """Run the app from a Serve config file on a Ray cluster (a new local one unless `address`).

    `model` replaces the config's `args.model`; without it the config's is used. A local path is relative
    to the working directory (made absolute here: replicas run elsewhere). Blocks until Ctrl-C when
    `wait`; returns {"url", "model_name", "application"}.
    """
    import ray
    from ray import serve

    config_path = config_path or default_config_path()
    config = load_serve_config(config_path)
    app_config = config["application"]
    args = dict(app_config.get("args") or {})
    model = model or args.get("model")
    if not model:
        raise ValueError(f"no model to serve: give --model PACKED_FOLDER (or args.model in {config_path})")
    args["model"] = model if "://" in model else os.path.abspath(model)
    settings = ServeSettings.from_args(args)
    if "://" not in model:
        read_packing(settings.model)  # a wrong path fails here, not in every replica
    application = make_app(settings, deployment_options(app_config))

    http = dict(config.get("http_options") or {})
    http["host"] = host or http.get("host") or "127.0.0.1"
    http["port"] = port or http.get("port") or 8000
    name, prefix = app_config.get("name", "bitllava"), app_config.get("route_prefix", "/")
    if not ray.is_initialized():
        # address None: a new local cluster ("local"), never one that happens to run on this machine
        ray.init(address=address or "local", runtime_env=app_config.get("runtime_env"))
    serve.start(http_options={"host": http["host"], "port": http["port"]})
    serve.run(application, name=name, route_prefix=prefix, logging_config=app_config.get("logging_config"))
    shown = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
    url = f"http://{shown}:{http['port']}{prefix.rstrip('/')}"
    info = {"url": url, "openai_base_url": f"{url}/v1", "model_name": settings.model_name, "application": name}
    print(json.dumps(info), flush=True)
    print(f"bitllava serve: {settings.model_name} at {url}/v1/chat/completions (Ctrl-C to stop)", flush=True)
    if not wait:
        return info
    if threading.current_thread() is threading.main_thread():  # `kill` (SIGTERM) stops it like Ctrl-C
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("bitllava serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return info
