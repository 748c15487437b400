"""Megatron-Core integration: the objectives inside a GPTModel, a loss_func, and CLI arguments.

No math lives here. `attach_objectives(model, objectives)` makes a megatron-core `GPTModel`
compute its per-token loss with an `Objective` on the vocab-sharded logits [s, b, V/tp]; the
logits are never gathered. The per-token components travel on the returned loss tensor (not in
a global), and `loss_func` turns them into Megatron's (loss sum, token count, report) triple, so
the training loop normalises by the GLOBAL token count across DP and micro-batches.

For Megatron-LM's `pretrain_gpt.py`, after its own `loss_func` is defined:

    from token_objectives.integrations.megatron import hook as token_objectives_megatron
    loss_func = token_objectives_megatron.wrap_loss_func(loss_func)

with megatron-core 0.19 (`pretrain` takes a config container), where `__main__` builds
`model_cfg = gpt_config_from_args(args)`:

    model_cfg.pre_wrap_hooks.append(token_objectives_megatron.attach_to_model_chunks)

with 0.16 (`pretrain` takes a model provider):

    model_provider = token_objectives_megatron.wrap_model_provider(model_provider)

and the flags through `extra_args_provider=token_objectives_megatron.chain_args_provider(
add_modelopt_args if has_nvidia_modelopt else None)` (0.19: of `parse_and_validate_args`),
and run with --calculate-per-token-loss (and --objective-tokenizer when NTL is on). `wrap_loss_func`
keeps Megatron-LM's own loss_func (its NaN/Inf/spiky-loss checks and ModelOpt branch) and adds
the component entries to its report; `loss_func` is the same contract for loops without
Megatron-LM.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
from dataclasses import dataclass
from typing import Any

import torch

from token_objectives.objectives import options
from token_objectives.objectives.config import NUMBER_TOKENS, ObjectiveConfig
from token_objectives.objectives.loss import ObjectiveOutput
from token_objectives.objectives.objective import Objective, ObjectiveDoor
from token_objectives.objectives.tables import objective_tables
from token_objectives.tables.tokenizers import as_tokenizer, list_vocab

_COMPONENTS_ATTR = "token_objectives_components"
_ATTACHED_ATTR = "_token_objectives_attached"


@dataclass(frozen=True)
class LossComponents:
    """Per-token parts of the loss, each [b, s] fp32, before the loss mask.

    ce: plain cross-entropy. ce_part: everything but the NTL term (PDL-weighted, smoothed CE
    plus z-loss). ntl: the NTL term before ntl_weight. is_number: where NTL is counted.
    weight: the PDL weight of each target.
    """

    ce: torch.Tensor
    ce_part: torch.Tensor
    ntl: torch.Tensor
    is_number: torch.Tensor
    weight: torch.Tensor


class Objectives(ObjectiveDoor):
    """An `Objective` as a megatron-core GPTModel computes it: labels [b, s] against logits
    [s, b, V/tp] (or hidden states, for the fused head), the per-token loss [b, s] carrying its
    LossComponents.

    objective: the Objective, its vocab_size the output layer's padded V (rows over all TP
        shards; None: the shards') and its real_vocab_size the tokenizer's size (columns
        [real, V) are padding, outside the softmax). Its pdl_normalization must be "token".
    head_rows_per_chunk: tokens per chunk of the fused LM head (a chunk holds [rows, V/tp]
        logits); None: 64 MiB of fp32 logits a chunk.
    """

    def __init__(self, objective: Objective, head_rows_per_chunk: int | None = None) -> None:
        if objective.config.pdl_normalization != "token":
            raise ValueError(
                "Megatron normalises by an integer token count: use pdl_normalization='token' "
                "(the weight table is already normalised to a corpus mean of 1)"
            )
        vocab, real = objective.vocab_size, objective.real_vocab_size
        if vocab is not None and real is not None and real > vocab:
            raise ValueError(
                f"real_vocab_size {real} exceeds the padded vocab size {vocab}: the output "
                f"layer must have a row for every tokenizer id"
            )
        self.objective = objective
        self.head_rows_per_chunk = head_rows_per_chunk

    @classmethod
    def build(
        cls,
        config: ObjectiveConfig,
        padded_vocab_size: int,
        tokenizer: Any = None,
        number_tokens: str = "auto",
        frequencies_path: str | None = None,
        real_vocab_size: int | None = None,
    ) -> Objectives:
        """The objectives of a model whose output layer has `padded_vocab_size` rows.

        tokenizer: a local path or tokenizer object (needed for NTL; without NTL it only pins the
            vocab size and the frequency table's identity, and needs no digit tokens).
        frequencies_path: a `token-objectives count-frequencies` file (needed for PDL).
        real_vocab_size: the tokenizer's size as the trainer knows it (Megatron-LM's
            `get_tokenizer().vocab_size`); must equal `tokenizer`'s with NTL, and be at least it
            without. The tables are made by `objective_tables`, as `Objective.build` makes them.
        """
        if config.uses_numbers and tokenizer is None:
            raise ValueError(f"{config.number_options()} needs the tokenizer to find number "
                             f"tokens")
        if config.pdl_alpha > 0 and frequencies_path is None:
            raise ValueError(
                "pdl_alpha > 0 needs a token-frequency table: run `token-objectives "
                f"count-frequencies --vocab-size {padded_vocab_size} ...` and pass its path"
            )
        named = tokenizer  # as given (a path, in messages)
        if tokenizer is not None:
            tokenizer = as_tokenizer(tokenizer)  # loaded once: the tables and its size read it
        numbers, weights = objective_tables(config, tokenizer, frequencies_path,
                                            padded_vocab_size, number_tokens)
        listed = None
        if numbers is not None:
            listed = numbers.valid_vocab_size
        elif tokenizer is not None:
            listed = list_vocab(tokenizer).size
        if real_vocab_size is not None and listed is not None and real_vocab_size != listed:
            # Without a NumberTable the trainer's tokenizer may add ids past the file's
            # (Megatron-LM's SentencePieceTokenizer adds special tokens); a table covers them.
            if numbers is not None or real_vocab_size < listed:
                raise ValueError(
                    f"the trainer's tokenizer has {real_vocab_size} ids but "
                    f"{numbers.tokenizer_identity if numbers else named}"
                    f" has {listed}: point --objective-tokenizer at the tokenizer the data was "
                    f"built with"
                )
        real = listed if real_vocab_size is None else real_vocab_size
        return cls(Objective(config, numbers, weights, vocab_size=padded_vocab_size,
                             real_vocab_size=None if numbers is not None else real))

    def per_token_loss(
        self, labels: torch.Tensor, logits: torch.Tensor, tp_group, weight=None,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """labels [b, s], logits [s, b, V/tp] -> loss [b, s] fp32 carrying its LossComponents.

        With `weight` (the output layer's shard [V/tp, h]), `logits` are the hidden states
        [s, b, h] ([s/tp, b, h] under sequence parallelism) and the fused LM head + loss runs
        instead.
        """
        labels_sb = labels.transpose(0, 1)
        if weight is None:
            out = self.objective(logits, labels_sb, tp_group=tp_group, seq_dim=0)
        else:
            out = self.objective.fused(logits, weight, labels_sb, tp_group=tp_group, seq_dim=0,
                                       sequence_parallel=sequence_parallel,
                                       rows_per_chunk=self.head_rows_per_chunk)
        return self._with_components(out)

    def _with_components(self, out: ObjectiveOutput) -> torch.Tensor:
        def to_bs(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(0, 1).contiguous()

        loss = to_bs(out.loss)
        ntl = to_bs(out.ntl)
        components = LossComponents(
            ce=to_bs(out.ce).detach(),
            ce_part=(loss - self.config.ntl_weight * ntl).detach(),
            ntl=ntl.detach(),
            is_number=to_bs(out.ntl_positions),
            weight=to_bs(out.weight).detach(),
        )
        setattr(loss, _COMPONENTS_ATTR, components)
        return loss


def components_of(output_tensor: torch.Tensor) -> LossComponents | None:
    """The LossComponents a model attached to its per-token loss, if any."""
    return getattr(output_tensor, _COMPONENTS_ATTR, None)


class _FusedHead:
    """Stands in for a GPTModel's output layer while labels are given: hands the hidden states
    through and remembers the weight, so the loss can run the fused LM head + objectives.
    Without labels (generation) the real output layer runs."""

    def __init__(self, output_layer) -> None:
        self.output_layer = output_layer
        self.original_forward = output_layer.forward  # bound before it is replaced
        self.active = False
        self.weight = None

    def __call__(self, hidden, weight=None, runtime_gather_output=None):
        if not self.active:
            return self.original_forward(hidden, weight=weight,
                                         runtime_gather_output=runtime_gather_output)
        self.weight = self.output_layer.weight if weight is None else weight
        return hidden, None


def attach_objectives(model, objectives: Objectives, fused_head: bool = False):
    """Make a megatron-core GPTModel (or any LanguageModule) compute `objectives` as its loss.

    fused_head: compute the loss from the hidden states and the output weight (with tied
    embeddings, the word-embedding shard, which gets the gradient), never materialising the
    [s, b, V/tp] logits; Megatron's output layer does not run while labels are given.
    megatron-core 0.19: every forward given labels (and no `output_processor` of its own) passes
    GPTModel's `output_processor` door; 0.16: the model's `compute_language_model_loss` is
    replaced (and, fused, the output layer's forward while labels are given). Without labels
    (generation) the model is Megatron's own. Idempotent: attaching again replaces the
    objectives. `detach_objectives` undoes it. Returns the model.
    """
    from token_objectives.integrations.megatron import versions

    detach_objectives(model)
    setattr(model, _ATTACHED_ATTR, objectives)
    if versions.has_output_processor():
        if fused_head and getattr(model.config, "use_mup", False):
            raise ValueError("the fused LM head does not apply MuP's logit scaling: leave "
                             "--objective-fused-lm-head off with --use-mup")
        processor = functools.partial(_objective_output, model=model, fused_head=fused_head)
        original_forward = model.forward

        def forward(*args, **kwargs):
            if kwargs.get("labels") is not None and kwargs.get("output_processor") is None:
                kwargs["output_processor"] = processor
            return original_forward(*args, **kwargs)

        model.forward = forward
        return model
    _attach_by_replacement(model, fused_head)
    return model


def _objective_output(*, hidden_states, output_layer, output_weight, labels, config, model,
                      fused_head, runtime_gather_output=None, scale_logits=None, **_):
    """GPTModel's `output_processor` (megatron-core 0.19): hidden [s, b, h] ([s/tp, b, h] under
    sequence parallelism), labels [b, s] -> per-token loss [b, s] carrying its LossComponents.

    Fused: the loss from the hidden states and the output weight shard [V/tp, h]. Otherwise
    the output layer's [s, b, V/tp] logits (MuP-scaled as Megatron scales them), then the loss.
    """
    objectives = getattr(model, _ATTACHED_ATTR)
    tp_group = model.pg_collection.tp
    if fused_head:
        weight = output_layer.weight if output_weight is None else output_weight
        return objectives.per_token_loss(
            labels, hidden_states, tp_group, weight,
            sequence_parallel=bool(getattr(config, "sequence_parallel", False)))
    logits, _ = output_layer(hidden_states, weight=output_weight,
                             runtime_gather_output=runtime_gather_output)
    if scale_logits is not None:
        logits = scale_logits(logits)
    return objectives.per_token_loss(labels, logits, tp_group)


def _attach_by_replacement(model, fused_head: bool) -> None:
    """megatron-core 0.16: the objectives replace `compute_language_model_loss`; fused, the
    output layer's forward hands the hidden states through while labels are given."""
    head = _FusedHead(model.output_layer) if fused_head else None

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        weight = None
        if head is not None and head.active:
            weight, head.weight = head.weight, None
        return getattr(self, _ATTACHED_ATTR).per_token_loss(
            labels, logits, self.pg_collection.tp, weight,
            sequence_parallel=bool(getattr(self.config, "sequence_parallel", False)))

    model.compute_language_model_loss = types.MethodType(compute_language_model_loss, model)
    if head is not None:
        original_forward = model.forward

        def forward(*args, **kwargs):
            head.active = kwargs.get("labels") is not None
            try:
                return original_forward(*args, **kwargs)
            finally:
                head.active = False

        model.output_layer.forward = head.__call__
        model.forward = forward
        model._token_objectives_head = head


def detach_objectives(model):
    """Restore the model's own output layer and cross-entropy loss."""
    if hasattr(model, _ATTACHED_ATTR):
        delattr(model, _ATTACHED_ATTR)
    for name in ("compute_language_model_loss", "forward"):
        if name in vars(model):
            delattr(model, name)
    if hasattr(model, "_token_objectives_head"):
        del model.output_layer.forward
        del model._token_objectives_head
    return model


def component_report(loss_mask: torch.Tensor, output_tensor: torch.Tensor,
                     reports_per_step: int = 1) -> dict:
    """The objectives' entries of a loss_func report: name -> fp32 [2] (sum, count), so that
    the pairs summed over a step's reports give each component of objectives.components as
    sum / count.

    loss_mask [b, s], output_tensor: the model's per-token loss [b, s]. Counted tokens are
    `loss_mask != 0`; the loss sums are weighted by the mask. Empty when the tensor carries no
    LossComponents. A micro-batch without number tokens gives "ntl" = [0, 0], so the pairs'
    sum over micro-batches and DP ranks is exact.
    reports_per_step: R, how many reports make one optimizer step (micro-batches x DP x CP
    ranks). A count ("counted tokens", "number tokens") is reported as [count * R, 1]: summed
    over the step's R reports it is [R * total, R], whose ratio is the step's total, exactly
    while R * total < 2**24 (integers in fp32).
    """
    parts = components_of(output_tensor)
    if parts is None:
        return {}
    mask = loss_mask.reshape(-1).float()
    counted = mask != 0
    tokens = counted.sum(dtype=torch.float32)
    numbers = (parts.is_number.reshape(-1) & counted).sum(dtype=torch.float32)
    ntl_sum = (parts.ntl.reshape(-1) * mask).sum()
    one = torch.ones((), dtype=torch.float32, device=mask.device)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(-1).float() * mask).sum()

    return {
        "ce part": torch.stack([masked(parts.ce_part), tokens]),
        "ntl part": torch.stack([ntl_sum, tokens]),
        "ce": torch.stack([masked(parts.ce), tokens]),
        "ntl": torch.stack([ntl_sum, numbers]),
        "counted tokens": torch.stack([tokens * reports_per_step, one]),
        "number tokens": torch.stack([numbers * reports_per_step, one]),
        "number token share": torch.stack([numbers, tokens]),
        "pdl weight": torch.stack([(parts.weight.reshape(-1).float() * counted).sum(), tokens]),
    }


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None, *,
              reports_per_step: int = 1):
    """Megatron's loss_func contract with per-token normalisation, for loops without Megatron-LM.

    loss_mask [b, s], output_tensor: the model's per-token loss [b, s]. reports_per_step: the
    loss_func calls whose reports make one optimizer step (micro-batches x DP ranks), for the
    counts (`component_report`).
    Returns (loss sum, token count (int), report); each report value is a [sum, count] pair that
    the training loop sums over the step's micro-batches and DP ranks and logs as sum / count:
    "lm loss" and the components of objectives.components (docs/metrics.md), "lm loss" =
    "ce part" + ntl_weight * "ntl part". A loop that divides must guard a count of 0 (a step
    without number tokens has "ntl" = [0, 0]).
    With Megatron-LM's pretrain_gpt.py use `wrap_loss_func(loss_func)` instead, which keeps its
    NaN/Inf/spiky-loss checks.
    """
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.reshape(-1).float()
    tokens = (mask != 0).sum(dtype=torch.float32)
    loss_sum = (losses * mask).sum()
    report = {"lm loss": torch.stack([loss_sum.detach(), tokens])}
    report.update(component_report(loss_mask, output_tensor, reports_per_step))
    return loss_sum, tokens.to(torch.int), report


