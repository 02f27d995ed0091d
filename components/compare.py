"""`bitllava runs compare`: MLflow runs compared like with like, as MLflow's own compare view does, plus
one PNG overlaying the training loss curves.

Which kind a run is, read from what `bitllava run`, `train` and `eval run` log:
- pipeline: the tag `pipeline` (`bitllava run`'s parent run), or the parent (`mlflow.parentRunId`) of
  another run compared;
- train: the tag `phase`;
- eval: the parameter `task` (or the name `eval-<task>`, for a run that failed before logging it);
- preprocess / pack: the pipeline's nested runs `preprocess-<phase>` and `pack`;
- other: anything else.

Sections: pipeline runs side by side with each eval task's headline metric (components/published_scores.py)
and the published reference rows; training runs per phase with final loss, tokens/s and the parameters
that differ; evaluations outside a pipeline. "The parameters that differ" leave out run identities
(names, parent ids, tracking URIs) and locations inside each run's own output root (a pipeline's `out`),
which differ between any two runs; `all_params` lists every parameter.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import statistics
from urllib.parse import quote

from components.published_scores import HEADLINES, PUBLISHED, TABLE_2, headline

DEFAULT_WIDTH = 160
KINDS = ("pipeline", "train", "eval", "preprocess", "pack", "other")
IDENTITY_PARAMS = frozenset({"name", "out", "run_name", "parent_run_id", "tracking_uri"})
PARENT_TAG = "mlflow.parentRunId"
MAX_CELL = 24  # widest setting value shown in a table cell (the JSON and CSV hold it whole)
MAX_NAME = 28
UI_PORT = 5000


# ---------------------------------------------------------------- reading the store


def _search_all(client, experiment_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fetch_runs(client, run_ids: list[str], experiment: str, tracking_uri: str) -> list:
    """The runs named (each with its nested runs), else every run of the experiment; oldest first."""
    from mlflow.exceptions import MlflowException

    if not run_ids:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
        return _search_all(client, [exp.experiment_id])
    runs, seen = [], set()
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"no MLflow run {run_id} at {tracking_uri}") from None
        children = _search_all(client, [run.info.experiment_id], f"tags.{PARENT_TAG} = '{run_id}'")
        for r in [run, *children]:
            if r.info.run_id not in seen:
                seen.add(r.info.run_id)
                runs.append(r)
    return sorted(runs, key=lambda r: r.info.start_time or 0)


def run_name(run) -> str:
    return run.data.tags.get("mlflow.runName") or run.info.run_name or ""


def run_kind(run, parent_ids: set[str]) -> str:
    """One of KINDS, by the rules in the module docstring."""
    tags, params, name = run.data.tags, run.data.params, run_name(run)
    if "pipeline" in tags or run.info.run_id in parent_ids:
        return "pipeline"
    if "phase" in tags:
        return "train"
    if "task" in params or name.startswith("eval-"):
        return "eval"
    if name.startswith("preprocess-"):
        return "preprocess"
    if name == "pack":
        return "pack"
    return "other"


def eval_task(run) -> str:
    return run.data.params.get("task") or run_name(run).removeprefix("eval-")


# ---------------------------------------------------------------- what differs


def _inside(value: str, root: str | None) -> bool:
    if not root or not value:
        return False
    root = root.rstrip("/")
    return value == root or f"{root}/" in value


def differing_keys(settings: list[dict[str, str]], roots: list[str | None]) -> list[str]:
    """Keys whose values are not the same in every run (a missing key counts as a value), less identities
    (IDENTITY_PARAMS, also as the last part of a dotted key) and locations inside each run's own output root."""
    keys = sorted(k for k in {k for s in settings for k in s} if k.rsplit(".", 1)[-1] not in IDENTITY_PARAMS)
    out = []
    for key in keys:
        values = [s.get(key) for s in settings]
        if len(set(values)) < 2:
            continue
        present = [(v, root) for v, root in zip(values, roots) if v is not None]
        if all(_inside(v, root) for v, root in present):
            continue
        out.append(key)
    return out


def _with_commit(params: dict, run) -> dict:
    commit = run.data.tags.get("git_commit")
    return {**params, "git_commit": commit} if commit else dict(params)


# ---------------------------------------------------------------- the comparison


