"""docs/deepspeed-own-loop.md: a user's own `deepspeed.initialize` loop with
`objective_from_ds_config`, run as the page prints it.

The block runs unchanged in one process on the CPU (DeepSpeed over gloo, started as the other
DeepSpeed tests start it: `deepspeed.cpu.init_distributed()` first), in a directory whose
data/quickstart/ is the session's quickstart data. A few lines after it save what it trained.
The test then trains the same model from the same seed in plain torch. The shift is a slice
(logits[:, :-1] against labels[:, 1:]), the loss is the float64 reference (tests/reference.py)
divided by the counted tokens, the accumulation is by hand and the optimizer is AdamW. It
compares each micro-batch's loss and the final weights. The section's errors at build time are
checked as well.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from doc_blocks import doc_block
from torchrun_helpers import REPO, WORKER_ENV, check, free_port

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from reference import reference_objective_loss  # noqa: E402

from token_objectives import ObjectiveConfig  # noqa: E402
from token_objectives.objectives.tables import objective_tables  # noqa: E402

# One process of a DeepSpeed run, without the shm op DeepSpeed would JIT-build on a CPU.
PREAMBLE = """\
from token_objectives.integrations.deepspeed.cpu import init_distributed
init_distributed()
"""
# What the block trained, for the plain-torch replay: the micro-batches it drew (its own
# generator, called again), the model's config, the section, the optimizer's settings and the
# final weights.
EPILOGUE = """
torch.save({
    "batches": [(i.cpu(), l.cpu()) for i, l in micro_batches(step + 1, size)],
    "model_config": model.config.to_dict(),
    "section": ds_config["token_objectives"],
    "optimizer": {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"},
    "accumulation": engine.gradient_accumulation_steps(),
    "clipping": engine.gradient_clipping(),
    "weights": {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()},
}, "trained.pt")
"""
LOSS_LINE = re.compile(r"^micro-batch (\d+): loss (\S+)$", re.M)


@pytest.fixture(scope="module")
def own_loop(data, tmp_path_factory):
    """(printed losses, saved run) of the page's block, run in a directory holding
    data/quickstart."""
    work = tmp_path_factory.mktemp("own_loop")
    (work / "data").mkdir()
    (work / "data" / "quickstart").symlink_to(data.tokenizer_path.parent)
    script = work / "train.py"
    script.write_text(PREAMBLE + doc_block("deepspeed-own-loop").text + EPILOGUE)
    env = dict(WORKER_ENV, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(REPO / "plugin"),
                                           os.environ.get("PYTHONPATH", "")]))
    done = check(subprocess.run([sys.executable, str(script)], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300))
    losses = {int(step): float(value) for step, value in LOSS_LINE.findall(done.stdout)}
    return [losses[step] for step in sorted(losses)], torch.load(work / "trained.pt")


def _plain_torch_run(saved: dict, data) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training without DeepSpeed or the door: per micro-batch the float64 reference
    on the sliced shift, / the counted tokens, / the accumulation steps; every `accumulation`
    micro-batches the gradient clipped to the global norm DeepSpeed clips to (1.0 unless the
    ds_config says otherwise) and an AdamW step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    names = {f.name for f in fields(ObjectiveConfig)}
    config = ObjectiveConfig(**{k: v for k, v in saved["section"].items() if k in names})
    model_config = LlamaConfig.from_dict(saved["model_config"])
    numbers, weights = objective_tables(config, data.tokenizer_path, data.frequencies_path,
                                        model_config.vocab_size)
    torch.manual_seed(0)  # the block's seed, right before it builds the model
    model = LlamaForCausalLM(model_config)
    settings = saved["optimizer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"],
                                  betas=settings["betas"], eps=settings["eps"],
                                  weight_decay=settings["weight_decay"])
    accumulation, losses = saved["accumulation"], []
    for index, (input_ids, labels) in enumerate(saved["batches"]):
        logits = model(input_ids=input_ids).logits
        out = reference_objective_loss(logits[:, :-1], labels[:, 1:], config, numbers, weights)
        loss = out.loss.sum() / out.counted.sum()
        (loss / accumulation).backward()
        losses.append(loss.item())
        if (index + 1) % accumulation == 0:
            if saved["clipping"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), saved["clipping"])
            optimizer.step()
            optimizer.zero_grad()
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def test_the_pages_loop_trains_what_plain_torch_trains(own_loop, data):
    losses, saved = own_loop
    assert saved["accumulation"] > 1 and saved["section"]["ntl"] and saved["section"]["pdl_alpha"]
    expected_losses, expected_weights = _plain_torch_run(saved, data)
    assert len(losses) == len(expected_losses) >= 2 * saved["accumulation"]
    assert losses == pytest.approx(expected_losses, rel=1e-6)
    assert saved["weights"].keys() == expected_weights.keys()
    for name, want in expected_weights.items():
        torch.testing.assert_close(saved["weights"][name], want, rtol=1e-4, atol=1e-5,
                                   msg=name)


# ------------------------------------------------------------------ the call's errors and tables


def _section(**values) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "token_objectives": values}


def test_missing_tables_fail_when_built_naming_the_key_and_the_fix(data):
    from token_objectives.integrations.deepspeed import objective_from_ds_config

    with pytest.raises(ValueError, match=r'\.ntl = .was. needs "tokenizer" .*tokenizer=.*'
                                         r'or set "ntl": null'):
        objective_from_ds_config(_section(ntl="was"))
    with pytest.raises(ValueError, match=r'\.pdl_alpha = 0.2 needs "frequencies": .*'
                                         r'count-frequencies.*or set "pdl_alpha": 0'):
        objective_from_ds_config(_section(ntl=None, pdl_alpha=0.2),
                                 tokenizer=str(data.tokenizer_path))
    with pytest.raises(ValueError, match=r"no \"token_objectives\" section: add one"):
        objective_from_ds_config({"train_micro_batch_size_per_gpu": 1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ntl_wieght'\].*valid keys: "
                                         r"\[.*'frequencies'.*'ntl_weight'.*'tokenizer'"):
        objective_from_ds_config(_section(ntl_wieght=0.3))
    # The frequency file holds the tokenizer's 512 counts, not a padded vocab's.
    with pytest.raises(ValueError, match=r'^ds_config\["token_objectives"\]: .*512'):
        objective_from_ds_config(_section(ntl=None, pdl_alpha=0.2,
                                          frequencies=str(data.frequencies_path)),
                                 tokenizer=str(data.tokenizer_path), vocab_size=520)


def test_the_tokenizer_is_a_path_or_an_object_given_once(data):
    import sentencepiece

    from token_objectives.integrations.deepspeed import objective_from_ds_config

    path = str(data.tokenizer_path)
    in_section = objective_from_ds_config(_section(ntl="was", tokenizer=path))
    loaded = sentencepiece.SentencePieceProcessor(model_file=path)
    as_object = objective_from_ds_config(_section(ntl="was"), loaded, vocab_size=512)
    assert in_section.vocab_size == as_object.vocab_size == 512
    assert torch.equal(in_section.numbers.number_ids, as_object.numbers.number_ids)
    assert objective_from_ds_config(_section(ntl="was", tokenizer=path), path).numbers is not None
    with pytest.raises(ValueError, match="the tokenizer is given twice"):
        objective_from_ds_config(_section(ntl="was", tokenizer=path), loaded)


def test_mean_divides_by_the_counted_tokens_or_their_pdl_weights(data):
    """causal_lm shifts the labels; mean is the sum over the counted tokens, or over their PDL
    weights with weighted_mean."""
    from token_objectives.integrations.deepspeed import objective_from_ds_config

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 512, generator=generator, dtype=torch.float64)
    labels = torch.randint(3, 512, (2, 6), generator=generator)
    labels[1, 4:] = -100
    for normalization in ("token", "weighted_mean"):
        objectives = objective_from_ds_config(_section(
            ntl="mse", pdl_alpha=0.5, pdl_normalization=normalization,
            tokenizer=str(data.tokenizer_path), frequencies=str(data.frequencies_path)))
        output = objectives.causal_lm(logits, labels)
        config = objectives.config
        want = reference_objective_loss(logits[:, :-1], labels[:, 1:], config,
                                        objectives.numbers, objectives.pdl_weights)
        denominator = want.weight.sum() if normalization == "weighted_mean" else 8
        assert want.counted.sum() == 8  # 5 + 3 targets
        torch.testing.assert_close(objectives.mean(output), want.loss.sum() / denominator)
        assert not output.counted[:, -1].any()
