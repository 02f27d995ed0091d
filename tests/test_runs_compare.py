"""`bitllava runs compare` on a real MLflow store (sqlite in tmp) holding two pipeline runs of the tiny config
that differ in one training setting (instruct lr), logged with the tags, parameters and metric names the
pipeline's own code writes (components.tracking.create_run, the pipeline's nested runs, the eval run's
helpers); no training: the metrics are made up."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from components.published_scores import HEADLINES, PUBLISHED, headline
from components.compare import mlflow_ui
from components.evaluate.scoring import flatten_metrics, pope_metrics
from components.evaluate.tracking import end_run, log_results, start_run
from components.tracking import create_run
from pipelines.cli import main
from pipelines.config import EVAL_TASKS, load_pipeline_config
from pipelines.run import StepRunner

CONFIG = "pipelines/configs/tiny.yaml"
EXPERIMENT = "bitllava-demo"  # the tiny config's mlflow.experiment
LRS = (0.003, 0.001)  # instruct.lr of the two pipeline runs
# made-up scores: (POPE answers right of 4 per split, VQAv2 accuracy, TextVQA accuracy)
SCORES = ({"pope": 3, "vqav2": 41.25, "textvqa": 12.5}, {"pope": 2, "vqav2": 37.5, "textvqa": 10.0})


def _pope(right: int) -> dict:
    """score()'s shape for POPE: per split metrics and their mean."""
    labels = ["yes", "yes", "no", "no"]
    answers = labels[:right] + [("no" if y == "yes" else "yes") for y in labels[right:]]
    splits = {s: {**pope_metrics(list(zip(answers, labels))), "num_questions": 4, "num_answered": 4,
                  "coverage": 100.0} for s in ("adversarial", "popular", "random")}
    names = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    mean = {n: sum(v[n] for v in splits.values()) / 3 for n in names}
    return {"task": "pope", "splits": splits, "mean": mean, "num_questions": 12, "num_answered": 12, "coverage": 100.0}


