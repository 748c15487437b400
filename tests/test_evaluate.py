"""`token-objectives evaluate`: the last-number parser and the metrics against hand-computed
values on hand-written generations, bad inputs, the command end to end on a tiny HF Llama whose
answer is known by construction and on a Megatron-loop checkpoint, and train.eval_interval in
the Megatron loop (torchrun, TP = 2) logging eval/<metric>."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from torchrun_helpers import REPO, WORKER_ENV, check, free_port, read_metrics
from torchrun_helpers import TINY_MEGATRON as TINY

from token_objectives.cli import main
from token_objectives.evaluation.metrics import METRICS, number_metrics
from token_objectives.evaluation.numbers import last_number
from token_objectives.evaluation.problems import read_problems
from token_objectives.evaluation.report import build_report
from token_objectives.training.config import load_config


@pytest.mark.parametrize(("text", "expected"), [
    ("Q: 37 + 45 = ? A: 82", 82.0),
    ("The answer is -8.", -8.0),
    ("(-3)", -3.0),
    ("5-3", 3.0),  # a subtraction, not a negative number
    ("x-3", 3.0),
    ("it is 3.25 m", 3.25),
    ("-0.5", -0.5),
    ("82.", 82.0),
    ("1.2.3", 1.2),
    ("about 1,234 people", 1234.0),
    ("-1,234,567.5", -1234567.5),
    ("1,23", 23.0),  # not a group of three: two numbers
    ("3, 4", 4.0),
    ("12345", 12345.0),
    ("no number here", None),
    ("", None),
    ("- . ,", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


PROBLEMS_JSONL = "\n".join(json.dumps(line) for line in [
    {"prompt": "Q: 2 + 3 = ? A:", "answer": 5},
    {"prompt": "Q: 4 + 3 = ? A:", "answer": "7"},
    {"prompt": "Q: 1 - 4.5 = ? A:", "answer": -3},
    {"prompt": "Q: 1000 + 200 = ? A:", "answer": "1,200"},
    {"prompt": "Q: 9 * 10 = ? A:", "answer": 90.0},
]) + "\n"
# By hand: parsed 5, none, -3.5, 1234, 100 against 5, 7, -3, 1200, 90.
GENERATIONS = [" 5, I think", " no idea", " it is -3.5", " 1,234", " 100 apples"]
# Absolute errors of the 4 parsed: 0, 0.5, 34, 10. Answers' mean 1292 / 4 = 323;
# sum of squares 318² + 326² + 877² + 233² = 1030818; residuals 0 + 0.25 + 1156 + 100.
# Digits: 5|5 0, 3|3 0, 1234|1200 2 of 4, 100|090 2 of 3.
HAND = {"exact_accuracy": 1 / 5, "no_number_rate": 1 / 5, "mae": 44.5 / 4,
        "median_ae": (0.5 + 10) / 2, "r2": 1 - 1256.25 / 1030818,
        "digit_error": (0 + 0 + 2 / 4 + 2 / 3) / 4, "examples": 5, "parsed": 4}


def test_metrics_of_hand_written_generations(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(PROBLEMS_JSONL)
    problems = read_problems(path)
    assert [p.answer for p in problems] == [5, 7, -3, 1200, 90]
    report = build_report(problems, GENERATIONS)
    assert report["metrics"] == pytest.approx(HAND)
    assert [row["parsed"] for row in report["generations"]] == [5, None, -3.5, 1234, 100]
    assert [row["correct"] for row in report["generations"]] == [True, False, False, False,
                                                                 False]


def test_undefined_metrics_are_nan_and_a_wrong_sign_is_not_a_digit_error():
    none = number_metrics([None, None], [1.0, 2.0])
    assert none["exact_accuracy"] == 0 and none["no_number_rate"] == 1
    assert all(math.isnan(none[name]) for name in ("mae", "median_ae", "r2", "digit_error"))
    one = number_metrics([-12.0, None], [12.0, 3.0])
    assert math.isnan(one["r2"])  # one parsed answer: no variance to explain
    assert one["digit_error"] == 0 and one["mae"] == 24 and one["exact_accuracy"] == 0
    assert math.isnan(number_metrics([4.0, 4.0], [3.0, 3.0])["r2"])  # equal answers


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "a", "answer": 1}\n{"prompt": "b"}\n', r"eval\.jsonl:2: \"answer\" is missing"),
    ('{"answer": 1}\n', r"eval\.jsonl:1: \"prompt\" is missing"),
    ('{"prompt": "a", "answer": 1}\n\n', r"eval\.jsonl:2: blank line"),
    ('{"prompt": "a", "answer": "many"}\n', r"eval\.jsonl:1: \"answer\" 'many' is not one "
     r"number"),
    ('{"prompt": "a", "answer": true}\n', r"eval\.jsonl:1: \"answer\" is a bool"),
    ('["a", 1]\n', r"eval\.jsonl:1: a JSON list, not an object"),
    ("{oops\n", r"eval\.jsonl:1: invalid JSON"),
    # JSON's NaN and Infinity (and numbers past a float's range) parse; they used to fail only
    # when the report was written, after all the generation.
    ('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": NaN}\n',
     r"eval\.jsonl:2: \"answer\" NaN is not a finite number"),
    ('{"prompt": "a", "answer": Infinity}\n', r"eval\.jsonl:1: \"answer\" Infinity is not a "
     r"finite number"),
    ('{"prompt": "a", "answer": -Infinity}\n', r"eval\.jsonl:1: \"answer\" -Infinity is not"),
    ('{"prompt": "a", "answer": 1e400}\n', r"eval\.jsonl:1: \"answer\" Infinity is not"),
    pytest.param('{"prompt": "a", "answer": "1' + "0" * 400 + '"}\n',
                 r"eval\.jsonl:1: \"answer\" \"10+\" is not a finite number", id="1e400 string"),
    pytest.param('{"prompt": "a", "answer": 1' + "0" * 400 + '}\n',
                 r"eval\.jsonl:1: \"answer\" 10+ is not a finite number", id="1e400 integer"),
])
def test_bad_lines_are_named_with_the_fix(tmp_path, capsys, content, message):
    path = tmp_path / "eval.jsonl"
    path.write_text(content)
    assert main(["evaluate", "--hf-model", str(tmp_path), "--data", str(path), "--out",
                 str(tmp_path / "m.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("token-objectives evaluate: error: ")
    assert re.search(message, error), error
    assert "each line must be one JSON object" in error


def test_missing_inputs_are_named(tmp_path, capsys):
    out = str(tmp_path / "m.json")
    assert main(["evaluate", "--hf-model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"),
                 "--out", out]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    data = tmp_path / "eval.jsonl"
    data.write_text(PROBLEMS_JSONL)
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(data),
                 "--out", out]) == 2
    assert "--checkpoint needs --config" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("data: {tokenizer: x}\n")
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--config",
                 str(tmp_path / "run.yaml"), "--data", str(data), "--out", out]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--hf-model", str(tmp_path), "--data", str(data), "--out", out]) == 2
    assert "is not a Hugging Face model directory" in capsys.readouterr().err


def constant_llama(directory, digit: str = "4"):
    """A tiny Llama that writes `digit` after any prompt: the attention and MLP outputs are
    zero, so the last hidden state is the (all-ones) embedding, and only `digit`'s row of the
    LM head is non-zero. Saved with its tokenizer (built here, no download)."""
    from ensemble_fixtures import plain_tokenizer
    from tokenizers import decoders
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = plain_tokenizer([*"0123456789", " ", "Q", "A", ":", "+", "-", "*", "=", "?",
                                 ".", ",", "\n"])
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()  # "4", "4" -> "44", not "4 4"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(digit)] = 1.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_evaluate_a_local_hf_model_end_to_end(tmp_path, capsys):
    constant_llama(tmp_path / "model")
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "Q: 400 + 44 = ? A:", "answer": 444},
        {"prompt": "Q: 2 + 3 = ? A:", "answer": 5},
        {"prompt": "Q: 40 + 2 = ? A:", "answer": "42"},
    ]) + "\n")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--hf-model", str(tmp_path / "model"), "--data", str(data),
                 "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    table = capsys.readouterr().out
    assert "| exact_accuracy | 0.3333 |" in table
    report = json.loads(out.read_text())
    assert set(report) == {"metrics", "source", "generations"}
    assert set(report["metrics"]) == {*METRICS, "examples", "parsed"}
    assert [row["generation"] for row in report["generations"]] == ["444"] * 3
    assert [row["parsed"] for row in report["generations"]] == [444] * 3
    # By hand: errors 0, 439, 402; answers' mean 491 / 3; digits 444|444 0, 444|005 3 of 3,
    # 444|042 2 of 3.
    mean = 491 / 3
    assert report["metrics"] == pytest.approx({
        "exact_accuracy": 1 / 3, "no_number_rate": 0.0, "mae": 841 / 3, "median_ae": 402,
        "r2": 1 - (439**2 + 402**2) / ((444 - mean)**2 + (5 - mean)**2 + (42 - mean)**2),
        "digit_error": (0 + 1 + 2 / 3) / 3, "examples": 3, "parsed": 3})


# --------------------------------------------------------------------------- the Megatron loop


@pytest.fixture(scope="module")
def megatron_run(data, tmp_path_factory):
    """2 steps at TP = 2 with sequence parallelism and train.eval_interval = 2 on five problems
    (evaluate then reads the checkpoint at TP = 1 without it)."""
    root = tmp_path_factory.mktemp("megatron_eval")
    problems = root / "eval.jsonl"
    problems.write_text(PROBLEMS_JSONL)
    settings = [f"data.tokenizer={data.tokenizer_path}", f"data.train_prefix={data.train_prefix}",
                f"data.frequencies={data.frequencies_path}", f"output.dir={root / 'run'}",
                *TINY, "parallel.tensor=2", "parallel.sequence_parallel=true", "train.steps=2",
                "train.eval_interval=2",
                f"data.eval_data={problems}", "train.eval_max_new_tokens=4",
                "train.eval_batch_size=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               f"--master-port={free_port()}", str(REPO / "launch" / "pretrain_megatron.py"),
               "--config", str(REPO / "configs" / "tiny.yaml")]
    for item in settings:
        command += ["--set", item]
    check(subprocess.run(command, capture_output=True, text=True, env=WORKER_ENV, timeout=600))
    return root, settings


def test_eval_interval_logs_eval_metrics(megatron_run):
    root, _ = megatron_run
    rows = read_metrics(root / "run")
    assert [row["step"] for row in rows] == [1, 2]
    assert not any(key.startswith("eval/") for key in rows[0])
    report = json.loads((root / "run" / "eval" / "step_0000002.json").read_text())
    assert len(report["generations"]) == 5
    metrics = number_metrics([last_number(r["generation"]) for r in report["generations"]],
                             [5, 7, -3, 1200, 90])
    for name in METRICS:
        logged, recomputed = rows[1][f"eval/{name}"], metrics[name]
        assert logged == pytest.approx(recomputed, nan_ok=True), name


_LOAD_AND_EVALUATE = """
import sys, torch
from token_objectives.cli import main
from token_objectives.training.evaluation_checkpoint import load_megatron_checkpoint
checkpoint, config, weights, *argv = sys.argv[1:]
overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
model = load_megatron_checkpoint(checkpoint, config, overrides).model
torch.save({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
            and "_extra_state" not in k}, weights)
