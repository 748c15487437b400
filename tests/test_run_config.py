"""The run config's values are checked where they are read: a size that is not a positive
integer, a negative interval, a NaN or an out-of-range rate is a ValueError naming the
`section.key` and what it accepts, before any worker starts; no process group needed. Both loops
read this run config; for the DeepSpeed loop each setting has one owner, the run config or the
ds_config, and a key set in both is refused naming both."""

from __future__ import annotations

import math
import re

import pytest

from token_objectives.training.config import config_from_dict, load_config


@pytest.mark.parametrize(("override", "says"), [
    ("model.seq_length=0", "model.seq_length: expected an int >= 1, got 0"),
    ("model.num_attention_heads=0", "model.num_attention_heads: expected an int >= 1"),
    ("model.make_vocab_size_divisible_by=0",
     "model.make_vocab_size_divisible_by: expected an int >= 1, got 0"),
    ("model.num_layers=-2", "model.num_layers: expected an int >= 1, got -2"),
    ("model.norm_epsilon=0", "model.norm_epsilon: expected a number > 0, got 0"),
    ("parallel.tensor=0", "parallel.tensor: expected an int >= 1, got 0"),
    ("parallel.micro_batch_size=0", "parallel.micro_batch_size: expected an int >= 1"),
    ("parallel.global_batch_size=-8",
     "parallel.global_batch_size: expected an int >= 1, or None, got -8"),
    ("train.save_interval=-1", "train.save_interval: expected an int >= 0, got -1"),
    ("train.exit_interval=-1", "train.exit_interval: expected an int >= 0, got -1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: expected an int >= 0, got -1"),
    ("train.max_skipped_steps=-1", "train.max_skipped_steps: expected an int >= 0"),
    ("train.log_interval=0", "train.log_interval: expected an int >= 1, got 0"),
    ("train.lr=.nan", "train.lr: expected a number > 0, got nan (not a finite number)"),
    ("train.lr=0", "train.lr: expected a number > 0, got 0"),
    ("train.lr=.inf", "train.lr: expected a number > 0, got inf (not a finite number)"),
    ("train.clip_grad=-1", "train.clip_grad: expected a number >= 0, got -1"),
    ("train.adam_beta2=1", "train.adam_beta2: expected a number in [0, 1), got 1"),
    ("train.steps=1.5e3.1", "train.steps: expected an int >= 1, got '1.5e3.1'"),
    ("train.steps=1.5", "train.steps: expected an int >= 1, got 1.5"),
    ("train.steps=.nan", "train.steps: expected an int >= 1, got nan"),
    ("model.vocab_size=.nan", "model.vocab_size: expected an int >= 1, or None, got nan"),
    ("model.recompute=layers",
     "model.recompute: expected one of 'none', 'selective', 'full', got 'layers'"),
    ("model.layer_spec=flash", "model.layer_spec: expected one of 'auto', 'te', 'local'"),
    ("parallel.use_distributed_optimizer=3",
     "parallel.use_distributed_optimizer: expected a bool, got 3"),
    ("parallel.overlap_param_gather=true",
     "parallel.overlap_param_gather needs parallel.use_distributed_optimizer: true"),
    ("train.min_lr=2e-3", "train.min_lr: expected a number <= train.lr (0.001), as the "
     "schedule decays from lr down to min_lr, got 0.002"),
    ("train.warmup_steps=200", "train.warmup_steps: expected an int in [0, train.steps = 100), "
     "got 200"),
    ("train.resume_schedule=maybe",
     "train.resume_schedule: expected one of 'refuse', 'override', 'checkpoint', got 'maybe'"),
    ("train.resume_objectives=checkpoint",
     "train.resume_objectives: expected one of 'refuse', 'override', got 'checkpoint'"),
    ("data.number_tokens=all",
     "data.number_tokens: expected one of 'auto', 'digit', 'groups', 'multi', got 'all'"),
    ("train.on_corrupt_checkpoint=ignore",
     "train.on_corrupt_checkpoint: expected one of 'fallback', 'stop', got 'ignore'"),
    ("train.lr_decay_style=WSD", "train.lr_decay_style: expected one of 'constant', 'linear', "
     "'cosine', 'inverse-square-root', got 'WSD'"),
    ("model.normalization=rms",
     "model.normalization: expected one of 'RMSNorm', 'LayerNorm', got 'rms'"),
])
def test_a_bad_value_names_its_key_and_what_it_accepts(override, says):
    with pytest.raises(ValueError, match="^" + re.escape(says)):
        load_config(None, [override])