def _log_pipeline(tracking_uri: str, out: str, lr: float, scores: dict, loss_scale: float) -> dict:
    """What `bitllava run` logs: the parent run, nested preprocess / train / eval / pack runs."""
    base = load_pipeline_config(CONFIG, out=out)
    cfg = load_pipeline_config(CONFIG, out=out, instruct={**base.instruct, "lr": lr})
    assert cfg.mlflow.experiment == EXPERIMENT
    parent = create_run(tracking_uri, EXPERIMENT, f"pipeline-{cfg.name}", params=dataclasses.asdict(cfg),
                        tags={"pipeline": cfg.name})
    steps = StepRunner(cfg, tracking_uri, parent)
    client = MlflowClient(tracking_uri)
    for phase in ("align", "instruct"):
        steps.nested_run(f"preprocess-{phase}", {"encode": cfg.preprocess.encode(phase), "shard_records": 256,
                                                 "json": f"{out}/synth/{phase}.json", "images": f"{out}/synth/img"},
                         {"samples": 100, "bad": 1})
    train_runs = {}
    for phase in ("align", "instruct"):
        tcfg = cfg.train_config(phase, data=f"{out}/stores/{phase}", out=f"{out}/{phase}", init=f"{out}/model-init",
                                tracking_uri=tracking_uri, experiment=EXPERIMENT, parent_run_id=parent,
                                run_name=f"train-{phase}")
        run_id = create_run(tracking_uri, EXPERIMENT, tcfg.run_name, parent, params=tcfg.to_dict(),
                            tags={"phase": phase, "dataset_content_hash": "abc", "dataset_uri": tcfg.data,
                                  "init": tcfg.init})
        now = int(time.time() * 1000)
        history = [Metric(k, v, now, step) for step in range(1, 11) for k, v in (
            ("loss", loss_scale * (5 - 0.3 * step)), ("lr", lr), ("grad_norm", 1.0),
            ("tokens_per_s", 1000.0 + 10 * step), ("samples_per_s", 10.0))]
        client.log_batch(run_id, metrics=history, params=[])
        client.log_param(run_id, "trainable_params", "123456")
        client.log_batch(run_id, metrics=[Metric("final_loss", loss_scale * 2.0, now, 0),
                                          Metric("final_tokens_per_s", 1100.0, now, 0)])
        client.set_terminated(run_id)
        train_runs[phase] = run_id
    metrics = {"pope": _pope(scores["pope"]),
               "vqav2": {"task": "vqav2", "accuracy": scores["vqav2"], "per_answer_type": {"yes/no": 50.0},
                         "num_questions": 8, "num_answered": 8, "coverage": 100.0},
               "textvqa": {"task": "textvqa", "accuracy": scores["textvqa"], "num_questions": 8, "num_answered": 8,
                           "coverage": 100.0}}
    eval_runs = {}
    for task in cfg.eval.tasks:
        run = start_run(tracking_uri, EXPERIMENT, f"eval-{task}", parent)
        logged = {**flatten_metrics(metrics[task], prefix=f"{task}/"), f"{task}/eval_seconds": 1.0}
        log_results(run, {"task": task, "model": f"{out}/instruct/model", "num_questions": 12}, logged, {})
        end_run(run, ok=True)
        eval_runs[task] = run.run_id
    steps.nested_run("pack", {"format": "2bit"}, {"bytes_per_weight": 0.25})
    client.set_terminated(parent)
    return {"parent": parent, "train": train_runs, "eval": eval_runs, "metrics": metrics}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(tracking_uri).create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    runs = [_log_pipeline(tracking_uri, str(root / f"out-{i}"), lr, SCORES[i], 1.0 + 0.1 * i)
            for i, lr in enumerate(LRS)]
    # and one `bitllava eval run` of a packed model on its own (no pipeline parent)
    alone = start_run(tracking_uri, EXPERIMENT, "eval-textvqa", None)
    log_results(alone, {"task": "textvqa", "model": str(root / "packed"), "num_questions": 8},
                {"textvqa/accuracy": 7.5, "textvqa/coverage": 100.0}, {})
    end_run(alone, ok=True)
    return {"uri": tracking_uri, "root": root, "runs": runs, "alone": alone.run_id}


def _compare(store, capsys, *flags: str) -> str:
    png = str(store["root"] / "compare.png")
    assert main(["runs", "compare", "--experiment", EXPERIMENT, "--tracking-uri", store["uri"], "--png", png,
                 *flags]) == 0
    return capsys.readouterr().out


def _column(header: str, label: str, line: str) -> str:
    """The text of `line` under the right-aligned column `label` of `header`."""
    end = header.index(label) + len(label)
    start = header.rfind("  ", 0, header.index(label)) + 2
    return line[start:end].strip()


