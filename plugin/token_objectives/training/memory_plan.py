"""Per-GPU memory estimate of a training layout: weights, gradients, optimizer state,
activations per micro-batch and the loss. An estimate from the shapes, not a measurement.

The per-layer activation terms list the tensors autograd saves in megatron-core's local layer
spec (checked against saved-tensor bytes of 3B-shaped layers on CPU by tests/test_memory_plan.py)
and, for the Transformer Engine spec, what its fused norm+linear modules and flash attention save
(not measured here: no GPU). Symbols: s sequence, b micro-batch, h hidden, f FFN, a heads,
g query groups, t tensor-parallel size, e bytes per element of the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
FP32 = 4
# The objectives' fp32 working set per chunk of logits (ops.plan.CHUNK_ELEMENTS) and the fused
# head's logits chunk (ops.fused_head.HEAD_CHUNK_ELEMENTS); mirrored here so that the plan does
# not import torch.
LOSS_CHUNK_ELEMENTS = 1 << 20
HEAD_CHUNK_ELEMENTS = 1 << 24
STATISTICS_PER_TOKEN = 6 + 2  # [T, 6] statistics + log_q and the target value, fp32
RECOMPUTE = ("none", "selective", "full")
ATTENTION = ("local", "flash")


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer (Llama-style: RMSNorm, SwiGLU, GQA, no biases)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int  # padded
    tied: bool = True


@dataclass(frozen=True)
class Layout:
    """How the shape is trained. optimizer_shards: the DP ranks the fp32 optimizer state is
    split over (DP under the distributed optimizer / ZeRO >= 1, else 1); grad_shards and
    param_shards likewise (ZeRO 2 / ZeRO 3)."""

    seq: int
    micro_batch: int
    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    dtype_bytes: int = 2
    grad_bytes: int = FP32  # megatron-core's DDP reduces gradients in fp32
    master_params: bool = True  # fp32 main params beside bf16 weights
    optimizer_shards: int = 1
    grad_shards: int = 1
    param_shards: int = 1
    recompute: str = "none"
    attention: str = "local"  # "local": [b, a/t, s, s] scores; "flash": none
    torch_norms: bool = True  # norms that keep fp32 copies (local spec, HF); TE fuses them
    fused_head: bool = False
    grad_in_place: bool = True  # the logit gradient written over the saved logits
    # [s, b, h] tensors outside the TP regions (norms, the linears' saved inputs) kept as
    # [s/t, b, h]: megatron-core's column-parallel linears save the slice and gather again.
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")


def layer_parameters(shape: Shape, tensor: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (QKV, proj, fc1, fc2 split; norms not)."""
    head_dim = shape.hidden // shape.heads
    qkv = shape.hidden * (shape.heads + 2 * shape.groups) * head_dim
    proj = shape.heads * head_dim * shape.hidden
    mlp = 3 * shape.hidden * shape.ffn
    return (qkv + proj + mlp) // tensor + 2 * shape.hidden


