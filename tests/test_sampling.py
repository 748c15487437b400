"""Batch-scheduled sampling: the vocab-parallel choice (TP = 1, 2, 4 over real gloo processes),
the sampling distribution, the schedules, the eligibility and mixing rules, and the configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from dist_pool import counted_collectives, tp_group

from token_objectives.ops.sampling import (
    counter_uniform,
    deterministic_log,
    stream_seed,
    vocab_parallel_argmax,
    vocab_parallel_sample,
)
from token_objectives.scheduled_sampling.mix import (
    ScheduledSampler,
    eligible_inputs,
    mix_inputs,
    sample_indices,
    select_inputs,
)
from token_objectives.scheduled_sampling.schedule import ScheduledSamplingConfig

TP_SIZES = (1, 2, 4)

# ------------------------------------------------------------------------------- the cases


def _tie_logits(dtype: torch.dtype) -> torch.Tensor:
    """[12, 16] with exact ties inside shards and across the TP=2 / TP=4 shard boundaries."""
    torch.manual_seed(0)
    logits = torch.randn(12, 16)
    logits[0, [3, 4]] = 5.0  # across the TP=4 boundary 3|4
    logits[1, [7, 8]] = 5.0  # across the TP=2 and TP=4 boundary 7|8
    logits[2, [1, 12]] = 5.0  # in different shards at TP=2 and TP=4
    logits[3, [11, 12, 14]] = 5.0  # 12 and 14 are padding for some real_vocab
    logits[4] = 1.5  # every id ties
    logits[5] = -0.0
    logits[5, 9] = 0.0  # -0.0 and +0.0 are equal: the lowest id wins
    logits[6, [9, 10, 11]] = 4.0
    logits[7, [0, 15]] = 6.0
    logits[8, 12:] = 50.0  # far above the rest: the padding columns when real_vocab <= 12
    logits[9] = float("-inf")
    logits[9, [6, 14]] = -1e30
    logits[10] = -7.0
    logits[10, [5, 11]] = -3.25
    return logits.to(dtype)


def _random_logits(dtype: torch.dtype, rows: int = 40, vocab: int = 64) -> torch.Tensor:
    torch.manual_seed(1)
    logits = (torch.randn(2, rows // 2, vocab) * 2).to(dtype)  # [b, s, V]: any leading shape
    logits[..., vocab - 5:] = 100.0  # padding: chosen if padding were not excluded
    return logits


def _shard(full: torch.Tensor, tp_size: int, rank: int) -> torch.Tensor:
    width = full.shape[-1] // tp_size
    return full[..., rank * width:(rank + 1) * width].contiguous()


def choose_on_shards(tp_size: int, cases: list[dict]) -> list[dict]:
    """On every worker: argmax and sample of each case on this rank's shard, collectives counted."""
    group = tp_group(tp_size)
    rank = dist.get_rank(group) if group is not None else 0
    out = []
    with counted_collectives() as counter:
        for case in cases:
            local = _shard(case["logits"], tp_size, rank)
            counter.clear()
            argmax = vocab_parallel_argmax(local, group, real_vocab=case["real_vocab"])
            argmax_calls = dict(counter)
            counter.clear()
            sample = vocab_parallel_sample(local, case["temperature"], case["seed"], group,
                                           positions=case.get("positions"),
                                           real_vocab=case["real_vocab"],
                                           chunk_elements=case.get("chunk", 1 << 22))
            out.append({"argmax": argmax, "sample": sample, "argmax_calls": argmax_calls,
                        "sample_calls": dict(counter)})
    return out


def _cases() -> list[dict]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for real in (16, 13, 12):
            cases.append({"name": f"ties-{dtype}-{real}", "logits": _tie_logits(dtype),
                          "real_vocab": real, "temperature": 0.5, "seed": 11})
        cases.append({"name": f"random-{dtype}", "logits": _random_logits(dtype),
                      "real_vocab": 59, "temperature": 1.3, "seed": 12,
                      "positions": torch.arange(40).reshape(2, 20) * 7 + 1000})
        # Chunks of 5 elements: one column per chunk, rows in chunks of 5.
        cases.append({"name": f"chunked-{dtype}", "logits": _random_logits(dtype),
                      "real_vocab": 59, "temperature": 0.8, "seed": 13, "chunk": 5})
    return cases


