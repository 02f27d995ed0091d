"""The `bitllava` command line. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import os
import traceback
import json
import sys


def _cmd_model_info(args) -> int:
    from model.presets import describe

    info = describe(args.preset)
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def _cmd_generate(args) -> int:
    from PIL import Image

    from components import paths
    from model.chat import generate_reply
    from model.loading import load_any_model

    images = []
    for path in args.image:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    loaded = load_any_model(paths.model_ref(args.model))
    reply = generate_reply(
        loaded,
        args.prompt,
        images,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps({"text": reply.text, "token_ids": reply.token_ids}))
    else:
        print(reply.text)
    return 0


def _cmd_demo(args) -> int:
    if args.model_only:
        from pipelines.demo import run_model_demo

        summary = run_model_demo(out_dir=args.out or "demo_out", steps=args.steps, seed=args.seed)
        print(json.dumps(summary))
        return 0 if summary["learned"] else 1
    from pipelines.demo import DEMO_CONFIG, run_pipeline_demo

    summary = run_pipeline_demo(args.config or DEMO_CONFIG, out=args.out, address=args.address)
    print(json.dumps(summary))
    return 0


def _cmd_eval_score(args) -> int:
    from components.evaluate.scoring import score_files

    metrics = score_files(args.task, args.predictions, args.annotations, args.questions, args.allow_partial,
                          ocr=args.ocr, test_questions=args.test_questions, protocol=args.protocol)
    print(json.dumps(metrics))
    return 0


def _cmd_eval_run(args) -> int:
    from dataclasses import fields

    from components.evaluate.run import EvalConfig, run_eval

    config = EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})
    print(json.dumps(run_eval(config)))
    return 0


def _add_eval_parsers(sub) -> None:
    from components.evaluate.tasks import TASKS

    tasks = tuple(TASKS)
    per_task = "; ".join(f"{name}: {task.files}" for name, task in TASKS.items())
    group = sub.add_parser("eval", help="evaluate on " + ", ".join(tasks) + " (LLaVA-1.5's protocols)").add_subparsers(
        dest="eval_command", required=True)

    def add_files(parser, annotations_required: bool) -> None:
        parser.add_argument("--task", required=True, choices=tasks)
        parser.add_argument("--annotations", nargs="+", required=annotations_required,
                            default=None if annotations_required else [],
                            help="the task's ground-truth files in their published layout. " + per_task)
        parser.add_argument("--questions", default=None,
                            help="question file: VQAv2 v2_OpenEnded_mscoco_*_questions.json or LLaVA's "
                                 "llava_vqav2_mscoco_test-dev2015.jsonl; LLaVA's question lines for POPE, TextVQA, GQA")
        parser.add_argument("--ocr", default=None, help="TextVQA: TextVQA_Rosetta_OCR_v0.2_val.json (LLaVA-1.5 prompt)")
        parser.add_argument("--test-questions", default=None,
                            help="VQAv2 test-dev: the full test2015 list, so the EvalAI submission names every id")
        parser.add_argument("--protocol", default=None,
                            help="TextVQA: ocr (default: LLaVA-1.5's OCR-token prompt) or no-ocr")

    score = group.add_parser("score", help="score a result file in the official format; prints one JSON object")
    add_files(score, annotations_required=True)
    score.add_argument("--predictions", required=True,
                       help="the result file (or folder) as `eval run` writes it, per task: " + "; ".join(
                           f"{name}: {task.prediction_file}" for name, task in TASKS.items()))
    score.add_argument("--allow-partial", action="store_true",
                       help="score the answered questions when some have no prediction (coverage is reported)")
    score.set_defaults(func=_cmd_eval_score)

    run = group.add_parser("run", help="batch inference with Ray Data, official result files, scoring, MLflow logging")
    add_files(run, annotations_required=False)
    run.add_argument("--model", required=True, help="checkpoint folder, hub id or packed model folder")
    run.add_argument("--images", default=None,
                     help="image folder, local or s3://bucket/prefix (" + "; ".join(
                         f"{name}: {task.images or 'embedded, none'}" for name, task in TASKS.items()) + ")")
    run.add_argument("--out", dest="out_dir", required=True, help="output folder")
    run.add_argument("--limit", type=int, default=None,
                     help="first N questions of each split only (MME image pairs and MMBench circular groups count once)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--num-actors", type=int, default=1, help="model replicas (Ray actors)")
    run.add_argument("--cpus-per-actor", type=int, default=1)
    run.add_argument("--max-new-tokens", type=int, default=16)
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="auto: bf16 on a GPU or a CPU with native bf16 (avx512_bf16, amx_bf16), else float32")
    run.add_argument("--address", dest="ray_address", default=None, help="Ray cluster address (default: local)")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    run.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in --out)")
    run.add_argument("--experiment", default="bitllava-eval", help="MLflow experiment")
    run.add_argument("--mlflow-parent-run-id", default=None, help="nest the run under this MLflow run")
    run.add_argument("--run-name", default=None, help="MLflow run name (default eval-<task>)")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(func=_cmd_eval_run)


def _cmd_pack(args) -> int:
    from components.pack import PackConfig, run_pack

    if args.out is None and args.out_flag is None:  # `pack OUT --preset NAME`: the one positional is OUT
        args.checkpoint, args.out = None, args.checkpoint
    checkpoint = _one_of(args.model, args.checkpoint, "the model to pack (--model)")
    out = _one_of(args.out_flag, args.out, "the packed folder to write (--out)")
    if out is None:
        raise ValueError("give the packed folder to write: --out FOLDER")
    config = PackConfig(out=out, checkpoint=checkpoint, preset=args.preset, format=args.format,
                        seed=args.seed, llm_only=args.llm_only, overwrite=args.overwrite)
    print(json.dumps(run_pack(config)))
    return 0


def _one_of(flag, positional, what: str):
    if flag is not None and positional is not None and flag != positional:
        raise ValueError(f"{what} given twice: {flag!r} and {positional!r}")
    return flag if flag is not None else positional


def _add_pack_parser(sub) -> None:
    pack = sub.add_parser("pack", help="pack BitLinear weights to 2-bit / 1.6-bit ternary codes (safetensors folder)")
    pack.add_argument("--model", default=None,
                      help="model folder or hub id (this project's layout or published OLMo-Bitnet-1B)")
    pack.add_argument("--out", dest="out_flag", default=None, help="packed model folder to write")
    pack.add_argument("checkpoint", nargs="?", default=None, help=argparse.SUPPRESS)  # older form: pack CKPT OUT
    pack.add_argument("out", nargs="?", default=None, help=argparse.SUPPRESS)
    pack.add_argument("--format", choices=["2bit", "1.6bit"], default="2bit",
                      help="2bit: 4 codes per byte; 1.6bit: 5 codes per byte (base 3)")
    pack.add_argument("--preset", default=None, help="pack a preset (tiny, 1b) with random weights instead")
    pack.add_argument("--seed", type=int, default=0, help="seed of the random weights (--preset)")
    pack.add_argument("--llm-only", action="store_true", help="with --preset: only the language model")
    pack.add_argument("--overwrite", action="store_true", help="replace OUT when it is a packed model folder")
    pack.set_defaults(func=_cmd_pack)


def _cmd_model_init(args) -> int:
    from model.assemble import init_model
    from model.checkpoint import save_model
    from components import paths
    from model.presets import count_parameters

    out = paths.local_path(args.out)
    model, tokenizer, processor = init_model(args.preset, seed=args.seed, vision=paths.model_ref(args.vision),
                                             llm=paths.model_ref(args.llm), qk_norm=args.qk_norm)
    save_model(out, model, tokenizer, processor)
    print(json.dumps({"model_dir": out, "preset": args.preset, "backbone": model.config.text_config.model_type,
                      "vision_tower": model.config.vision_config.model_type,
                      "image_tokens": model.config.num_image_tokens, **count_parameters(model)}))
    return 0


def _cmd_model_import_llava(args) -> int:
    from components import paths
    from model.checkpoint import save_model
    from model.llava_import import import_llava_olmo_bitnet
    from model.presets import count_parameters

    out = paths.local_path(args.out)
    model, tokenizer, processor = import_llava_olmo_bitnet(paths.model_ref(args.source))
    save_model(out, model, tokenizer, processor)
    print(json.dumps({"model_dir": out, "source": args.source, **count_parameters(model)}))
    return 0


def _cmd_data_synth(args) -> int:
    from components import paths
    from components.data.synth import SynthConfig, synthesize

    summary = synthesize(SynthConfig(out=paths.local_path(args.out), records=args.records, eval=args.eval, corrupt=args.corrupt,
                                     seed=args.seed, cc_images=args.cc_images,
                                     instruct_images=args.instruct_images))
    print(json.dumps({"out": args.out, "cc595k_records": summary["cc595k"]["records"],
                      "instruct_records": summary["instruct"]["records"],
                      "bad_records": len(summary["cc595k"]["bad"]) + len(summary["instruct"]["bad"])}))
    return 0


def _cmd_data_preprocess(args) -> int:
    from components.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        source=args.source, json=args.json, images=args.images, out=args.out, phase=args.phase, encode=args.encode,
        model=args.model, preset=args.preset, max_length=args.max_length, shard_records=args.shard_records,
        max_image_pixels=args.max_image_pixels, encoder_actors=(args.min_encoders, args.max_encoders),
        s3_endpoint=args.s3_endpoint,
    )
    manifest = preprocess(config, address=args.address)
    print(json.dumps({"out": config.out, **manifest["counts"], "parts": len(manifest["parts"]),
                      "content_hash": manifest["content_hash"]}))
    return 0


def _add_data_parsers(sub) -> None:
    group = sub.add_parser("data", help="generate datasets and preprocess them into sharded stores").add_subparsers(
        dest="data_command", required=True)
    synth = group.add_parser("synth", help="write generated datasets in the published CC-595K / Instruct / eval layouts")
    synth.add_argument("--out", required=True)
    synth.add_argument("--records", type=int, default=200, help="caption records (instruct gets about as many)")
    synth.add_argument("--eval", type=int, default=60, help="questions per evaluation set")
    synth.add_argument("--corrupt", type=int, default=0, help="bad records of every kind added to each training set")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--cc-images", choices=["zip", "folder"], default="zip")
    synth.add_argument("--instruct-images", type=int, default=None,
                       help="distinct instruct images, two conversations each (default records / 2)")
    synth.set_defaults(func=_cmd_data_synth)

    pre = group.add_parser("preprocess", help="Ray Data: JSON + images -> Parquet parts + manifest.json")
    pre.add_argument("--source", required=True, help="cc595k or instruct")
    pre.add_argument("--json", required=True, help="the dataset's JSON array (path or s3:// URI)")
    pre.add_argument("--images", required=True, help="image folder, .zip or s3:// prefix")
    pre.add_argument("--out", required=True, help="store folder or s3:// URI")
    pre.add_argument("--phase", required=True, help="align (plain template) or instruct (v1 template)")
    pre.add_argument("--encode", default="pixels", help="pixels or features (the frozen tower's patch features)")
    pre.add_argument("--model", default=None, help="base model folder (bitllava model init); needed for features")
    pre.add_argument("--preset", default="tiny", help="tokenizer/image processor preset when --model is absent")
    pre.add_argument("--max-length", type=int, default=None)
    pre.add_argument("--shard-records", type=int, default=256)
    pre.add_argument("--max-image-pixels", type=int, default=25_000_000)
    pre.add_argument("--min-encoders", type=int, default=1)
    pre.add_argument("--max-encoders", type=int, default=2)
    pre.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    pre.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    pre.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    pre.set_defaults(func=_cmd_data_preprocess)


def _cmd_train(args) -> int:
    from components.train.config import load_train_config
    from components.train.run import run_training

    cfg = load_train_config(args.config, phase=args.phase, data=args.data, out=args.out, init=args.init,
                            workers=args.workers, zero_stage=args.zero_stage, max_steps=args.max_steps,
                            use_gpu=args.use_gpu or None, gradient_checkpointing=args.gradient_checkpointing or None,
                            parent_run_id=args.parent_run_id, experiment=args.experiment,
                            tune_projector=args.tune_projector, tune_llm=args.tune_llm, tune_vision=args.tune_vision,
                            tune_vision_from_layer=args.tune_vision_from_layer)
    print(json.dumps(run_training(cfg, address=args.address)))
    return 0


def _cmd_runs_compare(args) -> int:
    from components import paths
    from components.compare import compare_runs, format_csv, format_text, to_json

    if args.width < 40:
        raise ValueError(f"--width must be at least 40 columns, got {args.width}")
    report = compare_runs(args.run_ids, experiment=args.experiment, tracking_uri=paths.tracking_uri(args.tracking_uri),
                          png=args.png, all_params=args.all_params)
    if args.json:
        print(json.dumps(to_json(report), indent=1))
    elif args.csv:
        print(format_csv(report), end="")
    else:
        print(format_text(report, width=args.width, png=report["png"], curves=report["curves"]))
    return 0


def _cmd_runs_replay(args) -> int:
    from components import paths
    from components.tracking_outbox import replay

    print(json.dumps(replay(args.file, tracking_uri=paths.tracking_uri(args.tracking_uri))))
    return 0


def _add_train_parsers(sub) -> None:
    train = sub.add_parser("train", help="one training phase with Ray Train + DeepSpeed, tracked in MLflow")
    train.add_argument("--phase", default=None, help="align (projector) or instruct (projector + LLM)")
    train.add_argument("--data", default=None, help="sample store URI (bitllava data preprocess)")
    train.add_argument("--out", default=None, help="run folder or s3:// URI")
    train.add_argument("--config", default=None, help="YAML of TrainConfig fields (flags override it)")
    train.add_argument("--init", default=None, help="model folder to start from")
    train.add_argument("--workers", type=int, default=None)
    train.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage (2 or 3)")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--use-gpu", action="store_true")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--parent-run-id", default=None, help="MLflow run to nest this phase under")
    train.add_argument("--experiment", default=None, help="MLflow experiment")
    train.add_argument("--tune-projector", default=None, choices=["full", "frozen"], help="default full")
    train.add_argument("--tune-llm", default=None, choices=["full", "frozen"],
                       help="default: frozen for align, full for instruct")
    train.add_argument("--tune-vision", default=None, choices=["frozen", "full", "partial"],
                       help="default frozen; a trained tower needs a pixels store")
    train.add_argument("--tune-vision-from-layer", type=int, default=None,
                       help="first trained tower layer of --tune-vision partial")
    train.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    train.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    train.set_defaults(func=_cmd_train)

    runs = sub.add_parser("runs", help="MLflow runs").add_subparsers(dest="runs_command", required=True)
    from components.compare import DEFAULT_WIDTH  # stdlib imports only

    compare = runs.add_parser("compare", help="pipeline runs with each eval task's headline metric next to the "
                                                 "published numbers, training runs with the parameters that differ, "
                                                 "+ loss-curve PNG")
    compare.add_argument("run_ids", nargs="*", help="run ids, each with its nested runs (default: every run of the "
                                                    "experiment)")
    compare.add_argument("--experiment", default="bitllava")
    compare.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    compare.add_argument("--png", default="runs_compare.png", help="where to write the overlaid loss curves")
    compare.add_argument("--all-params", action="store_true", help="also every parameter of every run")
    machine = compare.add_mutually_exclusive_group()
    machine.add_argument("--json", action="store_true", help="print the comparison as JSON")
    machine.add_argument("--csv", action="store_true", help="print one CSV row per run (and published reference)")
    compare.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="widest line of the tables (columns)")
    compare.set_defaults(func=_cmd_runs_compare)
    replay = runs.add_parser("replay", help="send the metrics, params, tags and final status a run could not log "
                                            "(the tracking server was away) from the file it left")
    replay.add_argument("file", help="the .jsonl file named in the run's log (<out>/mlflow-unsent/<run id>.jsonl)")
    replay.add_argument("--tracking-uri", default=None, help="default: the server the run used (named in the file)")
    replay.set_defaults(func=_cmd_runs_replay)


def _cmd_run(args) -> int:
    from pipelines.config import load_pipeline_config
    from pipelines.run import plan, run_pipeline

    cfg = load_pipeline_config(args.config, out=args.out)
    if args.dry_run:
        print(json.dumps(plan(cfg), indent=1))
        return 0
    summary = run_pipeline(cfg, address=args.address, until=args.until)
    if args.until:
        print(json.dumps(summary, default=str))
        return 0
    print(f"MLflow UI: mlflow ui --backend-store-uri {summary['tracking_uri']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _cmd_kfp_compile(args) -> int:
    from pipelines.kfp_pipeline import compile_pipeline

    print(compile_pipeline(args.config, args.output))
    return 0


def _cmd_submit(args) -> int:
    from pipelines.submit import submit

    print(json.dumps(submit(args.config, args.address, out=args.out, dry_run=args.dry_run, until=args.until)))
    return 0


def _cmd_status(args) -> int:
    from pipelines.submit import job_status

    print(json.dumps(job_status(args.job_id, args.address)))
    return 0


def _cmd_logs(args) -> int:
    from pipelines.submit import job_logs

    job_logs(args.job_id, args.address, follow=args.follow)
    return 0


def _add_run_parsers(sub) -> None:
    run = sub.add_parser("run", help="the whole pipeline: data -> align -> instruct -> eval -> pack -> deploy")
    run.add_argument("config", help="pipeline YAML (pipelines/configs/tiny.yaml, llava-olmo-bitnet-1b.yaml)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    run.add_argument("--out", default=None, help="override the config's output root")
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    run.add_argument("--until", default=None, help="stop after this step (init, synth, preprocess-align, ...)")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(func=_cmd_run)

    kfp = sub.add_parser("kfp", help="Kubeflow Pipelines").add_subparsers(dest="kfp_command", required=True)
    compile_ = kfp.add_parser("compile", help="compile a pipeline config to a KFP v2 pipeline YAML")
    compile_.add_argument("config")
    compile_.add_argument("output")
    compile_.set_defaults(func=_cmd_kfp_compile)

    submit = sub.add_parser("submit", help="submit the pipeline to a Ray cluster through the Ray Jobs API")
    submit.add_argument("config")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--out", default=None, help="override the config's output root")
    submit.add_argument("--dry-run", action="store_true", help="the job only validates and prints the plan")
    submit.add_argument("--until", default=None, help="the job stops after this step")
    submit.set_defaults(func=_cmd_submit)
    for name, fn, text in (("status", _cmd_status, "a submitted job's status"),
                           ("logs", _cmd_logs, "a submitted job's logs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=fn)


def _cmd_serve(args) -> int:
    from serve.app import run_serve

    model = _one_of(args.model, args.model_positional, "the packed model (--model)")
    run_serve(model, config_path=args.config, address=args.address, host=args.host, port=args.port)
    return 0


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible Ray Serve endpoint for a packed model (Ctrl-C stops it)")
    serve.add_argument("--model", default=None,
                       help="packed model folder (bitllava pack) or s3:// URI (default: the config's args.model)")
    serve.add_argument("model_positional", nargs="?", default=None, help=argparse.SUPPRESS)  # older: serve FOLDER
    serve.add_argument("--config", default=None,
                       help="Serve config file (default: the packaged serve/serve.yaml): args, replicas, "
                            "autoscaling_config, max_ongoing_requests, resources")
    serve.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    serve.add_argument("--host", default=None, help="HTTP host (default: the config's http_options, else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    serve.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    serve.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitllava", description="Train and serve ternary multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect model presets").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameter counts and shapes of a preset")
    info.add_argument("--preset", required=True, help="preset name: 1b, tiny or bitnet-2b-4t")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cmd_model_info)
    init = model.add_parser("init", help="write a starting model folder (random preset or pretrained parts)")
    init.add_argument("--preset", required=True,
                      help="tiny, 1b or bitnet-2b-4t: the vision tower's shape (and the LM's, without --llm)")
    init.add_argument("--out", required=True, help="model folder to write")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--vision", default=None, help="a CLIP or SigLIP vision tower, folder or hub id (its config "
                      "gives the kind, image size and patch count)")
    init.add_argument("--llm", default=None,
                      help="LM folder or hub id: OLMo-Bitnet, or a transformers Llama, Qwen2, OLMo, OLMo-2 or "
                           "BitNet folder (made ternary; the projector follows its hidden size)")
    init.add_argument("--qk-norm", action="store_true",
                      help="a fresh OLMo-Bitnet LM with Chameleon's QK-norm (per-head RMSNorm on queries and keys)")
    init.set_defaults(func=_cmd_model_init)
    imp = model.add_parser("import-llava", help="import the paper's released LlavaOLMoBitnet1B (LLaVA layout)")
    imp.add_argument("source", help="IntelLabs/LlavaOLMoBitnet1B (gated: log in first) or its downloaded folder")
    imp.add_argument("--out", required=True, help="model folder to write (this project's layout)")
    imp.set_defaults(func=_cmd_model_import_llava)

    gen = sub.add_parser("generate", help="one-shot generation from a model folder or hub id")
    gen.add_argument("--model", required=True,
                     help="model folder (bitllava checkpoint, packed folder or OLMo-Bitnet layout) or hub id")
    gen.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    gen.add_argument("--prompt", required=True, help="user text; <image> marks where images go")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')
    gen.set_defaults(func=_cmd_generate)

    demo = sub.add_parser("demo", help="the laptop demo: the whole tiny pipeline, then a summary JSON line")
    demo.add_argument("--out", default=None, help="output root (default: the config's, demo_out)")
    demo.add_argument("--config", default=None, help="pipeline YAML (default: pipelines/configs/tiny.yaml)")
    demo.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    demo.add_argument("--model-only", action="store_true",
                      help="the model path alone in one process: one image, train, save, reload, generate")
    demo.add_argument("--steps", type=int, default=60, help="--model-only: training steps")
    demo.add_argument("--seed", type=int, default=0, help="--model-only: seed")
    demo.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    demo.set_defaults(func=_cmd_demo)

    _add_run_parsers(sub)
    _add_data_parsers(sub)
    _add_train_parsers(sub)
    _add_eval_parsers(sub)
    _add_pack_parser(sub)
    _add_serve_parser(sub)
    return parser


VERBOSE_HELP = "show Ray's and DeepSpeed's INFO lines and warnings (quiet by default)"


def main(argv: list[str] | None = None) -> int:
    from components.console import quiet_console

    args = build_parser().parse_args(argv)
    quiet_console(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # ConnectionError: e.g. a spent storage retry budget
        if os.environ.get("BITLLAVA_DEBUG"):
            traceback.print_exc()
        print(f"bitllava: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
