"""The pipeline as Kubeflow Pipelines v2: one component per step, each running the project's image.

Every task runs `pipelines.run.run_pipeline(config, until=<its step>)`: the steps before it are
already done (their markers match) and are skipped, so each task does exactly its own step, and
its Ray work runs on the cluster given by `ray_address` (a RayCluster's `ray://` client address or,
inside a KubeRay RayJob, `auto`). Empty `ray_address` starts a local Ray, which is what
`kfp.local.SubprocessRunner` runs use.

    bitllava kfp compile pipelines/configs/tiny.yaml tiny-pipeline.yaml
"""


import os

# no `from __future__ import annotations`: kfp reads the component signature types at runtime

from kfp import compiler, dsl

from pipelines.config import ROOT, load_pipeline_config
from pipelines.run import step_names

IMAGE = "ghcr.io/bitllava/bitllava:0.1.0-ray2.60.0"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pipeline_step(config: str, step: str, ray_address: str, out: str) -> str:
    """Run the pipeline up to `step` (earlier steps are skipped) and return that step's result as JSON."""
    import json

    from pipelines.config import load_pipeline_config
    from pipelines.run import run_pipeline

    cfg = load_pipeline_config(config, out=out or None)
    summary = run_pipeline(cfg, address=ray_address or None, until=step)
    # stopped after `step`: the steps' results; the last step (deploy) returns the whole summary
    results = summary["steps"] if "steps" in summary else {"deploy": summary["served"]}
    return json.dumps({k: v for k, v in results.items() if k == step or k.startswith(step)}, default=str)


def build_pipeline(config_path: str):
    """A kfp pipeline function whose tasks are this config's steps, in order."""
    cfg = load_pipeline_config(config_path)
    names = step_names(cfg)

    @dsl.pipeline(name=f"bitllava-{cfg.name}", description=f"bitllava pipeline {cfg.name}: " + " -> ".join(names))
    def bitllava_pipeline(config: str = os.path.relpath(config_path, ROOT), ray_address: str = "", out: str = ""):
        previous = None
        for name in names:
            task = pipeline_step(config=config, step=name, ray_address=ray_address, out=out)
            task.set_display_name(name)
            task.set_caching_options(False)  # the step markers decide what is already done
            if previous is not None:
                task.after(previous)
            previous = task

    return bitllava_pipeline


def compile_pipeline(config_path: str, output: str) -> str:
    compiler.Compiler().compile(build_pipeline(config_path), output)
    return output
