"""The objectives experiment (launch/objectives_experiment.py, docs/experiments/README.md): its
task split, its statistics, its pipeline end to end (--quick: the files and fields, not the
science), and the committed results as the docs page shows them."""

from __future__ import annotations

import itertools
import json
import math
import struct

import pytest
import torch
from doc_blocks import ROOT, doc_block, run_block, substituted

from token_objectives.experiments import report
from token_objectives.experiments.arithmetic import Problem, held_out, training_batches
from token_objectives.experiments.run import (
    ARMS,
    Settings,
    build_model,
    build_objective,
    encode_batch,
    score,
)
from token_objectives.experiments.statistics import paired_difference, verdict
from token_objectives.experiments.vocabularies import vocabulary

RESULTS = ROOT / "docs" / "experiments" / "results.json"
PAGE = ROOT / "docs" / "experiments" / "README.md"


def _drawn(seed: int, excluded: set[Problem]) -> list[Problem]:
    return [p for batch in itertools.islice(training_batches(seed, 64, excluded), 300)
            for p in batch]


def test_no_held_out_problem_is_trained_on_and_seeds_share_their_batches():
    test = held_out(250)
    assert len(test) == 500 and {p.op for p in test} == {"+", "*"}
    excluded = set(test)
    seen = _drawn(1, excluded)
    assert len(seen) == 300 * 64 and not excluded & set(seen)
    # Unfiltered, the same draws hit the held-out problems (a quarter of the 1,000 products).
    assert len(excluded & set(_drawn(1, set()))) > 100
    assert seen == _drawn(1, excluded) and seen != _drawn(2, excluded)
    assert held_out(250) == test


def test_the_digit_and_llama3_tokenizations():
    digits, llama3 = vocabulary("digits"), vocabulary("llama3")
    problem = Problem(123, "+", 4567)
    ids, answer_start = digits.encode_problem(problem)
    assert digits.decode(ids[:answer_start]) == "123+4567=" and ids[-1] == digits.eod
    assert digits.decode(ids[answer_start:-1]) == "4690"
    assert digits.numbers().mode == "digit"
    ids, answer_start = llama3.encode_problem(problem)
    # Llama-3 groups digits in threes from the left: 4567 -> 456|7, 4690 -> 469|0.
    assert [llama3.decode([i]) for i in ids[:-1]] == ["123", "+", "456", "7", "=", "469", "0"]
    assert answer_start == 5
    table = llama3.numbers()
    assert table.mode == "groups" and table.by_digit_count() == {1: 10, 2: 100, 3: 1000}


def test_the_labels_are_the_answer_and_its_end():
    vocab = vocabulary("digits")
    input_ids, labels = encode_batch(vocab, [Problem(2, "*", 3), Problem(10, "+", 990)])
    assert input_ids.shape == labels.shape == (2, 12)  # "10+990=1000" and its end
    assert vocab.decode([i for i in labels[0].tolist() if i != -100]) == "6"
    assert labels[0].tolist().count(vocab.eod) == 1 and labels[0, 4:].tolist()[:2] == [
        vocab.encode("6")[0], vocab.eod]
    assert vocab.decode([i for i in labels[1].tolist() if i != -100]) == "1000"


def test_every_arm_of_a_seed_starts_from_the_same_weights():
    """Building an arm's objective (its tables, PDL's frequency sample) draws nothing from
    torch's generator: the model made after it is the same for every arm."""
    vocab, settings = vocabulary("digits"), Settings.quick()
    excluded = set(held_out(settings.held_out_per_operator))
    made = []
    for arm in ("CE", "CE + PDL", "CE + Gaussian"):
        build_objective(arm, vocab, excluded)
        made.append(build_model(vocab, settings, seed=3).state_dict())
    for other in made[1:]:
        assert all(torch.equal(made[0][k], other[k]) for k in made[0])
    assert not torch.equal(build_model(vocab, settings, seed=4).state_dict()[
        "model.embed_tokens.weight"], made[0]["model.embed_tokens.weight"])


def test_the_answer_ce_is_hf_loss_on_the_answer_labels():
    """score's teacher-forced CE shifts as Hugging Face's own causal-LM loss does."""
    vocab, settings = vocabulary("digits"), Settings.quick()
    model = build_model(vocab, settings, seed=1)
    problems = held_out(settings.held_out_per_operator)[:16]
    input_ids, labels = encode_batch(vocab, problems)
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=labels).loss.item()
    deciles = torch.ones(vocab.size, dtype=torch.long)
    scored = score(model, vocab, problems, deciles)
    assert scored["valid_ce"] == pytest.approx(expected, rel=1e-5)
    assert scored["valid_ce_per_decile"]["1"] == pytest.approx(expected, rel=1e-5)