@pytest.fixture(scope="module")
def chosen(pool4):
    cases = _cases()
    return cases, {tp: pool4.run(choose_on_shards, tp, cases) for tp in TP_SIZES}


def test_argmax_matches_torch_argmax_at_every_tp_size(chosen):
    cases, by_tp = chosen
    for index, case in enumerate(cases):
        full = case["logits"].float()[..., :case["real_vocab"]]
        expected = full.argmax(dim=-1)  # torch's rule: the first (lowest) index among ties
        for tp, per_rank in by_tp.items():
            for rank_result in per_rank:
                got = rank_result[index]["argmax"]
                assert torch.equal(got, expected), (case["name"], tp, got, expected)


def test_tie_rows_pick_the_lowest_global_id(chosen):
    cases, by_tp = chosen
    case_index = next(i for i, c in enumerate(cases) if c["name"] == "ties-torch.float32-13")
    got = by_tp[4][0][case_index]["argmax"]
    assert got[:11].tolist() == [3, 7, 1, 11, 0, 0, 9, 0, 12, 6, 5]
    only_real = by_tp[4][0][case_index + 1]["argmax"]  # real_vocab 12: shard 3 is all padding
    assert only_real[8].item() < 12 and only_real[3].item() == 11


def test_sample_is_the_same_at_every_tp_size(chosen):
    cases, by_tp = chosen
    for index, case in enumerate(cases):
        reference = by_tp[1][0][index]["sample"]
        assert reference.shape == case["logits"].shape[:-1]
        assert int(reference.max()) < case["real_vocab"], case["name"]
        for tp, per_rank in by_tp.items():
            for rank_result in per_rank:
                assert torch.equal(rank_result[index]["sample"], reference), (case["name"], tp)


def test_sample_differs_from_argmax_somewhere(chosen):
    # At temperature ~1 on random logits, sampling must not collapse to the greedy choice.
    cases, by_tp = chosen
    index = next(i for i, c in enumerate(cases) if c["name"] == "random-torch.float32")
    result = by_tp[2][0][index]
    assert (result["sample"] != result["argmax"]).float().mean() > 0.2


def test_one_all_reduce_per_choice(chosen):
    _, by_tp = chosen
    for tp, per_rank in by_tp.items():
        expected = {} if tp == 1 else {"all_reduce": 1}
        for rank_result in per_rank:
            for item in rank_result:
                assert item["argmax_calls"] == expected, (tp, item["argmax_calls"])
                assert item["sample_calls"] == expected, (tp, item["sample_calls"])


# ------------------------------------------------------------------------ the distribution


