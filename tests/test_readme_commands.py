"""The README's "Command line" block, run as written: every command, in order, from a fresh folder.

The commands are read from README.md itself, so the README shows only what this test runs: if a
command there changes, this test runs the new one. Paths are the README's relative ones, resolved in
a temporary working directory (not the repository), as a user's shell would.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from pipelines.config import ROOT

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def readme_commands(section: str = "## Command line") -> list[str]:
    """The commands of the first ```bash block after `section`, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"```bash\n(.*?)```", text[text.index(section):], re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            commands.append(current.strip())
        current = ""
    return commands


def test_the_block_is_the_documented_sequence():
    names = [" ".join(c.split()[1:3]) for c in readme_commands()]
    for step in ("data synth", "model init", "data preprocess", "train --config", "runs compare", "generate --model",
                 "pack --model", "eval run", "eval score"):
        assert any(n.startswith(step) for n in names), (step, names)


def test_readme_command_line_block_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    outputs = []
    for command in readme_commands():
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        outputs.append((command, proc.stdout))

    def output(prefix: str) -> list[str]:
        return [out for command, out in outputs if command.startswith(prefix)]

    info, bitnet = (json.loads(out) for out in output("bitllava model info"))
    assert info["llm_params"] == 1_176_832_000
    assert bitnet["llm_params_published"] == 2_412_820_480 and bitnet["bitlinear_weights"] == 2_084_044_800
    manifest = json.loads((tmp_path / "stores" / "align" / "manifest.json").read_text())
    assert manifest["counts"]["bad"] > 0 and len(manifest["parts"]) == 1  # one part, yet 2 workers train on it
    train = json.loads(output("bitllava train")[0].strip().splitlines()[-1])
    assert train["model_dir"] == str(tmp_path / "runs" / "align" / "model")  # resolved in the user's folder
    assert "loss" in output("bitllava runs compare")[0]
    replies = [json.loads(out) for out in output("bitllava generate")]
    assert len(replies) == 2 and all(r["token_ids"] for r in replies)
    assert (tmp_path / "packed" / "config.json").is_file()
    score = json.loads(output("bitllava eval score")[0])
    metrics = json.loads((tmp_path / "eval_out" / "vqav2_metrics.json").read_text())
    assert 0 <= score["accuracy"] <= 100 and score["accuracy"] == pytest.approx(metrics["metrics"]["accuracy"])
    plan = json.loads(output("bitllava run pipelines")[0])
    assert plan["out"] == str(tmp_path / "demo_out")  # the config's relative `out`, in the user's folder