sys.exit(main(["evaluate", "--checkpoint", checkpoint, "--config", config, *argv]))
"""


# The dist checkpoint stacks the layers ([L, ...]) under Transformer Engine's names.
_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _saved_tensor(saved: dict, key: str) -> torch.Tensor:
    """A GPTModel state_dict key's tensor in a dcp_to_torch_save'd Megatron checkpoint."""
    if key in saved:
        return saved[key]
    layer = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
    if layer is None:
        raise KeyError(key)
    name = _TE_NAMES.get(layer[2], layer[2])
    return saved[f"decoder.layers.{name}"][int(layer[1])]


def test_evaluate_a_megatron_checkpoint_reads_its_weights_and_gives_the_in_loop_answers(
        megatron_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, settings = megatron_run
    command = [sys.executable, "-c", _LOAD_AND_EVALUATE, str(root / "run"),
               str(REPO / "configs" / "tiny.yaml"), str(tmp_path / "loaded.pt"),
               "--data", str(root / "eval.jsonl"), "--out", str(tmp_path / "m.json"),
               "--max-new-tokens", "4", "--batch-size", "3", "--no-progress"]
    for item in settings:
        command += ["--set", item]
    done = check(subprocess.run(command, capture_output=True, text=True, env=WORKER_ENV,
                                timeout=300))
    assert "| exact_accuracy |" in done.stdout
    # Read at TP = 1 from a TP = 2 checkpoint: every weight as saved (global layout).
    dcp_to_torch_save(root / "run" / "checkpoints" / "step_0000002", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    loaded = torch.load(tmp_path / "loaded.pt")
    assert len(loaded) > 5
    for key, value in loaded.items():
        torch.testing.assert_close(value, _saved_tensor(saved, key), rtol=0, atol=0, msg=key)
    ours = json.loads((tmp_path / "m.json").read_text())
    loop = json.loads((root / "run" / "eval" / "step_0000002.json").read_text())
    assert [r["generation"] for r in ours["generations"]] == [
        r["generation"] for r in loop["generations"]]
    assert ours["metrics"] == pytest.approx(loop["metrics"], nan_ok=True)


def test_eval_settings_are_checked():
    with pytest.raises(ValueError, match=r"train\.eval_interval needs data\.eval_data"):
        load_config(None, ["train.eval_interval=5"])
    with pytest.raises(ValueError, match=r"not supported with parallel\.pipeline > 1"):
        load_config(None, ["train.eval_interval=5", "data.eval_data=x.jsonl",
                           "parallel.pipeline=2"])
    with pytest.raises(ValueError,
                       match=r"train\.eval_max_new_tokens: expected an int >= 1, got 0"):
        load_config(None, ["train.eval_max_new_tokens=0"])
    with pytest.raises(ValueError, match="eval_intervals"):
        load_config(None, ["train.eval_intervals=5"])


def test_evaluate_with_another_model_s_config_says_so_not_corrupt(megatron_run, tmp_path):
    root, settings = megatron_run
    command = [sys.executable, "-m", "token_objectives.cli", "evaluate",
               "--checkpoint", str(root / "run"), "--config", str(REPO / "configs" / "tiny.yaml"),
               "--data", str(root / "eval.jsonl"), "--out", str(tmp_path / "m.json"),
               "--no-progress"]
    for item in (*settings, "model.hidden_size=128"):
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, env=WORKER_ENV, timeout=300)
    assert done.returncode != 0
    assert "describes another model than checkpoint" in done.stderr
    assert "model.hidden_size: 64 in the checkpoint, 128 now" in done.stderr
    assert "corrupt" not in done.stderr and "delete" not in done.stderr