def test_the_paired_interval_is_students_t():
    # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653 (tables), half width 4.302653 / sqrt 3.
    difference = paired_difference({1: 11.0, 2: 12.0, 3: 13.0, 4: 5.0}, {1: 10, 2: 10, 3: 10})
    assert difference["n"] == 3 and difference["mean"] == pytest.approx(2.0)
    assert difference["high"] - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert difference["low"] == pytest.approx(2.0 - 4.302653 / math.sqrt(3), rel=1e-6)
    assert difference["per_seed"] == {"1": 1.0, "2": 2.0, "3": 3.0}
    assert verdict(difference, lower_is_better=True) == "unclear"
    clear = paired_difference({1: 1.0, 2: 1.1, 3: 0.9}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert verdict(clear, lower_is_better=True) == "worse"
    assert verdict(clear, lower_is_better=False) == "better"


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", header[16:24])


def test_the_quick_run_writes_every_file_and_field(tmp_path):
    """The docs' command with --quick instead of the measured sizes, into a copy of the page."""
    page = tmp_path / "page.md"
    page.write_text(f"before\n{report.RESULTS_BEGIN}\nold\n{report.RESULTS_END}\nafter\n")
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    command = substituted(doc_block("objectives-experiment").text, {
        "--output-dir docs/experiments": f"--quick --output-dir {tmp_path / 'out'}",
        "--docs-page docs/experiments/README.md": f"--docs-page {page}"})
    run_block("bash", command, tmp_path, timeout=600)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert {(r["vocabulary"], r["arm"]) for r in runs} == {
        *(("digits", arm) for arm in ARMS), ("llama3", "CE"), ("llama3", "CE + NTL-WAS")}
    assert sorted({r["seed"] for r in runs}) == [1, 2] and len(runs) == 14
    for row in runs:
        for metric in ("exact_accuracy", "mae", "digit_error", "no_number_rate"):
            assert 0 <= row["metrics"][metric] or math.isnan(row["metrics"][metric]), row
        assert set(row["by_operator"]) == {"+", "*"}
        assert row["curve"]["step"][-1] == row["settings"]["steps"]
        assert len(row["curve"]["ce"]) == len(row["curve"]["step"]) == len(row["curve"]["ntl"])
        assert set(row["valid_ce_per_decile"]) == {str(d) for d in range(1, 11)}
    compared = {(d["vocabulary"], d["arm"], d["metric"]) for d in results["differences"]}
    assert compared == {(v, a, m) for v, a in report.arms_of(runs) if a != "CE"
                        for m in report.COMPARED}
    for d in results["differences"]:
        # MAE and digit error need a parsed number, which a 20-step model may not write.
        assert d["n"] == 2 if d["metric"] in ("exact_accuracy", "valid_ce") else d["n"] <= 2
        assert len(d["per_seed"]) == d["n"]
        if math.isfinite(d["low"]):
            assert d["low"] <= d["mean"] <= d["high"], d
    assert results["command"].startswith("python launch/objectives_experiment.py")
    assert results["interval"] and results["seconds"] > 0
    table = (out / "results.md").read_text().strip()
    assert table == report.markdown(results)
    assert page.read_text() == (f"before\n{report.RESULTS_BEGIN}\n{table}\n{report.RESULTS_END}"
                                f"\nafter\n")
    for name in ("learning_curves.png", "differences.png"):
        width, height = _png_size(out / name)
        assert width > 600 and height > 300, (name, width, height)
        (out / name).unlink()
    # --render remakes the table and the figures from results.json alone.
    (out / "results.md").unlink()
    run_block("bash", f"python launch/objectives_experiment.py --render --output-dir {out}",
              tmp_path)
    assert (out / "results.md").read_text().strip() == table
    assert all((out / name).is_file() for name in ("learning_curves.png", "differences.png"))


def test_the_page_shows_the_committed_results():
    """The table in docs/experiments/README.md is made from the committed results.json, whose
    CE baseline answers at least 30% of the held-out problems exactly."""
    results = json.loads(RESULTS.read_text())
    assert report.block_of(PAGE) == report.markdown(results)
    ce = [r["metrics"]["exact_accuracy"] for r in results["runs"]
          if r["vocabulary"] == "digits" and r["arm"] == "CE"]
    assert len(ce) >= 5 and sum(ce) / len(ce) >= 0.30
    for name in ("learning_curves.png", "differences.png"):
        assert _png_size(RESULTS.parent / name)[0] > 600
