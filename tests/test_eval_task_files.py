"""Every task's loader on files in the published layout (`synthetic_sets.write_all`, what `data synth` writes),
and a clear error for each kind of bad file: absent, not the task's format, bad entries, result files
that are malformed or do not match the questions."""

import json
import os
import shutil

import pytest

from components.evaluate.datasets import load_eval_set
from components.evaluate.predictions import prediction_filename, write_predictions
from components.evaluate.scoring import score_files
from components.evaluate.synthetic_sets import write_all
from components.evaluate.tasks import TASK_NAMES


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_all(str(tmp_path_factory.mktemp("published")), size=8, seed=3)


def _load(sets, name, task=None, **extra):
    files = sets[name]
    return load_eval_set(task or name, files.get("annotations", []), files.get("questions"), ocr=files.get("ocr"),
                         test_questions=files.get("test_questions"), **extra)


def _images_exist(eval_set, folder):
    return all(os.path.isfile(os.path.join(folder, q.image)) for q in eval_set.questions)


def test_every_task_loads_its_published_layout(sets):
    assert set(TASK_NAMES) <= set(sets)
    pope = _load(sets, "pope")  # LLaVA's question lines with the POPE files' labels
    assert pope.splits == ("random", "popular", "adversarial") and all(q.label in ("yes", "no") for q in pope.questions)
    assert len({q.question_id for q in pope.questions}) == len(pope.questions) == 12

    test_dev = _load(sets, "vqav2-test-dev", task="vqav2", for_run=True)
    assert test_dev.splits == ("test-dev2015",) and not test_dev.has_ground_truth
    assert _images_exist(test_dev, sets["vqav2-test-dev"]["images"])

    textvqa = _load(sets, "textvqa", for_run=True)
    assert textvqa.protocol == "llava-1.5-ocr" and all("\nReference OCR token: " in q.prompt for q in textvqa.questions)

    gqa = _load(sets, "gqa")
    assert gqa.splits == ("testdev_balanced",) and _images_exist(gqa, sets["gqa"]["images"])
    assert [q.info["balanced"] for q in gqa.questions].count(False) == 1
    assert {q.question_type for q in gqa.questions} == {"query", "verify"}
    assert gqa.questions[0].prompt.endswith("\nAnswer the question using a single word or phrase.")

    sqa = _load(sets, "scienceqa")
    assert len(sqa.questions) == 8 and sqa.notes == {"text_only_questions_left_out": 2}
    assert all(q.answers[0] in "ABCD"[:len(q.choices)] for q in sqa.questions)
    assert _images_exist(sqa, sets["scienceqa"]["images"])

    mme = _load(sets, "mme")
    assert mme.splits == ("existence", "count", "color", "artwork", "numerical_calculation")
    pairs = {}
    for q in mme.questions:
        pairs.setdefault(q.group, []).append(q.answers[0])
    assert all(sorted(v) == ["No", "Yes"] for v in pairs.values())  # two questions per image, one yes, one no
    assert _images_exist(mme, sets["mme"]["images"])
    assert any("/images/" in q.image for q in mme.questions)  # the artwork layout

    seed = _load(sets, "seed")
    assert len(seed.questions) == 8 and seed.notes == {"video_questions_left_out": 1}
    assert {q.question_type for q in seed.questions} == {"Instance Attributes", "Instances Counting",
                                                         "Instance Location"}
    assert _images_exist(seed, sets["seed"]["images"])

    mmbench = _load(sets, "mmbench")
    groups = {}
    for q in mmbench.questions:
        groups.setdefault(q.group, []).append(q)
    assert len(groups) == 4 and sorted(len(g) for g in groups.values()) == [3, 3, 4, 4]
    for group in groups.values():  # every rotation asks for the same option text
        truths = {q.choices["ABCD".index(q.answers[0])] for q in group}
        assert len(truths) == 1
    assert all(q.image_data and not q.image for q in mmbench.questions)


def test_the_majority_answer_scores_full_marks_on_every_scored_task(sets, tmp_path):
    """Ground truth written back in each task's official result format scores 100 (or the maximum)."""
    for name in ("gqa", "scienceqa", "seed", "mmbench", "mme", "textvqa"):
        eval_set = _load(sets, name)
        path = str(tmp_path / prediction_filename(name))
        write_predictions(path, eval_set, {q.key: q.answers[0] for q in eval_set.questions})
        files = sets[name]
        metrics = score_files(name, path, files["annotations"], files.get("questions"), ocr=files.get("ocr"))
        if name == "mme":
            assert metrics["perception"] == metrics["perception_max"] and metrics["cognition"] == 200.0
        else:
            assert metrics["accuracy"] == 100.0, name