def megatron_reports_per_step() -> int:
    """Megatron-LM's loss reports per iteration: megatron-core's current number of
    micro-batches (batch-size ramp-up included) x the data-parallel ranks with context
    parallelism, the group train_step all-reduces the report over."""
    from megatron.core import num_microbatches_calculator, parallel_state

    try:
        micro_batches = num_microbatches_calculator.get_num_microbatches()
    except AttributeError:  # no calculator: megatron-core's global is None
        micro_batches = None
    ranks = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    if not micro_batches or not ranks:
        raise RuntimeError(
            "wrap_loss_func's counts read megatron-core's number of micro-batches and the "
            "data-parallel size, which Megatron-LM's initialize_megatron sets up; outside "
            "Megatron-LM pass wrap_loss_func(loss_func, reports_per_step=) a function returning "
            "the loss_func calls of one step (micro-batches x DP x CP ranks)")
    return micro_batches * ranks


_WRAPPED_ATTR = "_token_objectives_loss_func"
# Megatron-LM's train_step logs sum / count unguarded, and training_log adds the value into the
# whole logging interval: a step without number tokens would make "ntl" NaN for the interval.
# A count of n + 2**-100 sums to exactly n in fp32 once any number token exists (the floor is
# far below half an ulp of 1), and a step without any logs 0 / tiny = 0.
_COUNT_FLOOR = 2.0**-100