def test_a_float_for_an_int_key_is_taken_when_it_is_an_exact_integer():
    """YAML reads 1e3 as the text "1e3" and 1.0e+3 as a float: both are 1000 steps."""
    assert load_config(None, ["train.steps=1e3"]).train.steps == 1000
    assert load_config(None, ["train.steps=1.0e+3"]).train.steps == 1000
    assert isinstance(load_config(None, ["train.steps=1e3"]).train.steps, int)
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("section", ["train", "model", "parallel"])
def test_a_section_written_as_a_list_is_named(section, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}: [1, 2]\n")
    with pytest.raises(ValueError, match=f"config section '{section}' must be a mapping"):
        load_config(path)
    with pytest.raises(ValueError, match=f"config section '{section}' must be a mapping"):
        load_config(path, [f"{section}.steps=3"])
    with pytest.raises(ValueError, match=f"config section '{section}' must be a mapping"):
        config_from_dict({section: "steps"})


def test_recompute_activations_is_read_as_full_and_cannot_contradict_recompute():
    assert load_config(None, ["model.recompute_activations=true"]).model.recompute_mode == "full"
    assert load_config(None, ["model.recompute=selective"]).model.recompute_mode == "selective"
    with pytest.raises(ValueError, match="model.recompute_activations: true means model.recompute"
                       ": full, which contradicts model.recompute: selective"):
        load_config(None, ["model.recompute_activations=true", "model.recompute=selective"])


def test_the_defaults_and_the_shipped_tiny_config_still_load():
    from torchrun_helpers import REPO

    assert load_config(None).train.max_skipped_steps == 10
    assert load_config(REPO / "configs" / "tiny.yaml").model.seq_length == 128
    assert math.isfinite(load_config(None, ["train.min_lr=0"]).train.min_lr)


DS_RUN = ["model.hf_config=configs/deepspeed/tiny_llama.json", "data.tokenizer=t.model",
          "data.train_prefix=p", "train.warmup_steps=0"]
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
             "bf16": {"enabled": True}, "tensorboard": {"enabled": True},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95],
                                                       "weight_decay": 0.0}}}


@pytest.mark.parametrize(("override", "ds_key", "ds_value"), [
    ("train.lr=3e-4", "optimizer.params.lr", "0.001"),
    ("train.weight_decay=0.1", "optimizer.params.weight_decay", "0.0"),
    ("train.adam_beta2=0.999", "optimizer.params.betas[1]", "0.95"),
    ("train.clip_grad=0.5", "gradient_clipping", "1.0"),
    ("train.warmup_steps=5", "scheduler.params.warmup_num_steps", "0"),
    ("train.lr_decay_style=linear", "scheduler.type", "'constant'"),
    ("parallel.micro_batch_size=8", "train_micro_batch_size_per_gpu", "2"),
    ("parallel.tensor=2", "tensor_parallel.autotp_size", "1"),
    ("output.tensorboard=false", "tensorboard.enabled", "True"),
])
def test_a_key_set_in_both_files_is_refused_naming_both(override, ds_key, ds_value):
    """The DeepSpeed loop: the ds_config owns what DeepSpeed's engine reads; the run config's
    key that says the same is refused when it disagrees, and taken when it agrees."""
    from token_objectives.training.deepspeed import check_run_config

    key, _, value = override.partition("=")
    cfg = load_config(None, [*DS_RUN, override, "train.steps=100"])
    with pytest.raises(ValueError, match=re.escape(f"{key} = ") + r".* in the run config, "
                       + re.escape(f"{ds_key} = {ds_value} in the ds_config")) as refused:
        check_run_config(cfg, DS_CONFIG)
    assert "takes these from the ds_config: set them there (or with --ds-set)" in str(refused.value)
    agreeing = {"train_micro_batch_size_per_gpu": 8, "tensorboard": {"enabled": False},
                "gradient_clipping": 0.5}
    if ds_key in agreeing:  # the same value in both files: nothing is ignored
        check_run_config(cfg, {**DS_CONFIG, ds_key.split(".")[0]: agreeing[ds_key]})


def test_the_global_batch_is_the_ds_configs():
    from token_objectives.training.deepspeed import check_global_batch

    check_global_batch(load_config(None, ["parallel.global_batch_size=8"]), 8)
    check_global_batch(load_config(None), 16)
    with pytest.raises(ValueError, match=r"^parallel\.global_batch_size = 8 in the run config, "
                       r"but the ds_config gives 16 samples per step"):
        check_global_batch(load_config(None, ["parallel.global_batch_size=8"]), 16)


def test_a_token_objectives_section_is_refused_saying_where_each_key_goes():
    """Our loop's objectives are the run config's; the section stays for users' own loops."""
    from token_objectives.training.deepspeed import check_run_config

    section = {"ntl": "was", "tokenizer": "t.model", "fused_lm_head": True,
               "scheduled_sampling": {"enabled": True}}
    with pytest.raises(ValueError, match='has a "token_objectives" section, which this loop '
                       "does not read") as refused:
        check_run_config(load_config(None, DS_RUN), {**DS_CONFIG, "token_objectives": section})
    assert ("ntl -> objectives.ntl, tokenizer -> data.tokenizer, fused_lm_head -> "
            "model.fused_lm_head, scheduled_sampling -> the scheduled_sampling section"
            in str(refused.value))


