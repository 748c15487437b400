"""The Megatron integration without a training run: loss_func's contract, CLI arguments, the
objective tables, config validation, and the 3B config's size."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from token_objectives import Objective, ObjectiveConfig
from token_objectives.integrations.megatron.hook import (
    LossComponents,
    Objectives,
    add_objective_args,
    components_of,
    loss_func,
    objective_config_from_args,
)
from token_objectives.tables.frequencies import save_frequencies
from token_objectives.training.config import RunConfig, load_config, padded_vocab_size

REPO = Path(__file__).resolve().parents[1]


def _output(b: int = 2, s: int = 5, with_parts: bool = True):
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(b, s, generator=gen) * 3
    if with_parts:
        ntl = torch.rand(b, s, generator=gen) * (torch.rand(b, s, generator=gen) > 0.5)
        parts = LossComponents(ce=loss * 0.9, ce_part=loss - 0.3 * ntl, ntl=ntl,
                               is_number=ntl > 0, weight=torch.full((b, s), 1.5))
        loss.token_objectives_components = parts
    return loss


def test_loss_func_returns_sums_and_counts():
    loss = _output()
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float)
    total, tokens, report = loss_func(mask, loss)
    assert tokens.dtype == torch.int and tokens.item() == 7
    torch.testing.assert_close(total, (loss * mask).sum())
    parts = components_of(loss)
    numbers = (parts.is_number.float() * mask).sum()
    torch.testing.assert_close(report["lm loss"], torch.stack([(loss * mask).sum(), mask.sum()]))
    torch.testing.assert_close(report["ntl"],
                               torch.stack([(parts.ntl * mask).sum(), numbers]))
    # A count is reported as [count * R, 1] (R = 1 here): it sums to the step's count.
    torch.testing.assert_close(report["number tokens"], torch.stack([numbers, torch.tensor(1.)]))
    torch.testing.assert_close(report["counted tokens"], torch.tensor([7.0, 1.0]))
    torch.testing.assert_close(report["number token share"], torch.stack([numbers, mask.sum()]))
    torch.testing.assert_close(report["pdl weight"], torch.stack([1.5 * mask.sum(), mask.sum()]))
    # Over a step of 4 reports each count is scaled by 4, so their pairs sum to [4 n, 4].
    _, _, of_four = loss_func(mask, loss, reports_per_step=4)
    torch.testing.assert_close(of_four["number tokens"], torch.stack([4 * numbers,
                                                                      torch.tensor(1.)]))
    assert of_four["number token share"].tolist() == report["number token share"].tolist()
    # The components add up: lm loss = ce part + 0.3 * ntl part.
    ce_part, ntl_part = report["ce part"], report["ntl part"]
    torch.testing.assert_close(report["lm loss"][0], ce_part[0] + 0.3 * ntl_part[0])


def test_loss_func_without_components_reports_lm_loss_only():
    total, tokens, report = loss_func(torch.ones(2, 5), _output(with_parts=False))
    assert set(report) == {"lm loss"} and tokens.item() == 10


def test_megatron_lm_arguments():
    parser = add_objective_args(argparse.ArgumentParser())
    args = parser.parse_args(["--ntl", "mse", "--ntl-weight", "0.5", "--pdl-alpha", "0.2",
                              "--pdl-frequencies", "f.safetensors", "--number-tokens", "multi"])
    config = objective_config_from_args(args)
    assert (config.ntl, config.ntl_weight, config.pdl_alpha) == ("mse", 0.5, 0.2)
    assert args.pdl_frequencies == "f.safetensors" and args.number_tokens == "multi"
    ce_only = objective_config_from_args(parser.parse_args(["--ntl", "none"]))
    assert ce_only.ntl is None and ce_only.pdl_alpha == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--ntl", "cosine"])


def test_frequency_table_of_another_size_is_a_clear_error(tmp_path):
    path = tmp_path / "freqs.safetensors"
    save_frequencies(path, np.ones(400, dtype=np.int64), tokenizer_identity="x")
    with pytest.raises(ValueError, match=r"400.*512|512.*400"):
        Objectives.build(ObjectiveConfig(ntl=None, pdl_alpha=0.5), padded_vocab_size=512,
                         frequencies_path=str(path))


def test_pdl_without_a_table_and_ntl_without_a_tokenizer_are_errors():
    with pytest.raises(ValueError, match="count-frequencies --vocab-size 512"):
        Objectives.build(ObjectiveConfig(ntl=None, pdl_alpha=0.5), padded_vocab_size=512)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        Objectives.build(ObjectiveConfig(ntl="was"), padded_vocab_size=512)
    with pytest.raises(ValueError, match="pdl_normalization='token'"):
        Objectives(Objective(ObjectiveConfig(ntl=None, pdl_alpha=0.5,
                                             pdl_normalization="weighted_mean"),
                             None, torch.ones(4)))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hidden'\] in config section "
                                         r"'model'; valid keys"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.hidden=3"])
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['optim'\]"):
        load_config(None, ["optim.lr=1"])
    with pytest.raises(ValueError, match="unknown objective option|unknown key"):
        load_config(None, ["objectives.ntl_wieght=1"])
    with pytest.raises(ValueError, match="train.lr: expected a number > 0, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3


def test_tp_that_does_not_divide_the_heads_is_a_clear_error():
    from token_objectives.training.megatron import transformer_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", ["parallel.tensor=3"])
    with pytest.raises(ValueError, match="tensor-parallel size 3 does not divide the 4 attention"):
        transformer_config(cfg)


def test_ce_only_is_one_setting_away():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["objectives.ntl=null", "objectives.pdl_alpha=0"])
    assert cfg.objectives.ntl is None and cfg.objectives.pdl_alpha == 0
    assert isinstance(cfg, RunConfig)


def test_padded_vocab_size_follows_megatron():
    assert padded_vocab_size(128256, 128, 1) == 128256
    assert padded_vocab_size(128256, 128, 2) == 128256
    assert padded_vocab_size(500, 128, 2) == 512
    assert padded_vocab_size(513, 128, 4) == 1024


COUNT = """
import tempfile, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from token_objectives.training.megatron import count_parameters
from token_objectives.training.config import load_config
print(count_parameters(load_config({path!r})))
"""


def test_3b_config_has_3_21b_parameters_counted_on_meta():
    path = REPO / "configs" / "llama3.2-3b.yaml"
    done = subprocess.run([sys.executable, "-c", COUNT.format(path=str(path))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    count = int(done.stdout.strip().splitlines()[-1])
    # Llama-3.2-3B: tied 128256 x 3072 embedding + 28 layers of (GQA attention + SwiGLU MLP).
    layer = 2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072
    expected = 128256 * 3072 + 28 * layer + 3072
    assert count == expected
    assert abs(count - 3.21e9) / 3.21e9 < 0.01


def test_latest_complete_step_and_pruning(tmp_path):
    from token_objectives.training import checkpointing

    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        directory = checkpointing.step_dir(tmp_path, step)
        directory.mkdir()
        if complete:
            (directory / checkpointing.COMPLETE_MARKER).write_text("{}")
    (tmp_path / "step_0000010.partial").mkdir()
    assert checkpointing.latest_complete_step(tmp_path) == 6
    checkpointing._remove_old(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000004", "step_0000006", "step_0000008", "step_0000010.partial"]