def test_text_fits_160_columns_names_the_setting_and_sets_metrics_beside_published_rows(store, capsys):
    out = _compare(store, capsys)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 160
    start = next(i for i, line in enumerate(lines) if line.startswith("Pipeline runs (2)"))
    header = lines[start + 1]
    assert "instruct.lr" in header  # the one setting that differs, as a column
    for label in ("POPE F1", "VQAv2", "TextVQA"):
        assert label in header
    rows = {}
    for line in lines[start + 2:]:
        if line.startswith("pipeline-tiny"):
            rows[line.split()[1]] = line
    assert set(rows) == {r["parent"][:8] for r in store["runs"]}
    for run, lr in zip(store["runs"], LRS):
        line = rows[run["parent"][:8]]
        assert _column(header, "POPE F1", line) == f"{run['metrics']['pope']['mean']['f1']:.2f}"
        assert _column(header, "VQAv2", line) == f"{run['metrics']['vqav2']['accuracy']:.2f}"
        assert _column(header, "TextVQA", line) == f"{run['metrics']['textvqa']['accuracy']:.2f}"
        assert str(lr) in line
    for ref in PUBLISHED:  # reference rows, the same columns
        line = next(line for line in lines[start:] if line.startswith(ref.model))
        assert _column(header, "POPE F1", line) == f"{ref.scores['pope']:.2f}"
        assert _column(header, "TextVQA", line) == (f"{ref.scores['textvqa']:.2f}" if "textvqa" in ref.scores
                                                    else "-")
    assert "LLaVaOLMoBitNet1B paper, Table 2" in out
    # training runs: per phase, final loss and tokens/s; instruct differs only in lr, align in nothing
    instruct = out[out.index("Training runs, phase instruct"):]
    assert "final loss" in instruct and "tokens/s" in instruct and "lr" in instruct.splitlines()[1].split()
    assert "no parameter differs" in out[out.index("Training runs, phase align"):out.index("Training runs, phase "
                                                                                              "instruct")]
    assert "1055.0" in instruct  # median of 1010..1100
    alone = out[out.index("Evaluation runs outside a pipeline (1)"):].splitlines()
    assert alone[1].split()[:5] == ["run", "id", "task", "status", "metric"]
    assert alone[2].split()[:6] == ["eval-textvqa", store["alone"][:8], "textvqa", "FINISHED", "TextVQA", "7.50"]
    assert "Not compared: preprocess-align x2, preprocess-instruct x2, pack x2" in out
    # no parameter that differs only by location (out, data, init, tracking URI, parent ids) is shown
    for hidden in ("instruct.out", "instruct.data", "parent_run_id", "tracking_uri", "init"):
        assert hidden not in header
    ui = next(line for line in lines if line.startswith("the same runs in MLflow"))
    assert f"mlflow ui --backend-store-uri {store['uri']} --port 5000" in ui
    # 13 run ids make a compare URL wider than 160 columns: the experiment's page, and where the URL is
    assert lines[lines.index(ui) + 1] == ("  then open http://127.0.0.1:5000/#/experiments/1 (the compare view of all "
                                          "13 runs: --json's mlflow_ui.url)")
    png = store["root"] / "compare.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and "loss curves of 4 runs" in out