@pytest.mark.parametrize("name, flag, value, message", [
    ("gqa", "annotations", ["absent.json"], "GQA questions file absent.json does not exist"),
    ("scienceqa", "annotations", ["absent"], "ScienceQA data folder absent does not exist"),
    ("mme", "annotations", ["absent"], "absent is not the MME release folder"),
    ("seed", "annotations", ["absent.json"], "SEED-Bench file absent.json does not exist"),
    ("mmbench", "annotations", ["absent.tsv"], "MMBench file absent.tsv does not exist"),
    ("textvqa", "ocr", "absent_ocr.json", "TextVQA OCR file absent_ocr.json does not exist"),
    ("mme", "ocr", "ocr.json", "MME takes no --ocr"),
    ("seed", "annotations", ["a.json", "b.json"], "seed takes one annotations file"),
])
def test_absent_or_unexpected_files(sets, name, flag, value, message):
    files = dict(sets[name], **{flag: value})
    with pytest.raises(ValueError, match=message):
        load_eval_set(name, files.get("annotations", []), files.get("questions"), ocr=files.get("ocr"))


def _json(path, payload):
    path.write_text(json.dumps(payload))
    return str(path)


def test_files_of_the_wrong_format(sets, tmp_path):
    a_list = _json(tmp_path / "list.json", [1, 2])
    with pytest.raises(ValueError, match="is not a GQA questions file"):
        load_eval_set("gqa", [a_list])
    with pytest.raises(ValueError, match="is not a SEED-Bench file"):
        load_eval_set("seed", [a_list])
    with pytest.raises(ValueError, match="is not a Rosetta OCR file"):
        load_eval_set("textvqa", sets["textvqa"]["annotations"], ocr=a_list)
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    with pytest.raises(ValueError, match="GQA questions file .* is not valid JSON"):
        load_eval_set("gqa", [str(not_json)])
    tsv = tmp_path / "other.tsv"
    tsv.write_text("id\tquestion\n1\tx\n")
    with pytest.raises(ValueError, match=r"is not an MMBench TSV: no column\(s\) index, A, B, image"):
        load_eval_set("mmbench", [str(tsv)])
    empty = tmp_path / "empty_mme"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds none of the subtask folders"):
        load_eval_set("mme", [str(empty)])


def test_bad_entries_are_named(sets, tmp_path):
    gqa = json.load(open(sets["gqa"]["annotations"][0]))
    first = next(iter(gqa))
    del gqa[first]["answer"]
    with pytest.raises(ValueError, match=rf"question {first}: missing or non-string answer"):
        load_eval_set("gqa", [_json(tmp_path / "testdev_balanced_questions.json", gqa)])

    seed = json.load(open(sets["seed"]["annotations"][0]))
    seed["questions"][0]["question_type_id"] = 99
    with pytest.raises(ValueError, match="question 0: question_type_id 99 is not in question_type"):
        load_eval_set("seed", [_json(tmp_path / "SEED-Bench.json", seed)])

    folder = tmp_path / "scienceqa"
    shutil.copytree(sets["scienceqa"]["annotations"][0], folder)
    problems = json.load(open(folder / "problems.json"))
    pid = json.load(open(folder / "pid_splits.json"))["test"][0]
    problems[pid]["answer"] = 7
    _json(folder / "problems.json", problems)
    with pytest.raises(ValueError, match=rf"problem {pid}: needs a question, 1-5 choices and an answer index"):
        load_eval_set("scienceqa", [str(folder)])

    mme = tmp_path / "mme"
    shutil.copytree(sets["mme"]["annotations"][0], mme)
    (mme / "existence" / "0001.txt").write_text("Is there a cat?\tMaybe\n")
    os.remove(mme / "count" / "0001.png")
    with pytest.raises(ValueError) as err:
        load_eval_set("mme", [str(mme)])
    assert "2 bad MME file(s)" in str(err.value) and "0001.txt: expected two lines" in str(err.value)
    assert "no image 0001.jpg/.png" in str(err.value)

    rows = open(sets["mmbench"]["annotations"][0]).read().splitlines()
    header, first_row = rows[0].split("\t"), rows[1].split("\t")
    first_row[header.index("answer")] = "D" if first_row[header.index("D")] == "" else "E"
    bad = tmp_path / "mmbench.tsv"
    bad.write_text("\n".join([rows[0], "\t".join(first_row)]) + "\n")
    with pytest.raises(ValueError, match="needs at least options A and B and an answer among them"):
        load_eval_set("mmbench", [str(bad)])


