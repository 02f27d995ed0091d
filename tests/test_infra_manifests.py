"""The deployment files under infra/ are valid and agree with each other and with the project.

- Every KubeRay resource (RayCluster, RayJob, RayService) validates against the `ray.io/v1`
  openAPIV3Schema of the CRDs in ../shared/schemas/kuberay, made as strict as the API server with
  kubectl's default field validation: unknown fields are errors, not silently dropped.
- The RayService's serveConfigV2 validates with Ray Serve's own schema (ServeDeploySchema, plus
  AutoscalingConfig, which ServeDeploySchema leaves as a plain dict).
- rayVersion and the image tags carry the installed Ray's version; the Dockerfiles install what
  the Makefile installs; Deployments, Services and Secrets reference each other consistently.
- Negative tests break shipped manifests on purpose and check that the same validation rejects
  them, so the positive tests cannot pass vacuously.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
TRAINING_ENTRYPOINT = "bitllava run /app/pipelines/configs/llava-olmo-bitnet-1b.yaml"
SERVE_IMPORT_PATH = "serve.app:build_app"
OBJECTSTORE_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are 1 MB each


# --------------------------------------------------------------------------- loading


def shared_dir() -> Path:
    """../shared beside the repository (CI clones main with shared/ next to it)."""
    shared = Path(__file__).resolve().parents[2] / "shared"
    if not (shared / "schemas" / "kuberay").is_dir():
        raise FileNotFoundError(
            f"KubeRay CRD schemas not found at {shared / 'schemas' / 'kuberay'}: the manifest tests need "
            f"the shared/ folder checked out beside the repository ({REPO.parent}/shared)"
        )
    return shared


def load_manifests() -> list[tuple[str, dict]]:
    """(where, document) for every YAML document of every file under infra/."""
    docs = []
    paths = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    for path in paths:
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:  # an empty document (a trailing ---) is no object
                    docs.append((f"{path.relative_to(REPO)}#{i}", doc))
    return docs


MANIFESTS = load_manifests()


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in MANIFESTS if doc.get("kind") == kind]


def the_one(kind: str) -> dict:
    docs = of_kind(kind)
    assert len(docs) == 1, f"expected one {kind} under infra/, found {len(docs)}"
    return docs[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(owner, RayCluster spec) of each Ray resource: the RayCluster's own spec, a RayJob's
    rayClusterSpec and a RayService's rayClusterConfig."""
    specs = []
    for doc in of_kind("RayCluster"):
        specs.append((f"RayCluster/{doc['metadata']['name']}", doc["spec"]))
    for doc in of_kind("RayJob"):
        specs.append((f"RayJob/{doc['metadata']['name']}", doc["spec"]["rayClusterSpec"]))
    for doc in of_kind("RayService"):
        specs.append((f"RayService/{doc['metadata']['name']}", doc["spec"]["rayClusterConfig"]))
    return specs


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of the pods a Deployment or a Ray resource creates."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    if kind == "Deployment":
        return [(f"Deployment/{name}", doc["spec"]["template"]["spec"])]
    if kind not in RAY_KINDS:
        return []
    spec = {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
            "RayService": doc["spec"].get("rayClusterConfig")}[kind]
    pods = [(f"{kind}/{name} head", spec["headGroupSpec"]["template"]["spec"])]
    for group in spec.get("workerGroupSpecs", []):
        pods.append((f"{kind}/{name} {group['groupName']}", group["template"]["spec"]))
    return pods


# --------------------------------------------------------------------------- CRD schemas