def wrap_loss_func(original, reports_per_step=megatron_reports_per_step):
    """Megatron-LM: `original` (pretrain_gpt.py's loss_func) plus the objectives' report entries.

    The returned function has the original's signature, `(loss_mask, output_tensor, model=None)`
    in core_v0.16.1, and returns what the original returns, (loss, num_tokens, report), or the
    legacy (loss, report), with `component_report`'s pairs added to the report ("ntl"'s count
    floored at 2**-100, so a step without number tokens logs 0, not NaN). Megatron-LM writes
    each under its name to TensorBoard and its log line. The original still computes the loss
    from the combined per-token loss, so its rerun-state-machine NaN, Inf and spiky-loss checks
    and its ModelOpt branch run on what is trained. Idempotent.
    reports_per_step: called at each call for the reports one iteration sums (the counts'
    scale); default `megatron_reports_per_step`. Megatron-LM's evaluation sums its pairs over
    its eval iterations, so there a count is the mean per eval iteration.
    """
    if getattr(original, _WRAPPED_ATTR, False):
        return original

    @functools.wraps(original)
    def wrapped(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *args, **kwargs):
        outputs = original(loss_mask, output_tensor, *args, **kwargs)
        if not isinstance(outputs, tuple) or len(outputs) not in (2, 3) \
                or not isinstance(outputs[-1], dict):
            raise TypeError(
                "wrap_loss_func expects Megatron-LM's loss_func, returning (loss, num_tokens, "
                f"report) or (loss, report); got {type(outputs).__name__}"
            )
        report = dict(outputs[-1])
        if components_of(output_tensor) is None:
            return outputs
        entries = component_report(loss_mask, output_tensor, reports_per_step())
        for name, pair in entries.items():
            if name == "ntl":
                pair = torch.stack([pair[0], pair[1] + _COUNT_FLOOR])
            report.setdefault(name, pair)
        return (*outputs[:-1], report)

    setattr(wrapped, _WRAPPED_ATTR, True)
    return wrapped