def test_json_holds_the_comparison(store, capsys):
    data = json.loads(_compare(store, capsys, "--json"))
    pipelines = data["pipelines"]
    assert pipelines["differing"] == ["instruct.lr"]
    by_id = {p["run_id"]: p for p in pipelines["runs"]}
    for run, lr in zip(store["runs"], LRS):
        p = by_id[run["parent"]]
        assert p["settings"] == {"instruct.lr": str(lr)}
        assert p["metrics"]["pope"] == pytest.approx(run["metrics"]["pope"]["mean"]["f1"])
        assert p["metrics"]["vqav2"] == pytest.approx(run["metrics"]["vqav2"]["accuracy"])
        assert p["eval_runs"] == run["eval"]
        assert "params" not in p
    assert [r["model"] for r in pipelines["references"]] == [r.model for r in PUBLISHED]
    assert [t["task"] for t in data["tasks"]] == ["pope", "vqav2", "textvqa"]
    training = {g["phase"]: g for g in data["training"]}
    assert training["instruct"]["differing"] == ["lr"] and training["align"]["differing"] == []
    row = training["instruct"]["runs"][0]
    assert row["steps"] == 10 and row["final_loss"] == pytest.approx(2.0) and row["tokens_per_s"] == pytest.approx(1055)
    assert "loss_curve" not in row
    assert data["counts"] == {"pipeline": 2, "train": 4, "eval": 7, "preprocess": 4, "pack": 2, "other": 0}
    assert [e["run_id"] for e in data["evals"]] == [store["alone"]]  # the others are the pipelines' own
    assert data["evals"][0]["value"] == 7.5 and data["evals"][0]["metric"] == "textvqa/accuracy"
    url = data["mlflow_ui"]["url"]
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=[%22")
    assert all(r["parent"] in url and r["train"]["instruct"] in url and r["eval"]["pope"] in url for r in store["runs"])

    full = json.loads(_compare(store, capsys, "--json", "--all-params"))
    p = full["pipelines"]["runs"][0]
    assert p["params"]["instruct.zero_stage"] == "2" and p["params"]["preset"] == "tiny"


def test_csv_one_row_per_run_and_reference(store, capsys):
    rows = list(csv.DictReader(io.StringIO(_compare(store, capsys, "--csv"))))
    kinds = [r["kind"] for r in rows]
    assert kinds.count("pipeline") == 2 and kinds.count("published") == 3 and kinds.count("train") == 4
    pipe = {r["run_id"]: r for r in rows if r["kind"] == "pipeline"}
    for run, lr in zip(store["runs"], LRS):
        r = pipe[run["parent"]]
        assert float(r["pope/mean/f1"]) == pytest.approx(run["metrics"]["pope"]["mean"]["f1"])
        assert float(r["textvqa/accuracy"]) == run["metrics"]["textvqa"]["accuracy"]
        assert r["instruct.lr"] == str(lr)
    tiny = next(r for r in rows if r["kind"] == "published" and r["name"] == "TinyLLaVA 3B")
    assert float(tiny["vqav2/accuracy"]) == 77.6
    alone = next(r for r in rows if r["kind"] == "eval")
    assert alone["run_id"] == store["alone"] and float(alone["textvqa/accuracy"]) == 7.5
    train = [r for r in rows if r["kind"] == "train" and r["group"] == "instruct"]
    assert sorted(r["lr"] for r in train) == sorted(str(lr) for lr in LRS)


def test_named_runs_bring_their_nested_runs_and_narrow_tables_name_what_they_leave_out(store, capsys):
    ids = [r["parent"] for r in store["runs"]]
    out = _compare(store, capsys, *ids, "--width", "60")
    assert "Pipeline runs (2)" in out and "Training runs, phase instruct (2)" in out
    assert "not shown in 60 columns: instruct.lr" in out
    # two runs and their training runs: MLflow's compare view of them fits a 160-column line
    train = [r["train"]["instruct"] for r in store["runs"]]
    out = _compare(store, capsys, *train)
    url = next(line for line in out.splitlines() if line.startswith("  then open"))
    assert len(url) <= 160 and all(t in url for t in train) and "#/compare-runs?runs=[" in url


def test_every_eval_task_has_a_headline_metric_among_those_it_declares():
    from components.evaluate.tasks import TASKS

    assert set(EVAL_TASKS) <= set(HEADLINES) and set(TASKS) <= set(HEADLINES)
    for name, task in TASKS.items():  # the MLflow key of one of the task's declared headline metrics
        assert HEADLINES[name].metric in {f"{name}/" + h.replace(".", "/") for h in task.headline}, name
    assert headline("newtask").metric == "newtask/accuracy"
    assert all(set(ref.scores) <= set(HEADLINES) for ref in PUBLISHED)


def test_unknown_experiment_is_a_clear_error(store, capsys):
    assert main(["runs", "compare", "--experiment", "nope", "--tracking-uri", store["uri"]]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_mlflow_ui_opens_the_compare_view_of_the_runs():
    ui = mlflow_ui("sqlite:////tmp/a b/mlflow.db", ["3"], ["r1", "r2"])
    assert ui["command"] == "mlflow ui --backend-store-uri 'sqlite:////tmp/a b/mlflow.db' --port 5000"
    assert ui["url"] == "http://127.0.0.1:5000/#/compare-runs?runs=[%22r1%22,%22r2%22]&experiments=[%223%22]"
    server = mlflow_ui("http://mlflow:5000/", ["3"], ["r1"])
    assert server["command"] is None and server["url"].startswith("http://mlflow:5000/#/compare-runs?runs=")