def test_keys_the_deepspeed_loop_does_not_read_are_named():
    from token_objectives.training.deepspeed import check_run_config

    cfg = load_config(None, [*DS_RUN, "model.num_layers=28", "parallel.pipeline=2",
                             "train.keep_checkpoints=3"])
    assert check_run_config(cfg, DS_CONFIG) == [
        "model.num_layers = 28 is not read by the DeepSpeed loop: the model's shape is "
        "model.hf_config's",
        "parallel.pipeline = 2 is not read by the DeepSpeed loop: ZeRO and AutoTP are the "
        "ds_config's",
        "train.keep_checkpoints = 3 is not read by the DeepSpeed loop: every tag is kept"]
    assert check_run_config(load_config(None, DS_RUN), DS_CONFIG) == []


@pytest.mark.parametrize(("drop", "add", "says"), [
    ("model.hf_config", None, "model.hf_config is not set"),
    ("data.train_prefix", None, "data.train_prefix is not set"),
    (None, "model.recompute=selective", "model.recompute: selective is the Megatron loop's"),
])
def test_the_deepspeed_loop_names_what_it_needs(drop, add, says):
    from token_objectives.training.deepspeed import check_run_config

    settings = [s for s in DS_RUN if not s.startswith(f"{drop}=")] + ([add] if add else [])
    with pytest.raises(ValueError, match="^" + re.escape(says)):
        check_run_config(load_config(None, settings), DS_CONFIG)


@pytest.mark.parametrize(("override", "says"), [
    ('optimizer.params.lr="abc"', "optimizer\"].params.lr must be a number > 0, got 'abc'"),
    ("optimizer.params.betas=[0.9]",
     "optimizer\"].params.betas must be two numbers in [0, 1), e.g. [0.9, 0.95], got (0.9,)"),
    ("optimizer.params.eps=0", "optimizer\"].params.eps must be a number > 0, got 0"),
    ("optimizer.params.weight_decay=-1",
     "optimizer\"].params.weight_decay must be a number >= 0, got -1"),
])
def test_ds_set_optimizer_params_are_checked_by_name(override, says, tmp_path):
    """--ds-set optimizer.params.lr="abc" was a TypeError inside torch, betas=[0.9] an
    IndexError."""
    import json

    from token_objectives.training.deepspeed import load_ds_config, split_optimizer

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    with pytest.raises(ValueError, match=re.escape(says)):
        split_optimizer(load_ds_config(path, [override]))


def test_a_key_written_at_its_default_value_is_still_checked(tmp_path):
    """`output.tensorboard: true` and `train.clip_grad: 1.0` written in the YAML (as
    configs/llama3.2-3b.yaml does) are settings, though both are the defaults: a ds_config
    without a tensorboard section / gradient_clipping refuses them; left out, they are the
    ds_config's."""
    from token_objectives.training.deepspeed import check_run_config

    bare = {key: value for key, value in DS_CONFIG.items()
            if key not in ("tensorboard", "gradient_clipping")}
    check_run_config(load_config(None, DS_RUN), bare)
    run = tmp_path / "run.yaml"
    for yaml_text, says in (
            ("output:\n  tensorboard: true\n",
             "output.tensorboard = True in the run config, tensorboard.enabled = False in the "
             "ds_config"),
            ("train:\n  clip_grad: 1.0\n",
             "train.clip_grad = 1.0 in the run config, gradient_clipping = 0.0 in the "
             "ds_config")):
        run.write_text(yaml_text)
        with pytest.raises(ValueError, match=re.escape(says)):
            check_run_config(load_config(run, DS_RUN), bare)
        check_run_config(load_config(run, DS_RUN), DS_CONFIG)  # the same in both: taken
    with pytest.raises(ValueError, match=re.escape("output.tensorboard = True in the run config")):
        check_run_config(load_config(None, [*DS_RUN, "output.tensorboard=true"]), bare)