# ObjectiveConfig field -> flag; any other field gets --objective-<field> (--objective-no-<field>
# for a bool that is on by default). The fields and their declarations are the one source: the
# flags' help, choices and the checks of their values (objectives.options).
_FLAGS = {
    "ntl": "--ntl",
    "ntl_weight": "--ntl-weight",
    "squash_factor": "--ntl-squash-factor",
    "reweigh": "--ntl-no-reweigh",
    "huber_delta": "--ntl-huber-delta",
    "number_level_float": "--ntl-number-level-float",
    "max_number_length": "--ntl-max-number-length",
    "pdl_alpha": "--pdl-alpha",
    "pdl_eps": "--pdl-eps",
    "pdl_unseen": "--pdl-unseen",
    "pdl_normalize_table": "--pdl-no-normalize-table",
    "label_smoothing": "--label-smoothing",
    "z_loss": "--objective-z-loss",
}
# Fixed under Megatron: it divides by an integer token count and has no ignore_index.
_NOT_FLAGS = ("pdl_normalization", "ignore_index")
def _dest(field: dataclasses.Field, flag: str) -> str:
    dest = flag.lstrip("-").replace("-", "_")
    # A store_false flag (--ntl-no-reweigh) holds the field's own sense (ntl_reweigh).
    return dest.replace("no_", "", 1) if field.default is True else dest