def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _train_row(client, run, parent) -> dict:
    metrics = run.data.metrics
    loss = _history(client, run.info.run_id, "loss")
    tokens = [m.value for m in _history(client, run.info.run_id, "tokens_per_s")]
    mfu = [m.value for m in _history(client, run.info.run_id, "mfu")] if "mfu" in metrics else []
    end, start = run.info.end_time, run.info.start_time
    return {
        "run_id": run.info.run_id, "name": run_name(run), "status": run.info.status,
        "phase": run.data.tags.get("phase"),
        "parent_run_id": run.data.tags.get(PARENT_TAG), "pipeline": run_name(parent) if parent else None,
        "steps": loss[-1].step if loss else None,
        "final_loss": metrics.get("final_loss", loss[-1].value if loss else None),
        "tokens_per_s": _median(tokens) if tokens else metrics.get("final_tokens_per_s"),
        "mfu": _median(mfu),
        "minutes": round((end - start) / 60000, 2) if end and start else None,
        "loss_curve": [(m.step, m.value) for m in loss],
    }


def _latest(runs: list):
    finished = [r for r in runs if r.info.status == "FINISHED"]
    return max(finished or runs, key=lambda r: r.info.start_time or 0)


class _Store:
    """The runs compared, their kinds, parents and nested runs."""

    def __init__(self, client, runs: list):
        from mlflow.exceptions import MlflowException

        self.client, self.runs = client, runs
        by_id = {r.info.run_id: r for r in runs}
        parent_ids = {r.data.tags[PARENT_TAG] for r in runs if PARENT_TAG in r.data.tags}
        self.kinds = {r.info.run_id: run_kind(r, parent_ids) for r in runs}
        self.parents = dict(by_id)
        for pid in parent_ids - set(by_id):  # parents of named runs, for their pipeline's name and output root
            try:
                self.parents[pid] = client.get_run(pid)
            except MlflowException:  # deleted: the child is shown without it
                pass
        self.children: dict[str | None, list] = {}
        for r in runs:
            self.children.setdefault(r.data.tags.get(PARENT_TAG), []).append(r)

    def of_kind(self, kind: str, runs: list | None = None) -> list:
        return [r for r in (self.runs if runs is None else runs) if self.kinds[r.info.run_id] == kind]

    def parent(self, run):
        return self.parents.get(run.data.tags.get(PARENT_TAG))

    def root(self, run) -> str | None:
        """The output root of the run's pipeline, else the run's own `out`."""
        return (self.parent(run) or run).data.params.get("out")


def _pipelines(store: _Store, all_params: bool) -> tuple[dict, list[str]]:
    """Pipeline runs with each task's headline metric (from their nested eval runs) and the settings that
    differ: their own parameters plus their training runs' as `<phase>.<key>`; and the tasks, in order."""
    rows, tasks = [], []
    for p in store.of_kind("pipeline"):
        kids = store.children.get(p.info.run_id, [])
        settings, losses = _with_commit(p.data.params, p), {}
        trains: dict[str, list] = {}
        for t in store.of_kind("train", kids):
            trains.setdefault(t.data.tags["phase"], []).append(t)
        for phase, group in sorted(trains.items()):
            t = _latest(group)
            settings.update({f"{phase}.{k}": v for k, v in t.data.params.items()})
            losses[phase] = t.data.metrics.get("final_loss", t.data.metrics.get("loss"))
        evals: dict[str, list] = {}
        for e in store.of_kind("eval", kids):
            evals.setdefault(eval_task(e), []).append(e)
        latest = {task: _latest(group) for task, group in evals.items()}
        tasks += [t for t in latest if t not in tasks]
        rows.append({"run_id": p.info.run_id, "name": run_name(p), "status": p.info.status, "nested_runs": len(kids),
                     "final_loss": losses,
                     "metrics": {t: e.data.metrics.get(headline(t).metric) for t, e in latest.items()},
                     "eval_runs": {t: e.info.run_id for t, e in latest.items()}, "params": settings})
    order = list(HEADLINES)
    tasks.sort(key=lambda t: (order.index(t) if t in order else len(order), t))
    if rows and not tasks:
        tasks = [t for t in order if any(t in ref.scores for ref in PUBLISHED)]
    differing = differing_keys([r["params"] for r in rows], [r["params"].get("out") for r in rows])
    for r in rows:
        r["settings"] = {k: r["params"].get(k) for k in differing}
        if not all_params:
            del r["params"]
    references = [{"model": ref.model, "params": ref.params, "source": ref.source,
                   "scores": {t: ref.scores[t] for t in tasks if t in ref.scores}}
                  for ref in PUBLISHED if any(t in ref.scores for t in tasks)] if rows else []
    return {"differing": differing, "runs": rows, "references": references}, tasks