def test_result_files_that_do_not_fit(sets, tmp_path):
    gqa = sets["gqa"]["annotations"]
    lines = tmp_path / "preds.jsonl"
    lines.write_text('{"questionId": "1", "prediction": "x"}\n{"questionId": "2", "prediction": "y"}\n')
    with pytest.raises(ValueError, match="is not valid JSON .* GQA results are one JSON array"):
        score_files("gqa", str(lines), gqa)
    with pytest.raises(ValueError, match="must hold a JSON array of {'questionId', 'prediction'} objects"):
        score_files("gqa", _json(tmp_path / "object.json", {"questionId": "1", "prediction": "x"}), gqa)
    with pytest.raises(ValueError, match=r"item 0: missing or invalid questionId"):
        score_files("gqa", _json(tmp_path / "p.json", [{"question_id": "1", "prediction": "x"}]), gqa)

    seed = sets["seed"]["annotations"]
    ids = [q.question_id for q in _load(sets, "seed").questions]
    malformed = tmp_path / "seed.jsonl"
    malformed.write_text('{"question_id": "1"}\nnot json\n')
    with pytest.raises(ValueError) as err:
        score_files("seed", str(malformed), seed)
    assert "2 bad line(s)" in str(err.value) and "'prediction' or 'text' must be a string" in str(err.value)
    as_ints = tmp_path / "ints.jsonl"
    as_ints.write_text("".join(json.dumps({"question_id": int(i), "prediction": "A"}) + "\n" for i in ids))
    with pytest.raises(ValueError, match="ids are of type str"):
        score_files("seed", str(as_ints), seed)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"question_id": ids[0], "prediction": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"answer 1 of 8 questions.*--allow-partial"):
        score_files("seed", str(partial), seed)
    assert score_files("seed", str(partial), seed, allow_partial=True)["coverage"] == 12.5
    twice = tmp_path / "twice.jsonl"
    twice.write_text(2 * (json.dumps({"question_id": ids[0], "prediction": "A"}) + "\n"))
    with pytest.raises(ValueError, match="answered twice"):
        score_files("seed", str(twice), seed, allow_partial=True)

    mme = sets["mme"]["annotations"]
    with pytest.raises(ValueError, match="must be a folder of <subtask>.txt result files"):
        score_files("mme", str(partial), mme)
    results = tmp_path / "mme_results"
    results.mkdir()
    (results / "colour.txt").write_text("a\tb\tc\td\n")
    with pytest.raises(ValueError, match=r"unknown subtask file\(s\) colour.txt"):
        score_files("mme", str(results), mme)
    os.remove(results / "colour.txt")
    (results / "color.txt").write_text("0001.png\tIs it red?\tYes\n")
    with pytest.raises(ValueError, match="color.txt:1: expected 4 tab-separated fields"):
        score_files("mme", str(results), mme)
    (results / "color.txt").write_text("0001.png\tIs it red?\tYes\tyes\n")
    with pytest.raises(ValueError, match="name questions that are not in"):
        score_files("mme", str(results), mme)

    test_dev = sets["vqav2-test-dev"]
    with pytest.raises(ValueError, match="holds no answers to score against"):
        score_files("vqav2", str(partial), [], test_dev["questions"])


def test_limit_keeps_groups_whole(sets):
    """--limit N: the first N questions of each split; an MME image pair and an MMBench circular group count once."""
    mme = _load(sets, "mme").limited(1)
    assert len(mme.questions) == 2 * len(mme.splits) and all(len({q.group for q in mme.questions if q.split == s}) == 1
                                                           for s in mme.splits)
    mmbench = _load(sets, "mmbench").limited(1)
    assert {q.group for q in mmbench.questions} == {0} and len(mmbench.questions) == 4
    pope = _load(sets, "pope").limited(2)
    assert [len([q for q in pope.questions if q.split == s]) for s in pope.splits] == [2, 2, 2]


def test_mismatched_textvqa_prompt_files(sets, tmp_path):
    val = sets["textvqa"]["annotations"]
    ocr = json.load(open(sets["textvqa"]["ocr"]))
    dropped = ocr["data"][0]["image_id"]
    ocr["data"] = ocr["data"][1:]
    with pytest.raises(ValueError, match=rf"1 image\(s\) of .* are not in .*ocr.json \({dropped}\)"):
        load_eval_set("textvqa", val, ocr=_json(tmp_path / "ocr.json", ocr))
    lines = open(sets["textvqa"]["llava_questions"]).read().splitlines()
    other = json.loads(lines[0]) | {"text": "what is this?\nAnswer the question using a single word or phrase."}
    llava = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    llava.write_text("\n".join([json.dumps(other), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"1 line\(s\) match no annotated question .*; 1 annotated question\(s\) "
                                         r"have no line"):
        load_eval_set("textvqa", val, str(llava))
    plain = tmp_path / "plain.jsonl"
    suffix = "\nAnswer the question using a single word or phrase."
    plain.write_text("".join(json.dumps(json.loads(line) | {"text": json.loads(line)["text"].split(
        "\nReference OCR token: ")[0] + suffix}) + "\n" for line in lines))
    with pytest.raises(ValueError, match="holds no 'Reference OCR token:' prompts"):
        load_eval_set("textvqa", val, str(plain), for_run=True)


def test_pipeline_eval_settings_check_tasks_and_protocols():
    from pipelines.config import EvalSettings

    assert EvalSettings(tasks=list(TASK_NAMES), protocols={"textvqa": "no-ocr"}).protocols == {"textvqa": "no-ocr"}
    with pytest.raises(ValueError, match="unknown eval tasks \\['okvqa'\\]"):
        EvalSettings(tasks=["okvqa"])
    with pytest.raises(ValueError, match="'textvqa' has no protocol 'ocr2'; choose one of ocr, no-ocr"):
        EvalSettings(tasks=["textvqa"], protocols={"textvqa": "ocr2"})
    with pytest.raises(ValueError, match="'mme' has no protocol 'ocr' \\(it has one prompt\\)"):
        EvalSettings(tasks=["mme"], protocols={"mme": "ocr"})
