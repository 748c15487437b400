"""README.md and docs/*.md as a reader meets them: every code block runs in a test, every
relative link resolves, and the README stays short.

The blocks of the README run here, in a workspace that looks like the repository root after the
quickstart (configs/, launch/, scripts/ and the package linked in, data/quickstart/ the
session's quickstart data); a block that would train for minutes runs with its sizes cut by a
named substitution, which must still occur in the text. The docs pages' blocks run in the test
files of what they show, each loading its block with ``doc_block("NAME")``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import ROOT, all_blocks, doc_block, markdown_files, run_block, substituted
from torchrun_helpers import WORKER_ENV, read_metrics

CODE_LANGUAGES = {"python", "bash", "yaml", "json"}
README_LIMIT = 400  # lines


# The structure -----------------------------------------------------------------------------

def test_every_block_says_its_language():
    unlabelled = [block.where() for block in all_blocks()
                  if block.language not in CODE_LANGUAGES | {"text"}]
    assert not unlabelled, (
        f"fenced blocks without a known language {sorted(CODE_LANGUAGES | {'text'})}: "
        f"{unlabelled}; output, diagrams and formulas are `text`")


def test_every_code_block_is_named_once():
    blocks = [block for block in all_blocks() if block.language in CODE_LANGUAGES]
    unnamed = [block.where() for block in blocks if block.name is None]
    assert not unnamed, f"code blocks without a `<!-- block: NAME -->` line above: {unnamed}"
    seen: dict[str, str] = {}
    for block in blocks:
        assert block.name not in seen, (
            f"block name {block.name!r} at {block.where()} is also at {seen[block.name]}")
        seen[block.name] = block.where()


def _test_files_using_blocks() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((ROOT / "tests").glob("*.py"))
            if "doc_block(" in path.read_text() and path.name != "doc_blocks.py"}


def test_every_code_block_is_run_by_a_test_and_every_loaded_block_exists():
    """A block counts as run when a test file that calls doc_block(...) names it in quotes
    (directly, in a loop or in a parametrization)."""
    sources = _test_files_using_blocks()
    named = {block.name: block.where() for block in all_blocks() if block.name}
    not_run = {name: where for name, where in named.items()
               if not any(f'"{name}"' in source for source in sources.values())}
    assert not not_run, f"code blocks no test loads with doc_block(...): {not_run}"
    missing = {(file, name) for file, source in sources.items()
               for name in re.findall(r'doc_block\(\s*"([a-z0-9-]+)"', source)
               if name not in named}
    assert not missing, f"tests load blocks the docs no longer have: {sorted(missing)}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors_of(path: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#+ (.*)$", line)):
            anchors.add(_anchor(heading.group(1)))
    return anchors


def test_every_relative_link_resolves():
    broken = []
    for page in markdown_files():
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (ROOT / page).parent / file_part if file_part else ROOT / page
            if not linked.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors_of(linked):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_LIMIT, f"README.md has {lines} lines; move detail to docs/"


# Running the README's blocks ----------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data) -> Path:
    """A folder laid out as the repository root after the quickstart built its data."""
    root = tmp_path_factory.mktemp("docs_workspace")
    for entry in ("configs", "launch", "scripts", "slurm", "plugin", "pyproject.toml",
                  "README.md"):
        (root / entry).symlink_to(ROOT / entry)
    (root / "data").mkdir()
    (root / "data" / "quickstart").symlink_to(data.tokenizer_path.parent)
    return root


def test_install_keeps_the_installed_torch_and_names_real_extras():
    """Each `pip install` line, as a dry run that reaches no index: the extra exists, and
    nothing but the package would be installed (an installed torch is kept)."""
    lines = [line.split("#")[0].strip() for line in doc_block("install").text.splitlines()]
    assert lines and all(line.startswith("pip install ") for line in lines if line)
    for line in filter(None, lines):
        requirement = shlex.split(line)[-1]
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
             "--no-build-isolation", requirement],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert "does not provide the extra" not in output, output[-3000:]
        would = re.findall(r"^Would install (.*)$", output, flags=re.M)
        assert would and would[0].split() == ["token-objectives-0.1.0"], (line, would)


def test_ensure_torch_keeps_an_importable_torch_and_installs_only_without_one(tmp_path):
    keep = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_torch.sh")],
                          capture_output=True, text=True, env=WORKER_ENV)
    assert keep.returncode == 0 and keep.stdout.startswith("keeping the installed torch"), keep
    # A torch that does not import: the script installs 2.13.0, here as pip's dry run.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = dict(WORKER_ENV, PYTHONPATH=str(tmp_path), PIP_DRY_RUN="1", PIP_NO_INDEX="1")
    install = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_torch.sh")],
                             capture_output=True, text=True, env=env)
    assert install.returncode == 0, install
    assert install.stdout.startswith("no torch imports: installing torch 2.13.0"), install


def test_the_test_command_is_what_ci_runs():
    command = doc_block("test-command").text.strip()
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [command]


def test_the_quickstart_runs_from_its_one_command(tmp_path):
    """The whole script: the install (pip's dry run, reaching no index), the data build and
    the tiny run at TP = 2, two steps instead of 200."""
    root = tmp_path / "checkout"
    root.mkdir()
    for entry in ("configs", "launch", "scripts", "plugin", "pyproject.toml", "README.md"):
        (root / entry).symlink_to(ROOT / entry)
    text = substituted(doc_block("quickstart").text, {
        "launch/quickstart.sh": "launch/quickstart.sh --set train.steps=2"
                                " --set train.warmup_steps=0 --set train.log_interval=1"
                                " --set train.save_interval=0"})
    env = dict(WORKER_ENV, PIP_DRY_RUN="1", PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    done = run_block("bash", text, root, env)
    runs = list((root / "runs").glob("quickstart-*"))
    assert len(runs) == 1, done.stdout
    assert [record["step"] for record in read_metrics(runs[0])] == [1, 2]
    assert "TensorBoard: tensorboard --logdir" in done.stdout


def test_the_objective_snippet_runs(workspace):
    done = run_block("python", doc_block("objective-use").text, workspace)
    assert re.match(r"loss \d+\.\d+, ce \d+\.\d+, \d+ number tokens", done.stdout), done.stdout


def test_the_command_line_snippet_runs(workspace):
    done = run_block("bash", doc_block("cli-tables").text, workspace)
    assert (workspace / "freqs.safetensors").is_file()
    assert "Megatron loop" in done.stdout, done.stdout


HF_PRELUDE = """
import sys
sys.path.insert(0, {tests!r})
from transformers import Trainer, TrainingArguments
from hf_runs import Rows, tiny_llama
import sentencepiece, torch
processor = sentencepiece.SentencePieceProcessor(model_file="data/quickstart/tokenizer.model")
model = tiny_llama(processor.vocab_size())
ids = torch.randint(0, processor.vocab_size(), (8, 24), generator=torch.Generator().manual_seed(0))
data = Rows({{"input_ids": ids, "labels": ids.clone()}})
args = TrainingArguments(output_dir="runs/hf", max_steps=2, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, logging_steps=1, save_strategy="no")
"""


def test_the_hugging_face_snippet_trains(workspace):
    assert doc_block("hf-trainer-page").text == doc_block("hf-trainer").text
    text = HF_PRELUDE.format(tests=str(ROOT / "tests")) + doc_block("hf-trainer").text + (
        "\nlogged = [entry for entry in trainer.state.log_history if 'ntl' in entry]"
        "\nassert len(logged) == 2, trainer.state.log_history\n")
    run_block("python", text, workspace)


PROBLEMS = "".join(f'{{"prompt": "Q: {a} + {b} = ? A:", "answer": {a + b}}}\n'
                   for a, b in ((2, 3), (40, 2), (7, 5)))


def test_the_loops_train_and_their_checkpoints_evaluate(workspace):
    """The README's Megatron-Core and DeepSpeed commands (docs/megatron-core.md and
    docs/deepspeed.md repeat them), two steps each; docs/correction_data.md's conversion of the
    DeepSpeed checkpoint to a Hugging Face directory; docs/evaluation.md's two `evaluate`
    commands on the Megatron checkpoint and on that directory."""
    assert doc_block("megatron-core-run").text == (
        doc_block("data-build").text + doc_block("megatron-core-loop").text)
    assert doc_block("deepspeed-loop").text == (
        doc_block("data-build").text + doc_block("deepspeed-run").text)
    megatron = substituted(doc_block("megatron-core-run").text, {
        "--output-dir data/quickstart": "--output-dir data/built",
        "--set train.steps=200": "--set train.steps=2 --set train.warmup_steps=0"
                                 " --set output.dir=runs/megatron"
                                 " --set train.save_interval=0 --set train.log_interval=1"})
    run_block("bash", megatron, workspace)
    assert [record["step"] for record in read_metrics(workspace / "runs/megatron")] == [1, 2]
    assert (workspace / "data" / "built" / "frequencies.safetensors").is_file()
    deepspeed = substituted(doc_block("deepspeed-run").text, {
        "--set train.steps=50": "--set train.steps=2 --set output.dir=runs/ds"})
    run_block("bash", deepspeed, workspace)
    assert [record["step"] for record in read_metrics(workspace / "runs/ds")] == [1, 2]
    run_block("python", doc_block("correction-from-deepspeed").text, workspace)
    assert (workspace / "runs/ds/hf/tokenizer.model").is_file()

    (workspace / "eval.jsonl").write_text(PROBLEMS)
    evaluate = substituted(doc_block("evaluate-cli").text, {
        "runs/quickstart": "runs/megatron", "--out metrics.json ":
        "--out metrics.json --max-new-tokens 4 --no-progress ", "--hf-model hf_dir":
        "--hf-model runs/ds/hf", "--out metrics.json\n": "--out hf.json --max-new-tokens 4"
                                                         " --no-progress\n"})
    run_block("bash", evaluate, workspace)
    for report in ("metrics.json", "hf.json"):
        generations = json.loads((workspace / report).read_text())["generations"]
        assert len(generations) == 3, report


def test_the_data_build_runs(workspace):
    run_block("bash", substituted(doc_block("data-build").text, {
        "--output-dir data/quickstart": "--output-dir data/own"}), workspace)
    assert (workspace / "data" / "own" / "train_text_document.idx").is_file()


def test_the_objective_page_runs(workspace):
    done = run_block("python", doc_block("objective-api").text, workspace)
    assert done.stdout.count("torch.Size([16, 2])") == 5, done.stdout
    (workspace / "notes.txt").write_text("The 3 trains left at 14:05 carrying 1,250 people.\n")
    run_block("bash", doc_block("objective-cli").text, workspace)
    assert (workspace / "freqs.safetensors").is_file()


def _section(block_name: str) -> dict:
    return json.loads("{" + doc_block(block_name).text + "}")


def test_the_ds_config_sections_are_read_as_written(workspace, monkeypatch):
    from token_objectives.integrations.deepspeed.section import read_section

    monkeypatch.chdir(workspace)
    section = read_section(_section("deepspeed-section"))
    assert (section.ntl, section.pdl_alpha, section.number_tokens) == ("was", 0.2, "auto")
    sampling = read_section(_section("sampling-section")).scheduled_sampling
    assert sampling == {"enabled": True, "schedule": "linear", "max_p": 0.25,
                        "warmup_steps": 2000, "c": 1e-4}


def test_the_scheduled_sampling_yaml_is_a_run_config_section(tmp_path):
    from token_objectives.training.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text() + doc_block(
        "sampling-yaml").text)
    sampling = load_config(config).scheduled_sampling
    assert (sampling.enabled, sampling.schedule, sampling.warmup_steps, sampling.mode) == (
        True, "linear", 2000, "argmax")


def test_the_sampling_experiment_runs_end_to_end_small(workspace):
    """docs/sampling.md's experiment script as written but two steps on a small corpus (the
    measured run takes 9 minutes; the objectives experiment's block runs in
    test_objectives_experiment.py)."""
    sampling = substituted(doc_block("sampling-experiment").text, {
        "launch/scheduled_sampling_experiment.py ": "launch/scheduled_sampling_experiment.py"
        " --steps 2 --documents 300 --problems 4 --output-dir runs/ss "})
    run_block("bash", sampling, workspace)
    assert list((workspace / "runs/ss").iterdir())


@pytest.mark.parametrize("name", ["plan-memory-megatron", "plan-memory-deepspeed"])
def test_the_memory_plans_print_what_the_page_shows(workspace, name):
    """The command as written, and its table as the page's text block right after it shows."""
    blocks = all_blocks()
    index = next(i for i, block in enumerate(blocks) if block.name == name)
    shown = blocks[index + 1]
    assert shown.language == "text" and shown.path == blocks[index].path
    done = run_block("bash", blocks[index].text, workspace)
    printed = done.stdout.splitlines()
    assert printed[:len(shown.text.splitlines())] == shown.text.splitlines()


def test_the_megatron_lm_lines_are_the_entry_points():
    """The README's three lines and docs/megatron-lm.md's 0.19 lines appear as they are in the
    entry point that tests/test_megatron_lm_pretrain.py runs through megatron.training.pretrain
    (the 0.16 lines run in tests/test_megatron_lm_contract.py)."""
    entry_point = (ROOT / "tests" / "megatron_lm" / "pretrain_gpt.py").read_text()
    for name in ("megatron-lm-readme", "megatron-lm-0-19"):
        for line in filter(None, doc_block(name).text.splitlines()):
            assert line.strip() in entry_point, (name, line)