def _training(store: _Store, all_params: bool) -> list[dict]:
    """Training runs, one group per phase, with the parameters that differ within the group."""
    out = []
    train = store.of_kind("train")
    for phase in sorted({r.data.tags["phase"] for r in train}):
        group = [r for r in train if r.data.tags["phase"] == phase]
        params = [_with_commit(r.data.params, r) for r in group]
        keys = differing_keys(params, [store.root(r) for r in group])
        rows = []
        for r, p in zip(group, params):
            row = _train_row(store.client, r, store.parent(r))
            row["settings"] = {k: p.get(k) for k in keys}
            if all_params:
                row["params"] = p
            rows.append(row)
        out.append({"phase": phase, "differing": keys, "runs": rows})
    return out


def _evals(store: _Store, pipeline_ids: set[str], all_params: bool) -> list[dict]:
    """Evaluation runs not nested in a pipeline run compared, each with its task's headline metric."""
    rows = []
    for e in store.of_kind("eval"):
        if e.data.tags.get(PARENT_TAG) in pipeline_ids:
            continue
        task = eval_task(e)
        h = headline(task)
        rows.append({"run_id": e.info.run_id, "name": run_name(e), "status": e.info.status, "task": task,
                     "metric": h.metric, "label": h.label, "value": e.data.metrics.get(h.metric),
                     "num_questions": e.data.params.get("num_questions"), "model": e.data.params.get("model"),
                     "parent_run_id": e.data.tags.get(PARENT_TAG),
                     **({"params": dict(e.data.params)} if all_params else {})})
    return rows


def build_comparison(client, runs: list, tracking_uri: str, all_params: bool = False) -> dict:
    """Everything `runs compare` shows, as plain data (what `--json` prints, with the loss curves' points)."""
    store = _Store(client, runs)
    pipelines, tasks = _pipelines(store, all_params)
    evals = _evals(store, {p["run_id"] for p in pipelines["runs"]}, all_params)
    others = [{"run_id": r.info.run_id, "name": run_name(r), "kind": k, "status": r.info.status,
               "parent_run_id": r.data.tags.get(PARENT_TAG), **({"params": dict(r.data.params)} if all_params else {})}
              for k in ("preprocess", "pack", "other") for r in store.of_kind(k)]
    experiments = sorted({r.info.experiment_id for r in runs})
    shown = [r.info.run_id for r in runs if store.kinds[r.info.run_id] in ("pipeline", "train", "eval")]
    return {
        "tracking_uri": tracking_uri,
        "experiment_ids": experiments,
        "counts": {k: len(store.of_kind(k)) for k in KINDS},
        "tasks": [{"task": t, "metric": headline(t).metric, "label": headline(t).label,
                   "meaning": headline(t).meaning} for t in tasks],
        "pipelines": pipelines,
        "training": _training(store, all_params),
        "evals": evals,
        "others": others,
        "mlflow_ui": mlflow_ui(tracking_uri, experiments, shown),
    }


def mlflow_ui(tracking_uri: str, experiment_ids: list[str], run_ids: list[str]) -> dict:
    """The command that serves this store (none for a server), the URL of MLflow's compare view of these
    runs (the route its UI builds: `#/compare-runs?runs=[ids]&experiments=[ids]`), and of the experiment."""
    def ids(values: list[str]) -> str:  # JSON as the UI writes it, its quotes escaped (they end links in terminals)
        return quote(json.dumps(values, separators=(",", ":")), safe="[],")

    route = f"#/compare-runs?runs={ids(run_ids)}&experiments={ids(experiment_ids)}"
    if tracking_uri.startswith(("http://", "https://")):
        command, base = None, tracking_uri.rstrip("/")
    else:
        command, base = (f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port {UI_PORT}",
                         f"http://127.0.0.1:{UI_PORT}")
    return {"command": command, "url": f"{base}/{route}", "runs": len(run_ids),
            "experiment_url": f"{base}/#/experiments/{experiment_ids[0]}" if experiment_ids else base}