def _config_options() -> list[tuple[dataclasses.Field, str, options.Option]]:
    """(field, flag, its declaration) for each ObjectiveConfig field that is a flag."""
    declared = options.options_of(ObjectiveConfig)
    flags = []
    for field in dataclasses.fields(ObjectiveConfig):
        if field.name in _NOT_FLAGS:
            continue
        prefix = "--objective-no-" if field.default is True else "--objective-"
        flags.append((field, _FLAGS.get(field.name, prefix + field.name.replace("_", "-")),
                      declared[field.name]))
    return flags


def add_objective_args(
    parser: argparse.ArgumentParser, chain=None
) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: the objectives' command-line flags.

    chain: another extra_args_provider (pretrain_gpt.py passes ModelOpt's `add_modelopt_args`
    when ModelOpt is installed) that runs first; see `chain_args_provider`. Every
    ObjectiveConfig field but `_NOT_FLAGS` is a flag, made from the field's declaration: its
    help text and what it accepts, and its value read and checked by objectives.options as on
    every other surface (`none` is None: `--ntl none`, `--ntl-squash-factor none`); `_FLAGS`
    names the ones not called --objective-<field>. --number-tokens is made from
    objectives.config.NUMBER_TOKENS. Megatron-LM core_v0.16.1 has no --label-smoothing; a
    parser that already has one (a fork, or a later version) keeps it and the objectives read
    it.
    """
    if chain is not None:
        parser = chain(parser)
    taken = set(parser._option_string_actions)
    group = parser.add_argument_group("token objectives")
    for field, flag, declared in _config_options():
        if flag in taken:
            continue
        help_text = f"{declared.help}; {declared.accepts}"
        if declared.optional:
            help_text += f"; '{options.NONE}' for None" + (
                ": CE only, no digit tokens needed" if field.name == "ntl" else " (off)")
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if bool in declared.kinds and field.default:
            # --ntl-no-reweigh turns the option off: its help says so, not what "on" does.
            off = declared.off_help or f"turn off (on by default): {help_text}"
            group.add_argument(flag, action="store_false", dest=_dest(field, flag),
                               help=off.replace("%", "%%"))
        elif bool in declared.kinds:
            group.add_argument(flag, action="store_true", dest=_dest(field, flag), help=help_text)
        else:
            group.add_argument(flag, type=options.flag_type(declared), default=field.default,
                               metavar=options.flag_metavar(declared),
                               help=f"{help_text} (default {field.default})")
    group.add_argument("--number-tokens", type=options.flag_type(NUMBER_TOKENS),
                       default=NUMBER_TOKENS.default, metavar=options.flag_metavar(NUMBER_TOKENS),
                       help=NUMBER_TOKENS.help)
    group.add_argument("--pdl-frequencies", type=str, default=None,
                       help="token-frequency file from `token-objectives count-frequencies`")
    group.add_argument("--objective-tokenizer", type=str, default=None,
                       help="local tokenizer (HF directory, tokenizer.json or SentencePiece "
                            "model) for the number tokens; required when NTL is on unless "
                            "--tokenizer-model is one")
    group.add_argument("--objective-fused-lm-head", action="store_true",
                       help="compute the loss from the hidden states and the output weight, "
                            "never materialising the logits (with --sequence-parallel it "
                            "gathers the sequence-sharded hidden states itself)")
    return parser


def chain_args_provider(other=None):
    """An extra_args_provider that runs `other` (None: nothing), then `add_objective_args`."""
    return functools.partial(add_objective_args, chain=other)


def objective_config_from_args(args: argparse.Namespace) -> ObjectiveConfig:
    """The ObjectiveConfig that `add_objective_args`' flags describe, each value checked by
    its declaration (a Namespace not made by the parser too); an error names the flag."""
    values, flags = {}, {}
    for field, flag, declared in _config_options():
        value = getattr(args, _dest(field, flag), field.default)
        if value == options.NONE and declared.optional:
            value = None
        if field.name == "label_smoothing":
            value = value or 0.0  # a parser's own --label-smoothing may default to None
        values[field.name], flags[field.name] = value, flag
    return options.from_mapping(ObjectiveConfig, values, "megatron", spelling=flags)


def objectives_from_args(
    args: argparse.Namespace, real_vocab_size: int | None = None
) -> Objectives:
    """Objectives from Megatron-LM's parsed args (needs args.padded_vocab_size).

    real_vocab_size: the tokenizer's size (Megatron-LM's `get_tokenizer().vocab_size`).
    """
    config = objective_config_from_args(args)
    tokenizer = args.objective_tokenizer or getattr(args, "tokenizer_model", None)
    if config.uses_numbers and tokenizer is None:
        raise ValueError(
            f"{config.number_options()} needs the tokenizer's number tokens: pass "
            f"--objective-tokenizer PATH (a local HF tokenizer directory, tokenizer.json or "
            f"SentencePiece model; --tokenizer-model is used when set), or turn NTL off with "
            f"--ntl none (and --objective-gaussian-sigma 0)"
        )
    return Objectives.build(
        config,
        padded_vocab_size=args.padded_vocab_size,
        tokenizer=tokenizer,
        number_tokens=args.number_tokens,
        frequencies_path=args.pdl_frequencies,
        real_vocab_size=real_vocab_size,
    )


def check_megatron_lm_args(args: argparse.Namespace) -> None:
    """Refuse Megatron-LM settings under which the objectives would not be what they say."""
    if not getattr(args, "calculate_per_token_loss", False):
        raise ValueError(
            "token objectives need --calculate-per-token-loss: without it Megatron-LM divides "
            "each micro-batch's loss by its own token count and averages the micro-batches, so "
            "the gradient is not the per-token mean over the global batch (micro-batches with "
            "more tokens, or more number tokens, weigh less). Add --calculate-per-token-loss"
        )


def wrap_model_provider(model_provider):
    """Megatron-LM: wrap `model_provider` so that each GPTModel it builds uses the objectives.

    Reads the flags of `add_objective_args` from `megatron.training.get_args()` and the real vocab
    size from `get_tokenizer().vocab_size` (columns past it are padding, outside the softmax);
    checks them with `check_megatron_lm_args`. `--objective-fused-lm-head` attaches the fused
    LM head.
    """

    def provider(*args, **kwargs):
        from megatron.training import get_args, get_tokenizer  # Megatron-LM, not megatron-core

        megatron_args = get_args()
        check_megatron_lm_args(megatron_args)
        model = model_provider(*args, **kwargs)
        if getattr(model, "post_process", True):
            objectives = objectives_from_args(megatron_args,
                                              real_vocab_size=get_tokenizer().vocab_size)
            attach_objectives(model, objectives,
                              fused_head=getattr(megatron_args, "objective_fused_lm_head", False))
        return model

    provider.__wrapped__ = model_provider
    return provider


def attach_to_model_chunks(models: list) -> list:
    """Megatron-LM on megatron-core 0.19: a `GPTModelConfig.pre_wrap_hooks` entry.

    models: the pipeline stage's model chunks, before DDP and Float16Module wrap them. Each
    chunk that holds the output layer (`post_process`) gets the objectives that the flags of
    `add_objective_args` describe, read from `megatron.training.get_args()`, with the real vocab
    size from `get_tokenizer().vocab_size`; the settings are checked first
    (`check_megatron_lm_args`). Returns the same list.
    """
    from megatron.training import get_args, get_tokenizer  # Megatron-LM, not megatron-core

    megatron_args = get_args()
    check_megatron_lm_args(megatron_args)
    objectives = None
    for model in models:
        if not getattr(model, "post_process", True):
            continue
        if objectives is None:
            objectives = objectives_from_args(megatron_args,
                                              real_vocab_size=get_tokenizer().vocab_size)
        attach_objectives(model, objectives,
                          fused_head=getattr(megatron_args, "objective_fused_lm_head", False))
    return models