def test_train_steps_must_be_the_decaying_schedules_length():
    """--set train.steps=500 with a 100000-step WarmupCosineLR / WarmupDecayLR was a schedule
    that never decays: refused naming both keys and the --ds-set that fixes it; a resume
    (train.steps may grow past the checkpoint's schedule, train.resume_schedule rules) and a
    constant WarmupLR are not checked."""
    from token_objectives.training.deepspeed import check_run_config

    for kind in ("WarmupCosineLR", "WarmupDecayLR"):
        config = {**DS_CONFIG, "scheduler": {"type": kind, "params": {
            "total_num_steps": 100000, "warmup_num_steps": 0, "warmup_max_lr": 1e-3}}}
        with pytest.raises(ValueError, match=re.escape(
                "train.steps = 500 in the run config, scheduler.params.total_num_steps = 100000 "
                f"in the ds_config: the {kind} schedule would not end with the run. Make both "
                "equal (e.g. --ds-set scheduler.params.total_num_steps=500)")):
            check_run_config(load_config(None, [*DS_RUN, "train.steps=500"]), config)
        with pytest.raises(ValueError, match=r"^train\.steps = 100 in the run config"):
            check_run_config(load_config(None, DS_RUN), config)  # train.steps left out: 100
        check_run_config(load_config(None, [*DS_RUN, "train.steps=500"]), config, resuming=True)
        check_run_config(load_config(None, [*DS_RUN, "train.steps=100000"]), config)
    check_run_config(load_config(None, [*DS_RUN, "train.steps=500"]), {
        **DS_CONFIG, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}})


def test_warmup_schedulers_peak_and_floor_are_their_own():
    """WarmupLR / WarmupDecayLR warm up to scheduler.params.warmup_max_lr, not
    optimizer.params.lr, and WarmupDecayLR decays to warmup_min_lr: train.lr / train.min_lr are
    compared with those."""
    from token_objectives.training.deepspeed import check_run_config

    decay = {**DS_CONFIG, "scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 100, "warmup_num_steps": 0, "warmup_max_lr": 3e-4,
        "warmup_min_lr": 3e-5}}}
    linear = [*DS_RUN, "train.lr_decay_style=linear"]
    check_run_config(load_config(None, [*linear, "train.lr=3e-4", "train.min_lr=3e-5"]), decay)
    with pytest.raises(ValueError, match=re.escape(
            "train.lr = 0.001 in the run config, scheduler.params.warmup_max_lr = 0.0003 in the "
            "ds_config")):
        check_run_config(load_config(None, [*linear, "train.lr=1e-3"]), decay)
    with pytest.raises(ValueError, match=re.escape(
            "train.min_lr = 1e-05 in the run config, scheduler.params.warmup_min_lr = 3e-05 in "
            "the ds_config")):
        check_run_config(load_config(None, [*linear, "train.lr=3e-4", "train.min_lr=1e-5"]),
                         decay)
    constant = [*DS_RUN, "train.lr_decay_style=constant"]
    warmup = {**DS_CONFIG, "scheduler": {"type": "WarmupLR", "params": {
        "warmup_num_steps": 0, "warmup_max_lr": 2e-4}}}
    check_run_config(load_config(None, [*constant, "train.lr=2e-4"]), warmup)
    with pytest.raises(ValueError, match=re.escape(
            "train.lr = 0.001 in the run config, scheduler.params.warmup_max_lr = 0.0002")):
        check_run_config(load_config(None, [*constant, "train.lr=1e-3"]), warmup)
    # WarmupLR without warmup_max_lr warms up to the optimizer's lr (DeepSpeed's default)
    del warmup["scheduler"]["params"]["warmup_max_lr"]
    check_run_config(load_config(None, [*constant, "train.lr=1e-3"]), warmup)


def test_an_old_deepspeed_stamp_of_token_objectives_keys_resumes(tmp_path):
    """DeepSpeed-loop checkpoints from when the objectives were a ds_config section stamp them
    as `token_objectives.*`: read_stamp reads them as `objectives.*`, so the same objectives
    resume without a change (and a changed one is still named)."""
    import json

    from token_objectives.training.run_stamp import check_resume, objectives_section

    cfg = load_config(None, [*DS_RUN, "objectives.ntl=was", "objectives.ntl_weight=0.3"])
    objectives = objectives_section(cfg.objectives, cfg.data.number_tokens, "sp:abc", None)
    old = {key.replace("objectives.", "token_objectives.", 1): value
           for key, value in objectives.items()}
    assert any(key.startswith("token_objectives.") for key in old)
    stamp = {"model": {"model.hidden_size": 64}, "schedule": {"train.lr": 1e-3},
             "objectives": objectives, "layout": {}}
    (tmp_path / "run.json").write_text(json.dumps({**stamp, "objectives": old}))
    found = check_resume(tmp_path, stamp, "refuse", "refuse", "train.resume_schedule",
                         "train.resume_objectives")
    assert found is not None and found.objectives == [] and found.schedule == []
    changed = {**stamp, "objectives": {**objectives, "objectives.ntl_weight": 0.5}}
    with pytest.raises(ValueError, match=re.escape(
            "objectives.ntl_weight: 0.3 in the checkpoint, 0.5 now")):
        check_resume(tmp_path, changed, "refuse", "refuse", "train.resume_schedule",
                     "train.resume_objectives")