# ---------------------------------------------------------------- text


def _short(value, limit: int = MAX_CELL) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


class Table:
    """Columns of text cells; `droppable` columns go (last first) when the table is wider than allowed."""

    def __init__(self):
        self.columns: list[dict] = []

    def add(self, header: str, cells: list[str], right: bool = False, droppable: bool = False) -> None:
        self.columns.append({"header": header, "cells": cells, "right": right, "droppable": droppable})

    def render(self, width: int, rule_before: int | None = None) -> tuple[list[str], list[str]]:
        """Lines (a rule before row `rule_before` when given) and the headers dropped to fit `width`."""
        columns, dropped = list(self.columns), []

        def widths(cols: list[dict]) -> list[int]:
            return [max(len(c["header"]), *(len(x) for x in c["cells"])) for c in cols]

        while sum(widths(columns)) + 2 * (len(columns) - 1) > width and any(c["droppable"] for c in columns):
            last = max(i for i, c in enumerate(columns) if c["droppable"])
            dropped.insert(0, columns.pop(last)["header"])
        ws = widths(columns)

        def line(cells):
            return "  ".join(x.rjust(w) if c["right"] else x.ljust(w) for x, w, c in zip(cells, ws, columns)).rstrip()

        rows = list(zip(*(c["cells"] for c in columns)))
        lines = [line([c["header"] for c in columns])]
        for i, row in enumerate(rows):
            if i == rule_before:
                lines.append("-" * (sum(ws) + 2 * (len(ws) - 1)))
            lines.append(line(row))
        return lines, dropped


def _dropped_note(dropped: list[str], width: int) -> list[str]:
    return [f"  not shown in {width} columns: {', '.join(dropped)} (see --width or --json)"] if dropped else []


def _pipeline_section(cmp: dict, width: int) -> list[str]:
    section = cmp["pipelines"]
    runs, refs, tasks = section["runs"], section["references"], cmp["tasks"]
    phases = sorted({ph for p in runs for ph in p["final_loss"]})
    out = [f"Pipeline runs ({len(runs)}): each eval task's headline metric, and the settings that differ"]
    table = Table()
    table.add("run", [_short(p["name"], MAX_NAME) for p in runs] + [r["model"] for r in refs])
    table.add("id", [p["run_id"][:8] for p in runs] + [""] * len(refs))
    table.add("status", [p["status"] for p in runs] + ["published"] * len(refs))
    for t in tasks:
        table.add(t["label"], [_num(p["metrics"].get(t["task"])) for p in runs]
                  + [_num(r["scores"].get(t["task"])) for r in refs], right=True)
    for ph in phases:
        table.add(f"{ph} loss", [_num(p["final_loss"].get(ph), 4) for p in runs] + [""] * len(refs), right=True)
    for key in section["differing"]:
        table.add(key, [_short(p["settings"].get(key)) for p in runs] + [""] * len(refs), droppable=True)
    lines, dropped = table.render(width, rule_before=len(runs) if refs else None)
    out += lines + _dropped_note(dropped, width)
    if len(runs) > 1 and not section["differing"]:
        out.append("  no setting differs between these pipeline runs")
    for p in runs:
        if not p["nested_runs"]:
            out.append(f"  {p['name']} {p['run_id'][:8]}: no nested runs (its steps were up to date and skipped, "
                       f"or it stopped before them)")
    for t in tasks:
        out.append(f"  {t['label']}: {t['meaning']} (MLflow metric {t['metric']} of the run eval-{t['task']})")
    if refs:
        out.append(f"  published rows: {TABLE_2} (LLaVA-1.5's evaluation protocol); '-': not reported")
    return out