def _chi_square(draws: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(draws, minlength=probs.numel()).double()
    expected = probs.double() * draws.numel()
    return float(((observed - expected) ** 2 / expected).sum())


# chi-square critical value for 5 degrees of freedom at p = 0.001
CHI2_5DOF_999 = 20.52


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_follows_softmax_over_temperature(temperature):
    z = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    draws = vocab_parallel_sample(z.expand(30000, 6), temperature, seed=2024)
    assert _chi_square(draws, torch.softmax(z / temperature, -1)) < CHI2_5DOF_999
    # The check has power: the distribution of another temperature is rejected.
    assert _chi_square(draws, torch.softmax(z / (temperature * 1.5), -1)) > 5 * CHI2_5DOF_999


def test_sample_changes_with_the_seed_and_position_only():
    z = torch.zeros(5000, 8)
    a = vocab_parallel_sample(z, 1.0, seed=1)
    b = vocab_parallel_sample(z, 1.0, seed=2)
    assert (a != b).float().mean() > 0.8  # 7/8 expected for uniform draws
    assert torch.equal(a, vocab_parallel_sample(z, 1.0, seed=1))
    # A row's draw depends on its position counter, not on where the row sits in the batch.
    positions = torch.arange(5000)
    picked = torch.tensor([4999, 17, 256])
    again = vocab_parallel_sample(z[picked], 1.0, seed=1, positions=positions[picked])
    assert torch.equal(again, a[picked])


def test_counter_uniform_is_uniform_and_layout_free():
    u = counter_uniform(7, torch.arange(400), torch.arange(500))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.002 and abs(u.std().item() - 12 ** -0.5) < 0.002
    # Same values for a sub-block of rows and columns (any chunking or sharding).
    block = counter_uniform(7, torch.arange(100, 150), torch.arange(250, 500))
    assert torch.equal(block, u[100:150, 250:500])
    # Neighbouring rows and columns are not correlated.
    corr = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    assert abs(corr) < 0.01


def test_deterministic_log_is_accurate():
    x = torch.cat([torch.rand(100000) * 50 + 1e-20, torch.tensor([2.0 ** -24, 1 - 2.0 ** -24])])
    torch.testing.assert_close(deterministic_log(x).double(), torch.log(x.double()),
                               rtol=3e-7, atol=1e-7)


def test_stream_seed_separates_streams():
    seeds = {stream_seed(1234, step, name) for step in range(50) for name in ("a", "b")}
    assert len(seeds) == 100
    assert stream_seed(1234, 3, "a") == stream_seed(1234, 3, "a")


def test_bad_temperature_is_named():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_sample(torch.zeros(2, 4), 0.0, seed=1)


# ------------------------------------------------------------------------------- schedules


def _config(**values) -> ScheduledSamplingConfig:
    return ScheduledSamplingConfig(enabled=True, **values)


def test_constant_schedule_with_warmup():
    config = _config(schedule="constant", max_p=0.3, warmup_steps=5)
    assert [config.probability(s) for s in (0, 4, 5, 6, 10_000)] == [0, 0, 0.3, 0.3, 0.3]


def test_linear_schedule():
    # eps_i = max(1 - max_p, k - c i), p = 1 - eps; i = step - warmup.
    config = _config(schedule="linear", max_p=0.5, warmup_steps=10, c=0.01)
    expected = {9: 0.0, 10: 0.0, 20: 0.1, 35: 0.25, 60: 0.5, 1000: 0.5}
    for step, p in expected.items():
        assert config.probability(step) == pytest.approx(p, abs=1e-12), step
    shifted = _config(schedule="linear", max_p=0.5, c=0.01, k=1.2)  # eps > 1 until i = 20
    assert shifted.probability(10) == 0.0 and shifted.probability(20) == pytest.approx(0.0)
    assert shifted.probability(40) == pytest.approx(0.2)


def test_exponential_schedule():
    config = _config(schedule="exponential", max_p=1.0, k=0.9)
    assert config.probability(0) == 0.0  # eps_0 = k**0 = 1
    assert config.probability(1) == pytest.approx(0.1)
    assert config.probability(2) == pytest.approx(0.19)
    assert config.probability(10) == pytest.approx(0.6513215599)  # 1 - 0.9**10
    capped = _config(schedule="exponential", max_p=0.5, k=0.9, warmup_steps=3)
    assert capped.probability(2) == 0.0 and capped.probability(4) == pytest.approx(0.1)
    assert capped.probability(13) == 0.5


def test_inverse_sigmoid_schedule():
    config = _config(schedule="inverse_sigmoid", max_p=0.9, k=10.0, warmup_steps=2)
    assert config.probability(1) == 0.0
    assert config.probability(2) == pytest.approx(1 / 11)  # eps_0 = k / (k + 1)
    assert config.probability(12) == pytest.approx(0.2137302)  # 1 - 10 / (10 + e)
    assert config.probability(2 + 10 * 5) == pytest.approx(0.9)  # 0.937 capped at max_p
    assert config.probability(10 ** 9) == 0.9  # no overflow far out


def test_disabled_is_always_zero():
    config = ScheduledSamplingConfig(enabled=False, max_p=1.0)
    assert all(config.probability(s) == 0.0 for s in (0, 1, 10 ** 6))


@pytest.mark.parametrize(("values", "message"), [
    ({"schedule": "linear"}, "linear needs c > 0"),
    ({"schedule": "exponential", "k": 1.5}, "0 < k < 1"),
    ({"schedule": "inverse_sigmoid", "k": 0.5}, "k >= 1"),
    ({"schedule": "constant", "k": 2.0}, "takes no k or c"),
    ({"schedule": "cosine"}, "schedule: expected one of 'constant', 'linear'"),
    ({"mode": "top_k"}, "mode: expected one of 'argmax', 'sample', got 'top_k'"),
    ({"max_p": 1.5}, r"max_p: expected a number in \[0, 1\], got 1.5"),
    ({"temperature": 0.0}, "temperature: expected a number > 0, got 0.0"),
])
def test_bad_schedule_settings_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        _config(**values)


# ---------------------------------------------------------------------- eligibility, mixing

EOD = 2


def test_eligible_inputs_rules():
    tokens = torch.tensor([[5, 6, 2, 7, 8, 9, 10, 11],
                           [2, 5, 6, 7, 2, 2, 8, 9]])
    loss_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1],
                              [1, 1, 1, 1, 1, 1, 1, 0]])
    expected = torch.tensor([
        # pos 0 | 2 is EOD | 3 follows EOD | 5, 6: loss_mask[4], [5] are 0
        [0, 1, 0, 0, 1, 0, 0, 1],
        # pos 0 | 1 follows EOD | 4, 5 EOD | 6 follows EOD
        [0, 0, 1, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(eligible_inputs(tokens, EOD, loss_mask), expected)
    no_mask = eligible_inputs(tokens, EOD)
    assert no_mask[0, 5] and no_mask[0, 6]
    assert not eligible_inputs(tokens, EOD, pad_id=9)[0, 5]


def test_eligible_inputs_count_a_label_as_the_loss_does():
    """The label counts where loss_mask != 0 (ObjectiveOutput.counted), whatever its value."""
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    loss_mask = torch.tensor([[1.0, 0.5, -1.0, 0.0, 1.0]])
    expected = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(eligible_inputs(tokens, None, loss_mask), expected)


def _known_logits(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits [b, s, V] whose argmax at each position is (7 * token + 3) % vocab, or EOD where
    the token is 8."""
    target = (tokens * 7 + 3) % vocab
    target[tokens == 8] = EOD
    logits = torch.randn(*tokens.shape, vocab, generator=torch.Generator().manual_seed(0))
    logits.scatter_(-1, target[..., None], 10.0)
    return logits


def test_p1_replaces_every_eligible_input_and_nothing_else():
    vocab = 32
    tokens = torch.tensor([[5, 6, 2, 7, 8, 9, 10, 11, 12, 13],
                           [4, 2, 5, 6, 7, 12, 8, 3, 2, 9]])
    loss_mask = torch.ones_like(tokens)
    loss_mask[1, 3] = 0
    logits = _known_logits(tokens, vocab)
    sampler = ScheduledSampler(_config(schedule="constant", max_p=1.0), run_seed=1, eod=EOD,
                               real_vocab=vocab)
    predictions = sampler.predict(logits, None, step=0, sample_ids=torch.tensor([0, 1]))
    assert torch.equal(predictions, logits.argmax(-1))
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": loss_mask}
    mixed, counts = sampler.mix(batch, predictions, step=0, sample_ids=torch.tensor([0, 1]))
    eligible = eligible_inputs(tokens, EOD, loss_mask)
    guessed = torch.cat([tokens[:, :1], predictions[:, :-1]], dim=1)
    inserted = eligible & (guessed != EOD)
    assert torch.equal(mixed["tokens"][inserted], guessed[inserted])
    assert torch.equal(mixed["tokens"][~inserted], tokens[~inserted])
    assert mixed["labels"] is batch["labels"] and mixed["loss_mask"] is loss_mask
    # Input 5 of row 0 follows token 8, whose prediction is EOD: the truth stays.
    assert eligible[0, 5] and mixed["tokens"][0, 5] == 9
    # Input 4 of row 1 is not eligible: loss_mask[1, 3] = 0.
    assert not eligible[1, 4] and mixed["tokens"][1, 4] == 7
    n_eligible, n_replaced, n_changed, n_all = counts.tolist()
    assert (n_eligible, n_replaced, n_all) == (eligible.sum(), inserted.sum(), tokens.numel())
    assert n_changed == (mixed["tokens"] != tokens).sum()


def test_p0_and_disabled_leave_the_tokens():
    tokens = torch.randint(3, 30, (3, 12))
    predictions = torch.randint(3, 30, (3, 12))
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    mixed, replaced = mix_inputs(tokens, predictions, nothing, EOD)
    assert torch.equal(mixed, tokens) and not replaced.any()
    sampler = ScheduledSampler(_config(max_p=0.0), run_seed=1, eod=EOD, real_vocab=32)
    mixed, counts = sampler.mix({"tokens": tokens}, predictions, 0, torch.arange(3))
    assert torch.equal(mixed["tokens"], tokens) and counts[1] == 0


def test_selection_rate_and_layout_independence():
    positions = torch.arange(200_000)
    selected = select_inputs(0.3, seed=5, positions=positions)
    assert abs(selected.float().mean().item() - 0.3) < 0.005
    # A token's draw depends on its global counter only.
    picked = torch.tensor([[199_999, 3], [77, 123_456]])
    assert torch.equal(select_inputs(0.3, 5, picked), selected[picked])
    assert select_inputs(1.0, 5, positions).all()
    assert not select_inputs(0.0, 5, positions).any()
    assert (select_inputs(0.3, 6, positions) != selected).any()


def test_sample_indices_follow_micro_batches():
    from token_objectives.training.gpt_data import micro_batches

    class Numbered:
        def __getitem__(self, index):
            row = torch.full((4,), index)
            return {"tokens": row, "labels": row, "loss_mask": row, "position_ids": row}

    for step, mbs, dp_size, num_micro in ((0, 2, 1, 4), (3, 2, 2, 2), (5, 1, 4, 3)):
        for dp_rank in range(dp_size):
            batches = list(micro_batches(Numbered(), step, mbs, dp_rank, dp_size, num_micro))
            expected = torch.stack([b["tokens"][:, 0] for b in batches])
            assert torch.equal(sample_indices(step, mbs, dp_rank, dp_size, num_micro), expected)


# ------------------------------------------------------------------------------------ configs


def test_yaml_section_is_typed_and_closed():
    from token_objectives.training.config import config_from_dict, load_config

    config = config_from_dict({"scheduled_sampling": {
        "enabled": True, "schedule": "linear", "max_p": "2.5e-1", "c": 1, "warmup_steps": 3}})
    assert config.scheduled_sampling.max_p == 0.25 and config.scheduled_sampling.c == 1.0
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['temprature'\] in config section "
                                         r"'scheduled_sampling'"):
        config_from_dict({"scheduled_sampling": {"temprature": 0.7}})
    with pytest.raises(ValueError, match="scheduled_sampling.enabled: expected a bool"):
        config_from_dict({"scheduled_sampling": {"enabled": "yes"}})
    assert not config_from_dict({}).scheduled_sampling.enabled
    from pathlib import Path

    tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert tiny.scheduled_sampling.enabled is False


def test_ds_config_section_is_typed_and_closed():
    from token_objectives.integrations.deepspeed.section import read_section

    def section(values):
        return {"token_objectives": {"ntl": None, "scheduled_sampling": values}}

    parsed = read_section(section({"enabled": True, "schedule": "exponential", "k": 0.99,
                                   "mode": "sample", "temperature": 0.7}))
    sampling = parsed.sampling_config()
    assert sampling.mode == "sample" and sampling.probability(1) == pytest.approx(0.01)
    assert not read_section({"token_objectives": {"ntl": None}}).sampling_config().enabled
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['p'\] in config section "
                                         r"'scheduled_sampling'"):
        read_section(section({"p": 0.2}))
    with pytest.raises(ValueError, match=r"scheduled_sampling.max_p: expected a number in"):
        read_section(section({"max_p": "high"}))
    with pytest.raises(ValueError, match="needs 0 < k < 1"):
        read_section(section({"schedule": "exponential"}))


def test_p_is_logged_even_when_nothing_is_replaced():
    values = ScheduledSampler.log_values(0.0, None)
    assert values == {"sampling/p": 0.0, "sampling/replaced_of_eligible": 0.0,
                      "sampling/replaced_of_all": 0.0, "sampling/changed_of_all": 0.0}
    values = ScheduledSampler.log_values(0.5, torch.tensor([80.0, 40.0, 10.0, 100.0]))
    assert values["sampling/replaced_of_eligible"] == 0.5
    assert values["sampling/replaced_of_all"] == 0.4 and values["sampling/changed_of_all"] == 0.1
    assert math.isclose(values["sampling/p"], 0.5)