def stage_parameters(shape: Shape, tensor: int = 1, pipeline: int = 1) -> int:
    """Parameters on the busiest pipeline stage of one TP rank: its layers, the embedding
    [V/t, h] on the first stage, the final norm and the output layer (a tied copy when PP > 1)
    on the last."""
    layers = -(-shape.layers // pipeline) * layer_parameters(shape, tensor)
    embedding = shape.vocab // tensor * shape.hidden
    head = embedding if (not shape.tied or pipeline > 1) else 0
    if pipeline == 1:
        return layers + embedding + head + shape.hidden
    return layers + max(embedding, head + shape.hidden)


def layer_activation_terms(shape: Shape, layout: Layout) -> dict[str, int]:
    """Bytes one layer keeps for backward per micro-batch, by tensor, with no recompute."""
    s, b, h, t, e = layout.seq, layout.micro_batch, shape.hidden, layout.tensor, layout.dtype_bytes
    sbh = s * b * h
    outside = sbh // t if layout.sequence_parallel else sbh  # the TP regions' inputs
    kv = shape.groups / shape.heads
    terms: dict[str, int] = {}
    if layout.torch_norms:
        # A torch RMSNorm saves its input and the normalised input in fp32, two norms a layer;
        # the QKV and fc1 matmuls save the norm's output in the model dtype.
        terms["norms (fp32 copies)"] = 2 * 2 * outside * FP32
        terms["norm outputs (QKV, fc1 inputs)"] = 2 * outside * e
    else:  # TE LayerNormLinear: its input and the normalised output, in the model dtype
        terms["norm+linear inputs and outputs"] = 2 * 2 * outside * e
    if layout.attention == "local":
        # Unfused attention repeats K and V to every head and saves q, k^T, v for the two bmms,
        # then the softmax output in fp32 and the probabilities cast to the model dtype.
        terms["q, k, v (per head)"] = int(3 * sbh / t * e)
        terms["scores [b, a/t, s, s]"] = b * shape.heads // t * s * s * (FP32 + e)
    else:  # flash: q, k, v as projected (GQA), the output and the fp32 log-sum-exp [b, a/t, s]
        terms["q, k, v (GQA)"] = int((1 + 2 * kv) * sbh / t * e)
        terms["attention output + lse"] = int(sbh / t * e) + b * shape.heads // t * s * FP32
    terms["context (proj input)"] = int(sbh / t * e)
    # fc1's output [s, b, 2f/t], its two halves, and the SwiGLU product (fc2's input).
    terms["MLP (fc1 out, SwiGLU)"] = int(s * b * shape.ffn / t * e * 5)
    return terms


def activation_terms(shape: Shape, layout: Layout) -> dict[str, int]:
    """Activation bytes per GPU for the micro-batches in flight, by component."""
    s, b, h, e = layout.seq, layout.micro_batch, shape.hidden, layout.dtype_bytes
    layers = -(-shape.layers // layout.pipeline)
    # A layer's input under sequence parallelism: its slice of the sequence.
    layer_input = s * b * h // (layout.tensor if layout.sequence_parallel else 1) * e
    in_flight = layout.pipeline  # 1F1B: the first stage holds PP micro-batches' activations
    per_layer = layer_activation_terms(shape, layout)
    one_layer = sum(per_layer.values())
    terms: dict[str, int] = {}
    if layout.recompute == "full":
        # Each layer keeps its input; backward recomputes one layer at a time.
        terms["layer inputs (full recompute)"] = layers * layer_input * in_flight
        terms["one layer recomputed in backward"] = one_layer
    else:
        if layout.recompute == "selective":  # core attention recomputed from q, k, v
            dropped = [k for k in per_layer if k.startswith(("scores", "q, k, v (per"))]
            kept = {k: v for k, v in per_layer.items() if k not in dropped}
            kept["core-attention inputs (selective)"] = int(
                (1 + 2 * shape.groups / shape.heads) * s * b * h / layout.tensor * e)
            per_layer = kept
            if dropped and layout.attention == "local":  # one layer's scores rebuilt in backward
                terms["one layer's scores recomputed in backward"] = sum(
                    per_layer_value for k, per_layer_value in layer_activation_terms(
                        shape, layout).items() if k in dropped)
        for name, value in per_layer.items():
            terms[f"layers: {name}"] = layers * value * in_flight
    return terms


def loss_terms(shape: Shape, layout: Layout) -> dict[str, int]:
    """The last stage's head and loss: the final norm, the logits [s, b, V/t] (and their
    gradient unless written in place), our statistics; or the fused head's chunk."""
    s, b, h, e = layout.seq, layout.micro_batch, shape.hidden, layout.dtype_bytes
    tokens = s * b
    width = shape.vocab // layout.tensor
    local = tokens // layout.tensor if layout.sequence_parallel else tokens  # the head's input
    terms = {"final norm + head input": 2 * local * h * FP32 + local * h * e
             if layout.torch_norms else 2 * local * h * e}
    if layout.fused_head:
        rows = max(1, HEAD_CHUNK_ELEMENTS // width)
        terms["fused head chunk (logits + gradient)"] = 2 * rows * width * FP32
    else:
        copies = 1 if layout.grad_in_place else 2
        terms["logits [s, b, V/t]" + ("" if copies == 1 else " + gradient")] = (
            copies * tokens * width * e)
        terms["loss chunk (fp32)"] = LOSS_CHUNK_ELEMENTS * FP32
    terms["statistics [T, 8] fp32"] = tokens * STATISTICS_PER_TOKEN * FP32
    return terms


@dataclass(frozen=True)
class Plan:
    """The estimate: rows of (section, component, bytes)."""

    rows: list[tuple[str, str, int]]

    @property
    def total(self) -> int:
        return sum(value for _, _, value in self.rows)


def plan(shape: Shape, layout: Layout) -> Plan:
    """Per-GPU bytes of `shape` trained under `layout`."""
    params = stage_parameters(shape, layout.tensor, layout.pipeline)
    state = (3 if layout.master_params else 2) * FP32
    rows = [
        ("model", "weights", params * layout.dtype_bytes // layout.param_shards),
        ("model", "gradients", params * layout.grad_bytes // layout.grad_shards),
        ("model", "optimizer (Adam m, v" + (", fp32 params)" if layout.master_params else ")"),
         params * state // layout.optimizer_shards),
    ]
    rows += [("activations", k, v) for k, v in activation_terms(shape, layout).items()]
    rows += [("loss", k, v) for k, v in loss_terms(shape, layout).items()]
    return Plan(rows)


def format_plan(result: Plan, gpu_gib: float, header: str) -> str:
    """The table, one row per component, and the last line `total per GPU: X GiB of Y GiB`."""
    lines = [header, f"{'section':<12} {'component':<44} {'GiB':>8}"]
    for section, name, value in result.rows:
        lines.append(f"{section:<12} {name:<44} {value / GIB:8.2f}")
    lines.append(f"total per GPU: {result.total / GIB:.1f} GiB of {gpu_gib:g} GiB")
    return "\n".join(lines)