def _training_section(group: dict, width: int) -> list[str]:
    runs = group["runs"]
    out = [f"Training runs, phase {group['phase']} ({len(runs)}): final loss, tokens/s and the parameters that differ"]
    table = Table()
    table.add("run", [_short(r["name"], MAX_NAME) for r in runs])
    table.add("id", [r["run_id"][:8] for r in runs])
    if any(r["pipeline"] for r in runs):
        table.add("pipeline", [_short(f"{r['pipeline']} {r['parent_run_id'][:8]}" if r["pipeline"] else None,
                                      MAX_NAME) for r in runs])
    table.add("status", [r["status"] for r in runs])
    table.add("steps", ["-" if r["steps"] is None else str(r["steps"]) for r in runs], right=True)
    table.add("final loss", [_num(r["final_loss"], 4) for r in runs], right=True)
    table.add("tokens/s", [_num(r["tokens_per_s"], 1) for r in runs], right=True)
    if any(r["mfu"] is not None for r in runs):
        table.add("MFU", ["-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%" for r in runs], right=True)
    table.add("minutes", [_num(r["minutes"], 1) for r in runs], right=True)
    for key in group["differing"]:
        table.add(key, [_short(r["settings"].get(key)) for r in runs], droppable=True)
    lines, dropped = table.render(width)
    out += lines + _dropped_note(dropped, width)
    out.append("  final loss: the last logged step's; tokens/s (all workers) and MFU: medians over the logged steps")
    if len(runs) > 1 and not group["differing"]:
        out.append("  no parameter differs between these runs")
    return out


def _eval_section(evals: list[dict], width: int) -> list[str]:
    table = Table()
    table.add("run", [_short(e["name"], MAX_NAME) for e in evals])
    table.add("id", [e["run_id"][:8] for e in evals])
    table.add("task", [e["task"] for e in evals])
    table.add("status", [e["status"] for e in evals])
    table.add("metric", [e["label"] for e in evals])
    table.add("value", [_num(e["value"]) for e in evals], right=True)
    table.add("questions", [e["num_questions"] or "-" for e in evals], right=True)
    table.add("model", [_short(e["model"], 60) for e in evals], droppable=True)
    lines, dropped = table.render(width)
    return [f"Evaluation runs outside a pipeline ({len(evals)}): each task's headline metric"] + lines + \
        _dropped_note(dropped, width)


def _all_params_section(title: str, rows: list[dict]) -> list[str]:
    """Parameters down, runs across (MLflow's compare view); `*` marks the parameters whose values differ."""
    keys = sorted({k for r in rows for k in r["params"]})
    table = Table()
    table.add("", ["*" if len({r["params"].get(k) for r in rows}) > 1 else "" for k in keys])
    table.add("parameter", keys)
    for r in rows:
        table.add(f"{_short(r['name'], MAX_NAME)} {r['run_id'][:8]}", [_short(r["params"].get(k), 40) for k in keys])
    lines, _ = table.render(width=10**6)
    return [f"All parameters: {title} (* differs)"] + lines


def format_text(cmp: dict, width: int = DEFAULT_WIDTH, png: str | None = None, curves: int = 0) -> str:
    counts = cmp["counts"]
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    total = sum(counts.values())
    out = [f"MLflow {cmp['tracking_uri']}: {total} run{'s' if total != 1 else ''} ({summary})"]
    sections = []
    if cmp["pipelines"]["runs"]:
        sections.append(_pipeline_section(cmp, width))
    sections += [_training_section(g, width) for g in cmp["training"]]
    if cmp["evals"]:
        sections.append(_eval_section(cmp["evals"], width))
    if cmp["others"]:
        names: dict[str, int] = {}
        for o in cmp["others"]:
            names[o["name"]] = names.get(o["name"], 0) + 1
        sections.append(["Not compared: " + ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.items())
                         + " (--all-params lists their parameters)"])
    with_params = [("pipeline runs (with their training runs' as <phase>.<key>)", cmp["pipelines"]["runs"])]
    with_params += [(f"training runs, phase {g['phase']}", g["runs"]) for g in cmp["training"]]
    with_params.append(("evaluation runs outside a pipeline", cmp["evals"]))
    for name in dict.fromkeys(o["name"] for o in cmp["others"]):  # like with like: one table per run name
        with_params.append((f"{name} runs", [o for o in cmp["others"] if o["name"] == name]))
    sections += [_all_params_section(title, rows) for title, rows in with_params if rows and "params" in rows[0]]
    for s in sections:
        out += [""] + s
    out.append("")
    if png:
        out.append(f"loss curves of {curves} run{'s' if curves != 1 else ''}: {png}")
    ui = cmp["mlflow_ui"]
    out.append(f"the same runs in MLflow: {ui['command'] or 'the server ' + cmp['tracking_uri']}")
    # a URL is one line: when the compare view's (one id per run) is too long, the experiment's
    url = f"  then open {ui['url']}"
    if len(url) > width:
        url = f"  then open {ui['experiment_url']} (the compare view of all {ui['runs']} runs: --json's mlflow_ui.url)"
    out.append(url)
    return "\n".join(out)


