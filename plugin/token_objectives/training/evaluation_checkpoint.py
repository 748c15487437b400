"""A Megatron-loop dist checkpoint read for `token-objectives evaluate`: its model alone, in one
process at TP = PP = 1, as an `evaluation.generate.MegatronGenerator`.

`main` is the `evaluate` command: evaluation.run's, given `load_megatron_checkpoint` for
--checkpoint. It lives here, not in evaluation/, because reading the checkpoint needs the loop's
model builder and evaluation/ never imports training/. torch and megatron-core are imported in
the functions that use them, so that `evaluate --help` loads neither."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from token_objectives.tables.errors import InputError

if TYPE_CHECKING:
    from token_objectives.evaluation.generate import MegatronGenerator

__all__ = ["load_megatron_checkpoint", "main", "resolve_checkpoint", "single_process_group"]


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, int]:
    """(checkpoints root, step) of `path`: a step_N directory, a checkpoints directory (its
    latest complete step) or a run's output.dir (its checkpoints/). Raises InputError."""
    from token_objectives.training import checkpointing

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--checkpoint {path}: no such directory; pass a run's output.dir, its "
                         f"checkpoints/ directory or one checkpoints/step_N directory")
    match = checkpointing.STEP_DIR.fullmatch(path.name)
    if match is not None:
        if not (path / checkpointing.COMPLETE_MARKER).is_file():
            raise InputError(f"--checkpoint {path} is not a complete checkpoint (no "
                             f"{checkpointing.COMPLETE_MARKER} marker); pass a complete one")
        return path.parent, int(match.group(1))
    for root in (path, path / "checkpoints"):
        step = checkpointing.latest_complete_step(root)
        if step is not None:
            return root, step
    raise InputError(f"--checkpoint {path} holds no complete checkpoint (no step_N directory "
                     f"with a {checkpointing.COMPLETE_MARKER} marker, there or in checkpoints/)")


def single_process_group() -> None:
    """A one-process gloo group, which megatron-core's parallel state needs."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def load_megatron_checkpoint(checkpoint: str | os.PathLike, config_path: str | os.PathLike,
                             overrides: Sequence[str] = ()) -> MegatronGenerator:
    """The GPTModel of a Megatron-loop dist checkpoint, in one process at TP = PP = 1, whatever
    TP/PP it was saved at (dist checkpoints are layout-independent; the vocab is padded for the
    run config's parallel.tensor, as the run padded it). Only the model is read."""
    import torch
    from megatron.core import parallel_state

    from token_objectives.evaluation.generate import MegatronGenerator
    from token_objectives.integrations.megatron import cpu_patches
    from token_objectives.training import checkpointing, run_stamp
    from token_objectives.training.config import load_config, padded_vocab_size
    from token_objectives.training.gpt_data import MegatronTokenizer
    from token_objectives.training.megatron import build_model

    if not os.path.isfile(config_path):
        raise InputError(f"--config {config_path}: no such file; pass the run config (YAML) the "
                         f"checkpoint was trained with")
    try:
        cfg = load_config(config_path, overrides)
    except ValueError as error:
        raise InputError(f"--config {config_path}: {error}") from error
    if cfg.data.tokenizer is None:
        raise InputError(f"--config {config_path}: data.tokenizer is not set; set it to the "
                         f"run's local tokenizer (or pass --set data.tokenizer=PATH)")
    root, step = resolve_checkpoint(checkpoint)
    single_process_group()
    if cpu_patches.needed():
        cpu_patches.apply()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    tokenizer = MegatronTokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model.vocab_size or tokenizer.vocab_size,
                              cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
    one_rank = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tensor=1, pipeline=1, sequence_parallel=False))
    model = build_model(one_rank, vocab, None, initialize=False)
    directory = checkpointing.step_dir(root, step)
    problem = checkpointing.manifest_problem(directory)
    if problem is not None:
        raise InputError(f"checkpoint {directory} is corrupt: {problem}")
    other = run_stamp.model_changes(directory, run_stamp.megatron_stamp(cfg, vocab, 1, None, 1))
    if other:
        raise InputError(f"--config {config_path} describes another model than checkpoint "
                         f"{directory} holds ({'; '.join(other)}): pass the run config it was "
                         f"trained with")
    state = checkpointing.load({"model": model.sharded_state_dict()}, root, step)
    model.load_state_dict(state["model"])
    if torch.cuda.is_available():
        model.cuda()
    return MegatronGenerator(model.eval(), tokenizer._tokenizer, tokenizer.eod,
                             tokenizer.vocab_size, cfg.model.seq_length)


def main(argv: Sequence[str] | None = None) -> int:
    """`token-objectives evaluate ARGS` (see the module docstring)."""
    from token_objectives.evaluation import run

    return run.main(argv, load_megatron_checkpoint)