def _api_server_schema(node: dict) -> dict:
    """A CRD structural schema as plain JSON Schema, as strict as the API server.

    Kubernetes extensions jsonschema does not know: `x-kubernetes-int-or-string` (an integer or a
    string), `nullable`, and the rule that fields a structural schema does not declare are unknown
    (kubectl's default strict field validation rejects them; without it they would be pruned).
    """
    node = dict(node)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node:
        node["properties"] = {k: _api_server_schema(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _api_server_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = _api_server_schema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [_api_server_schema(sub) for sub in node[key]]
    if isinstance(node.get("not"), dict):
        node["not"] = _api_server_schema(node["not"])
    return node


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    path = shared_dir() / "schemas" / "kuberay" / CRD_FILES[kind]
    with open(path) as f:
        crd = yaml.load(f, Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if "v1" not in versions:
        raise ValueError(f"{path} has no v1 version (has {sorted(versions)})")
    schema = _api_server_schema(versions["v1"]["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    """Schema violations of a Ray resource, as `path: message` lines (empty when valid)."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion is {doc.get('apiVersion')!r}, expected 'ray.io/v1'"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# --------------------------------------------------------------------------- Serve config


def _unknown_keys(data: dict, model, where: str) -> list[str]:
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}: unknown field {key!r}" for key in sorted(set(data) - known)]


def serve_config_errors(text: str) -> list[str]:
    """Problems with a RayService serveConfigV2 (a YAML string), as found by Ray Serve's schema.

    ServeDeploySchema ignores unknown keys and keeps autoscaling_config as a plain dict, so typo'd
    field names and autoscaling settings are checked here with the same pydantic models.
    """
    try:
        config = yaml.safe_load(text)
        ServeDeploySchema.model_validate(config)
    except Exception as err:  # yaml.YAMLError or pydantic.ValidationError
        return [f"serveConfigV2: {err}"]
    errors = _unknown_keys(config, ServeDeploySchema, "serveConfigV2")
    for app in config.get("applications") or []:
        errors += _unknown_keys(app, ServeApplicationSchema, f"application {app.get('name')!r}")
        for dep in app.get("deployments") or []:
            where = f"deployment {dep.get('name')!r}"
            errors += _unknown_keys(dep, DeploymentSchema, where)
            errors += _unknown_keys(dep.get("ray_actor_options") or {}, RayActorOptionsSchema, where)
            autoscaling = dep.get("autoscaling_config")
            if autoscaling is None:
                errors.append(f"{where}: no autoscaling_config")
                continue
            errors += _unknown_keys(autoscaling, AutoscalingConfig, f"{where} autoscaling_config")
            try:
                AutoscalingConfig.model_validate(autoscaling)
            except Exception as err:  # pydantic.ValidationError
                errors.append(f"{where} autoscaling_config: {err}")
    return errors


# --------------------------------------------------------------------------- Deployments, Services, Secrets


def _secret_keys(docs: list[dict]) -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData") or {}) | set(d.get("data") or {})
            for d in docs if d["kind"] == "Secret"}


def workload_errors(docs: list[dict]) -> list[str]:
    """Deployment/Service/Secret consistency: selectors select pod labels, named ports exist,
    and every Secret a pod references (envFrom, secretKeyRef) is shipped with that key."""
    errors = []
    secrets = _secret_keys(docs)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    for dep in deployments:
        name = dep["metadata"]["name"]
        if dep.get("apiVersion") != "apps/v1":
            errors.append(f"Deployment/{name}: apiVersion {dep.get('apiVersion')!r}, expected apps/v1")
        selector = dep["spec"].get("selector", {}).get("matchLabels") or {}
        labels = dep["spec"]["template"].get("metadata", {}).get("labels") or {}
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            errors.append(f"Deployment/{name}: selector {selector} does not match pod labels {labels}")
        if not dep["spec"]["template"]["spec"].get("containers"):
            errors.append(f"Deployment/{name}: no containers")
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        if svc.get("apiVersion") != "v1":
            errors.append(f"Service/{name}: apiVersion {svc.get('apiVersion')!r}, expected v1")
        selector = svc["spec"].get("selector") or {}
        targets = [d for d in deployments
                   if selector and all((d["spec"]["template"]["metadata"].get("labels") or {}).get(k) == v
                                       for k, v in selector.items())]
        if not targets:
            errors.append(f"Service/{name}: selector {selector} selects no Deployment's pods")
        port_names = {p.get("name") for d in targets for c in d["spec"]["template"]["spec"]["containers"]
                      for p in c.get("ports", [])}
        port_numbers = {p["containerPort"] for d in targets for c in d["spec"]["template"]["spec"]["containers"]
                        for p in c.get("ports", [])}
        for port in svc["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            if target not in (port_names if isinstance(target, str) else port_numbers):
                errors.append(f"Service/{name}: targetPort {target!r} is no container port of its pods")
    for sec in (d for d in docs if d["kind"] == "Secret"):
        name = sec["metadata"]["name"]
        if sec.get("apiVersion") != "v1" or not (sec.get("stringData") or sec.get("data")):
            errors.append(f"Secret/{name}: expected apiVersion v1 and stringData or data")
    for doc in docs:
        for where, pod in pod_specs(doc):
            for container in pod.get("containers", []):
                for source in container.get("envFrom", []):
                    ref = source.get("secretRef", {}).get("name")
                    if ref is not None and ref not in secrets:
                        errors.append(f"{where}: envFrom Secret {ref!r} is not under infra/")
                for env in container.get("env", []):
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and ref["key"] not in secrets.get(ref["name"], set()):
                        errors.append(f"{where}: {env['name']} reads {ref['name']}/{ref['key']}, "
                                      f"which no Secret under infra/ holds")
    return errors


# --------------------------------------------------------------------------- Dockerfiles and Makefile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def dockerfile_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for instruction, rest in instructions:
        if instruction == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def pip_steps(commands: list[str]) -> list[frozenset[str]]:
    """One signature per `pip install` command: its pinned requirements and flags, with the
    project itself (`.`, `-e .[dev]`) as "<project>"; the pip self-upgrade is left out."""
    steps = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", ";", "|"):
                segment.append(token)
                continue
            tokens, segment = segment, []
            if "pip" not in tokens or "install" not in tokens:
                continue
            tokens = tokens[tokens.index("install") + 1:]
            if "pip" in tokens and "--upgrade" in tokens:
                continue
            step = set()
            for tok in tokens:
                if tok == "--no-deps":
                    step.add(tok)
                elif tok.startswith("-"):
                    continue  # --quiet, -e, ...
                elif tok == "." or tok.startswith(".["):
                    step.add("<project>")
                else:
                    step.add(tok)
            steps.append(frozenset(step))
    return steps


def makefile_setup_commands() -> list[str]:
    """The recipe lines of the Makefile target that installs the virtualenv (`make setup`)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        if not line.strip().startswith("#"):
            recipe.append(line.strip().replace("$(PY)", "python"))
    return recipe


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"image {image!r} has no tag"
    return name.rsplit(":", 1)[1]


# =========================================================================== tests: objects


def test_infra_ships_every_kind_of_object():
    kinds = [doc.get("kind") for _, doc in MANIFESTS]
    for kind in (*RAY_KINDS, "Deployment", "Service", "Secret"):
        assert kind in kinds, f"no {kind} under infra/ (found {sorted(set(kinds))})"


@pytest.mark.parametrize("where,doc", MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_every_document_is_a_named_kubernetes_object(where, doc):
    assert isinstance(doc, dict), f"{where}: not a mapping"
    assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), where
    name = doc.get("metadata", {}).get("name")
    assert isinstance(name, str) and DNS1123_SUBDOMAIN.match(name) and len(name) <= 253, f"{where}: name {name!r}"
    if doc["kind"] in ("Service", *RAY_KINDS):  # these names become Service names: DNS labels
        assert DNS1123_LABEL.match(name) and len(name) <= 63, f"{where}: {name!r} is not a DNS-1123 label"
    assert "namespace" not in doc["metadata"], f"{where}: leave the namespace to `kubectl -n`"


# =========================================================================== tests: KubeRay CRDs


RAY_DOCS = [(w, d) for w, d in MANIFESTS if d.get("kind") in RAY_KINDS]


@pytest.mark.parametrize("where,doc", RAY_DOCS, ids=[w for w, _ in RAY_DOCS])
def test_ray_resources_validate_against_the_kuberay_crds(where, doc):
    errors = crd_errors(doc)
    assert not errors, f"{where} does not match the {doc['kind']} CRD:\n" + "\n".join(errors)


def _head_container(doc: dict) -> dict:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _gpu_group(doc: dict) -> dict:
    return next(g for g in doc["spec"]["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {}))


# (how to break the shipped RayCluster, a string the validation errors must contain)
BROKEN_RAYCLUSTERS = {
    "replicas-not-an-integer": (lambda d: _gpu_group(d).update(replicas="two"), "replicas"),
    "missing-headGroupSpec": (lambda d: d["spec"].pop("headGroupSpec"), "headGroupSpec"),
    "missing-groupName": (lambda d: _gpu_group(d).pop("groupName"), "groupName"),
    "typo-rayVersoin": (lambda d: d["spec"].update(rayVersoin=d["spec"].pop("rayVersion")), "rayVersoin"),
    "rayStartParams-not-a-string": (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                                    "num-cpus"),
    "gpu-quantity-not-a-quantity": (lambda d: _gpu_group(d)["template"]["spec"]["containers"][0]["resources"][
        "limits"].update({"nvidia.com/gpu": "one"}), "nvidia.com/gpu"),
    "autoscaling-not-a-bool": (lambda d: d["spec"].update(enableInTreeAutoscaling="yes"), "enableInTreeAutoscaling"),
    "auth-mode-not-in-enum": (lambda d: d["spec"]["authOptions"].update(mode="tokens"), "authOptions.mode"),
    "typo-in-pod-spec": (lambda d: _head_container(d).update(imag=_head_container(d).pop("image")), "imag"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYCLUSTERS))
def test_crd_validation_rejects_a_broken_raycluster(case):
    mutate, expected = BROKEN_RAYCLUSTERS[case]
    doc = copy.deepcopy(the_one("RayCluster"))
    mutate(doc)
    errors = crd_errors(doc)
    assert errors, f"{case}: the broken RayCluster passed validation"
    assert any(expected in e for e in errors), f"{case}: errors do not name {expected!r}: {errors}"


def test_crd_validation_rejects_a_broken_rayjob_and_rayservice():
    job = copy.deepcopy(the_one("RayJob"))
    job["spec"]["shutdownAfterJobFinishes"] = "true"
    assert any("shutdownAfterJobFinishes" in e for e in crd_errors(job))
    service = copy.deepcopy(the_one("RayService"))
    service["spec"]["serveConfigV2"] = yaml.safe_load(service["spec"]["serveConfigV2"])  # a map, not a string
    assert any("serveConfigV2" in e for e in crd_errors(service))
    del service["spec"]["rayClusterConfig"]
    assert any("rayClusterConfig" in e for e in crd_errors(service))


# =========================================================================== tests: versions and images


def test_ray_version_and_image_tags_match_the_installed_ray():
    version = ray.__version__
    images = set()
    specs = ray_cluster_specs()
    assert {owner.split("/")[0] for owner, _ in specs} == set(RAY_KINDS)
    for owner, spec in specs:
        assert spec.get("rayVersion") == version, f"{owner}: rayVersion {spec.get('rayVersion')!r} != Ray {version}"
        if "image" in spec.get("autoscalerOptions", {}):
            images.add(spec["autoscalerOptions"]["image"])
    for _, doc in RAY_DOCS:
        for where, pod in pod_specs(doc):
            for container in pod["containers"]:
                images.add(container["image"])
                assert f"ray{version}" in image_tag(container["image"]), (
                    f"{where}: image {container['image']!r} does not carry Ray {version} in its tag")
    project_version = pyproject()["project"]["version"]
    assert images == {f"ghcr.io/bitllava/bitllava:{project_version}-ray{version}"}, (
        f"all Ray pods should run the one project image built from infra/Dockerfile, found {sorted(images)}")


def test_dockerfile_builds_on_the_pinned_ray_with_cuda():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    args = dockerfile_args(instructions)
    froms = [expand(rest, args).split()[0] for ins, rest in instructions if ins == "FROM"]
    assert len(froms) == 1, f"expected one build stage, found FROM {froms}"
    base = froms[0]
    repo, tag = base.rsplit(":", 1)
    runs = " ".join(expand(rest, args) for ins, rest in instructions if ins == "RUN")
    if repo == "rayproject/ray":
        assert tag.startswith(f"{ray.__version__}-"), f"base {base} is not Ray {ray.__version__}"
        assert re.search(r"-(gpu|cu\d+)$", tag), f"base {base} is not a CUDA image"
    else:
        assert repo.endswith("nvidia/cuda"), f"base {base} is neither a Ray GPU image nor nvidia/cuda"
        assert "ray==" in runs and f"=={ray.__version__}" in runs, f"{base}: Ray {ray.__version__} not installed"
    assert args.get("RAY_VERSION") == ray.__version__, f"ARG RAY_VERSION={args.get('RAY_VERSION')}"
    assert "py311" in tag or "python3.11" in runs, "the image should run Python 3.11"
    # the build fails if Ray moved: the image checks its own version
    assert f"ray.__version__ == '{ray.__version__}'" in runs


def test_dockerfile_installs_what_make_setup_installs():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    args = dockerfile_args(instructions)
    docker = pip_steps([expand(rest, args) for ins, rest in instructions if ins == "RUN"])
    make = pip_steps(makefile_setup_commands())
    assert any(req.startswith("torch==") for req in make[0]), f"`make setup` no longer starts with torch: {make}"
    # the image may pin Ray to the base image's version in the project's resolve, nothing else
    docker = [step - {f"ray=={ray.__version__}"} for step in docker]
    assert docker == make, f"Dockerfile pip steps {docker} differ from `make setup` {make}"


def test_dockerfile_copies_the_whole_project_into_app():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    workdirs = [rest for ins, rest in instructions if ins == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/app"
    copied = set()
    for ins, rest in instructions:
        if ins == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copied.update(p.rstrip("/") for p in parts[:-1])
    config = pyproject()
    packages = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", config["project"]["readme"]}
    assert needed <= copied, f"infra/Dockerfile does not COPY {sorted(needed - copied)}"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_mlflow_server_image_matches_the_project_mlflow():
    instructions = dockerfile_instructions(INFRA / "mlflow" / "Dockerfile")
    version = dockerfile_args(instructions)["MLFLOW_VERSION"]
    runs = " ".join(rest for ins, rest in instructions if ins == "RUN")
    assert '"mlflow==${MLFLOW_VERSION}"' in runs and "psycopg2" in runs and "boto3" in runs
    spec = next(Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == "mlflow")
    assert spec.specifier.contains(version), f"MLflow server {version} is outside the project's {spec}"
    [server] = [c for c in the_one("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    assert image_tag(server["image"]) == version, f"{server['image']} is not the {version} built by its Dockerfile"


# =========================================================================== tests: clusters


@pytest.mark.parametrize("owner,spec", ray_cluster_specs(), ids=[o for o, _ in ray_cluster_specs()])
def test_clusters_autoscale_cpu_and_gpu_worker_groups(owner, spec):
    assert spec.get("enableInTreeAutoscaling") is True, f"{owner}: autoscaling is off"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{owner}: the head should run no work"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{owner}: Ray token authentication is off"
    gpu_groups, cpu_groups = [], []
    for group in spec["workerGroupSpecs"]:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert lo <= group.get("replicas", lo) <= hi and lo < hi, f"{owner} {group['groupName']}: replicas {lo}..{hi}"
        [container] = group["template"]["spec"]["containers"]
        gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        (gpu_groups if gpus else cpu_groups).append(group["groupName"])
        if gpus:  # Kubernetes requires GPU requests to equal limits
            assert int(container["resources"].get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
    assert gpu_groups and cpu_groups, f"{owner}: want CPU and GPU worker groups, have {gpu_groups=} {cpu_groups=}"


def test_every_ray_pod_gets_object_store_and_mlflow_settings():
    service = the_one("Service")
    port = service["spec"]["ports"][0]["port"]
    expected_uri = f"http://{service['metadata']['name']}:{port}"
    for _, doc in RAY_DOCS:
        for where, pod in pod_specs(doc):
            for container in pod["containers"]:
                refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
                assert "bitllava-objectstore" in refs, f"{where}: no envFrom bitllava-objectstore"
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get("MLFLOW_TRACKING_URI") == expected_uri, f"{where}: MLFLOW_TRACKING_URI {env}"


def test_objects_kuberay_derives_do_not_collide():
    """KubeRay names a RayCluster's head Service `<name>-head-svc` and its token Secret `<name>`,
    and a RayService's Services `<name>-head-svc` / `<name>-serve-svc`: all in one namespace."""
    services = [d["metadata"]["name"] for d in of_kind("Service")]
    secrets = [d["metadata"]["name"] for d in of_kind("Secret")]
    for doc in of_kind("RayCluster"):
        services.append(f"{doc['metadata']['name']}-head-svc")
        secrets.append(doc["metadata"]["name"])
    for doc in of_kind("RayService"):
        services += [f"{doc['metadata']['name']}-head-svc", f"{doc['metadata']['name']}-serve-svc"]
    for kind, names in (("Service", services), ("Secret", secrets)):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"two {kind}s named {duplicates} in one namespace"


def test_object_store_secret_holds_the_s3_settings():
    [secret] = [d for d in of_kind("Secret") if d["metadata"]["name"] == "bitllava-objectstore"]
    assert secret.get("type", "Opaque") == "Opaque"
    assert OBJECTSTORE_KEYS <= set(secret["stringData"]), f"missing {OBJECTSTORE_KEYS - set(secret['stringData'])}"
    assert all(isinstance(v, str) for v in secret["stringData"].values()), "stringData values must be strings"
    assert urlparse(secret["stringData"]["AWS_ENDPOINT_URL"]).scheme in ("http", "https")


# =========================================================================== tests: training job


def test_rayjob_runs_the_training_pipeline():
    job = the_one("RayJob")["spec"]
    assert job["entrypoint"] == TRAINING_ENTRYPOINT
    assert job.get("shutdownAfterJobFinishes") is True, "the job's cluster should go away when the job ends"


def _gpu_capacity(cluster_spec: dict) -> int:
    """GPUs a cluster can grow to: its GPU worker groups' maxReplicas x GPUs per pod."""
    total = 0
    for group in cluster_spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        total += int(limits.get("nvidia.com/gpu", 0)) * group["maxReplicas"]
    return total


def test_rayjob_cluster_can_hold_the_gpu_training_runs():
    """Every shipped GPU training config (one GPU per Ray Train worker) fits the RayJob's cluster."""
    capacity = _gpu_capacity(the_one("RayJob")["spec"]["rayClusterSpec"])
    gpu_runs = {}
    for path in sorted((REPO / "pipelines" / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and config.get("use_gpu") is True and isinstance(config.get("workers"), int):
            gpu_runs[path.relative_to(REPO)] = config["workers"]
    assert gpu_runs, "no GPU training config under pipelines/configs/"
    too_big = {str(p): n for p, n in gpu_runs.items() if n > capacity}
    assert not too_big, f"these configs want more GPU workers than the RayJob's {capacity} GPUs: {too_big}"


def test_rayjob_config_is_inside_the_image():
    """The entrypoint's config path is a repository file the image holds under /app (WORKDIR /app and
    COPY pipelines: see test_dockerfile_copies_the_whole_project_into_app)."""
    config_path = TRAINING_ENTRYPOINT.split()[-1]
    assert config_path.startswith("/app/")
    relative = Path(config_path.removeprefix("/app/"))
    assert (REPO / relative).is_file(), f"{relative} (the RayJob's pipeline config) is missing from the repository"


# =========================================================================== tests: serving


def _serve_config() -> dict:
    return yaml.safe_load(the_one("RayService")["spec"]["serveConfigV2"])


def test_serve_config_validates_with_ray_serve_schema():
    text = the_one("RayService")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string"
    errors = serve_config_errors(text)
    assert not errors, "\n".join(errors)
    [app] = _serve_config()["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH and app["route_prefix"] == "/"
    assert app["args"]["model"].startswith("s3://") and app["args"]["model"].rstrip("/").endswith("/packed")
    assert app["deployments"], "no deployment settings"
    for dep in app["deployments"]:
        autoscaling = AutoscalingConfig.model_validate(dep["autoscaling_config"])
        assert 1 <= autoscaling.min_replicas < autoscaling.max_replicas, dep["name"]
        assert "target_ongoing_requests" in dep["autoscaling_config"], dep["name"]
        assert dep["max_ongoing_requests"] >= autoscaling.target_ongoing_requests, dep["name"]
        assert "ray_actor_options" in dep, dep["name"]


def _first_deployment(config: dict) -> dict:
    return config["applications"][0]["deployments"][0]


# (how to break the shipped serveConfigV2, a string the validation errors must contain)
BROKEN_SERVE_CONFIGS = {
    "min-above-max": (lambda c: _first_deployment(c)["autoscaling_config"].update(min_replicas=99), "max_replicas"),
    "target-not-a-number": (lambda c: _first_deployment(c)["autoscaling_config"].update(
        target_ongoing_requests="many"), "target_ongoing_requests"),
    "typo-in-autoscaling": (lambda c: _first_deployment(c)["autoscaling_config"].update(target_ongoing_request=2),
                            "target_ongoing_request'"),
    "typo-in-deployment": (lambda c: _first_deployment(c).update(max_ongoing_request=2), "max_ongoing_request'"),
    "typo-in-actor-options": (lambda c: _first_deployment(c)["ray_actor_options"].update(num_gpu=1), "num_gpu"),
    "missing-import-path": (lambda c: c["applications"][0].pop("import_path"), "import_path"),
    "max-ongoing-not-an-int": (lambda c: _first_deployment(c).update(max_ongoing_requests="lots"),
                               "max_ongoing_requests"),
    "no-autoscaling": (lambda c: _first_deployment(c).pop("autoscaling_config"), "autoscaling_config"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SERVE_CONFIGS))
def test_serve_validation_rejects_a_broken_config(case):
    mutate, expected = BROKEN_SERVE_CONFIGS[case]
    config = _serve_config()
    mutate(config)
    errors = serve_config_errors(yaml.safe_dump(config))
    assert errors, f"{case}: the broken serveConfigV2 passed validation"
    assert any(expected in e for e in errors), f"{case}: errors do not name {expected!r}: {errors}"


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_serve_replicas_fit_the_worker_pods():
    spec = the_one("RayService")["spec"]["rayClusterConfig"]
    pods = []  # (cpus, gpus) of a worker pod of each group
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pods.append((_cpus(limits["cpu"]), int(limits.get("nvidia.com/gpu", 0))))
    gpu_demand = 0
    for dep in _serve_config()["applications"][0]["deployments"]:
        options = dep["ray_actor_options"]
        cpus, gpus = options.get("num_cpus", 1), options.get("num_gpus", 0)
        assert any(cpus <= c and gpus <= g for c, g in pods), f"{dep['name']}: no worker pod fits {options}"
        gpu_demand += gpus * dep["autoscaling_config"]["max_replicas"]
    capacity = _gpu_capacity(spec)
    assert gpu_demand <= capacity, f"Serve may ask for {gpu_demand} GPUs, the GPU groups hold {capacity}"


def test_serve_import_path_names_a_build_app_factory():
    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    path = REPO / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{path.relative_to(REPO)} (the RayService's import_path) is missing"
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    assert attr in names, f"{path.relative_to(REPO)} defines no {attr}"


# =========================================================================== tests: MLflow


def test_deployments_services_and_secrets_fit_together():
    errors = workload_errors([doc for _, doc in MANIFESTS])
    assert not errors, "\n".join(errors)


BROKEN_WORKLOADS = {
    "service-selects-nothing": lambda docs: next(d for d in docs if d["kind"] == "Service")["spec"].update(
        selector={"app.kubernetes.io/name": "mlflw"}),
    "deployment-selector-mismatch": lambda docs: next(d for d in docs if d["kind"] == "Deployment")["spec"][
        "selector"]["matchLabels"].update({"app.kubernetes.io/name": "other"}),
    "unknown-target-port": lambda docs: next(d for d in docs if d["kind"] == "Service")["spec"]["ports"][0].update(
        targetPort="web"),
    "secret-key-missing": lambda docs: next(d for d in docs if d["kind"] == "Secret"
                                            and d["metadata"]["name"] == "bitllava-mlflow-db")["stringData"].clear(),
    "objectstore-secret-missing": lambda docs: docs.remove(next(
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "bitllava-objectstore")),
}


@pytest.mark.parametrize("case", sorted(BROKEN_WORKLOADS))
def test_workload_checks_reject_broken_references(case):
    docs = copy.deepcopy([doc for _, doc in MANIFESTS])
    BROKEN_WORKLOADS[case](docs)
    assert workload_errors(docs), f"{case}: the broken manifests passed"


def test_mlflow_server_uses_postgres_and_s3():
    [container] = the_one("Deployment")["spec"]["template"]["spec"]["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[:2] == ["mlflow", "server"], command
    flags = dict(a.split("=", 1) for a in command if a.startswith("--") and "=" in a)
    env = {e["name"]: e for e in container.get("env", [])}
    backend = re.fullmatch(r"\$\((\w+)\)", flags.get("--backend-store-uri", ""))
    assert backend, "--backend-store-uri should come from an environment variable ($(VAR))"
    ref = env[backend.group(1)]["valueFrom"]["secretKeyRef"]
    [db_secret] = [d for d in of_kind("Secret") if d["metadata"]["name"] == ref["name"]]
    assert urlparse(db_secret["stringData"][ref["key"]]).scheme.startswith("postgresql")
    artifacts = flags.get("--artifacts-destination") or flags.get("--default-artifact-root", "")
    assert artifacts.startswith("s3://"), f"artifacts go to {artifacts!r}, not S3"
    refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    assert "bitllava-objectstore" in refs, "the MLflow server needs the object-store credentials"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert flags.get("--port") == str(ports["http"]) and flags.get("--host") == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