# ---------------------------------------------------------------- machines


def to_json(cmp: dict) -> dict:
    """The comparison for `--json`: everything but the loss curves' points (in MLflow, and the PNG)."""
    training = [{**g, "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in g["runs"]]}
                for g in cmp["training"]]
    return {**cmp, "training": training}




def format_csv(cmp: dict) -> str:
    """One row per run compared (and per published reference): kind, ids, each task's headline metric,
    training numbers, and the settings that differ (every parameter with all_params)."""
    metric_cols = [t["metric"] for t in cmp["tasks"]]
    for e in cmp["evals"]:
        if e["metric"] not in metric_cols:
            metric_cols.append(e["metric"])
    rows = []
    for p in cmp["pipelines"]["runs"]:
        rows.append({"kind": "pipeline", "run_id": p["run_id"], "name": p["name"], "status": p["status"],
                     **{headline(t).metric: v for t, v in p["metrics"].items()},
                     **{f"{ph}.final_loss": v for ph, v in p["final_loss"].items()},
                     **p.get("params", p["settings"])})
    for ref in cmp["pipelines"]["references"]:
        rows.append({"kind": "published", "name": ref["model"], "group": ref["source"],
                     **{headline(t).metric: v for t, v in ref["scores"].items()}})
    for g in cmp["training"]:
        for r in g["runs"]:
            rows.append({"kind": "train", "group": g["phase"], **{k: r[k] for k in (
                "run_id", "name", "status", "parent_run_id", "steps", "final_loss", "tokens_per_s", "mfu", "minutes")},
                **r.get("params", r["settings"])})
    for e in cmp["evals"]:
        rows.append({"kind": "eval", "group": e["task"], "run_id": e["run_id"], "name": e["name"],
                     "status": e["status"], "parent_run_id": e["parent_run_id"], e["metric"]: e["value"],
                     **e.get("params", {})})
    for o in cmp["others"]:
        rows.append({"kind": o["kind"], "run_id": o["run_id"], "name": o["name"], "status": o["status"],
                     "parent_run_id": o["parent_run_id"], **o.get("params", {})})
    fixed = ["kind", "group", "run_id", "name", "status", "parent_run_id", *metric_cols, "steps", "final_loss",
             "tokens_per_s", "mfu", "minutes"]
    extra = sorted({k for r in rows for k in r} - set(fixed))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fixed + extra, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


# ---------------------------------------------------------------- loss curves


def plot_loss_curves(cmp: dict, png: str) -> int:
    """One panel per training phase, the runs' loss curves overlaid; returns the number of curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in cmp["training"] if any(r["loss_curve"] for r in g["runs"])] or [{"phase": "", "runs": []}]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    plotted = 0
    for ax, g in zip(axes[0], groups):
        curves = [r for r in g["runs"] if r["loss_curve"]]
        for r in curves:
            steps, values = zip(*r["loss_curve"])
            label = f"{r['pipeline'] + ' / ' if r['pipeline'] else ''}{r['name']} {r['run_id'][:8]}"
            ax.plot(steps, values, label=label)
        plotted += len(curves)
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{g['phase']} loss, {len(curves)} runs".strip(", "))
        if curves:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return plotted


# ---------------------------------------------------------------- entry point


def compare_runs(run_ids: list[str], experiment: str = "bitllava", tracking_uri: str | None = None,
                 png: str | None = "runs_compare.png", all_params: bool = False) -> dict:
    """The comparison (see build_comparison) of the runs named, else of every run of the experiment; writes
    the loss-curve PNG when `png` is given."""
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri)
    runs = fetch_runs(client, run_ids, experiment, tracking_uri)
    if not runs:
        raise ValueError(f"no runs to compare in experiment {experiment!r} at {tracking_uri}")
    cmp = build_comparison(client, runs, tracking_uri, all_params=all_params)
    cmp["png"] = png
    cmp["curves"] = plot_loss_curves(cmp, png) if png else 0
    return cmp
