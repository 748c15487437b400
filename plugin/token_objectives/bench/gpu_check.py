"""The correctness half of scripts/gpu_check.sh: the Triton kernels against the torch stages and
float64, at GPU sizes, on one device. Not a test of this repository's CPU suite (it runs there
only in --small mode, under Triton's interpreter, to keep the script itself from rotting).

Checks, each printed as one `PASS` / `FAIL` line:
- kernels vs torch stages vs float64, CE + NTL + PDL + label smoothing (loss per token and the
  logit gradient), over T x V, bf16 / fp32, with a real vocab that is not a multiple of 16
  (GPT-2's 50257 in a padded 50304);
- a logits tensor of more than 2^31 elements (int64 offsets), kernels vs torch stages;
- no host sync in a warmed-up forward + backward (`torch.cuda.set_sync_debug_mode("error")`).
Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from token_objectives.bench.grid import synthetic_tables
from token_objectives.objectives.config import ObjectiveConfig
from token_objectives.objectives.objective import Objective, objective_loss
from token_objectives.tables.numbers import NumberTable

CONFIG = ObjectiveConfig(ntl="was", ntl_weight=0.3, pdl_alpha=0.5, label_smoothing=0.05)


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int  # padded
    real: int  # the tokenizer's; columns past it are padding
    dtype: torch.dtype


def shapes(small: bool) -> list[Shape]:
    if small:
        return [Shape(48, 304, 257, torch.float32), Shape(64, 512, 512, torch.bfloat16)]
    return [Shape(8192, 32768, 32768, torch.bfloat16), Shape(8192, 50304, 50257, torch.bfloat16),
            Shape(32768, 131072, 128256, torch.bfloat16), Shape(65536, 32768, 32000,
                                                                   torch.bfloat16),
            Shape(8192, 50304, 50257, torch.float32)]


def _inputs(shape: Shape, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(shape.tokens, shape.vocab, generator=gen, device=device) * 3).to(
        shape.dtype)
    labels = torch.randint(0, shape.real, (shape.tokens,), generator=gen, device=device)
    digits = torch.rand(shape.tokens, generator=gen, device=device) < 0.2
    labels = torch.where(digits, labels % 10, labels)  # ids 0..9 are the digits
    labels[:: max(1, shape.tokens // 7)] = CONFIG.ignore_index
    return logits, labels


def _tables(shape: Shape, device: torch.device):
    """PDL weights fp32 [V] and a NumberTable (digits at ids 0..9) whose tokenizer has
    shape.real ids."""
    weights, numbers = synthetic_tables(shape.vocab, device)
    return weights, NumberTable.from_values(numbers.values, valid_vocab_size=shape.real)


def _loss_and_grad(logits, labels, shape: Shape, kernel: str, dtype: torch.dtype | None = None):
    weights, numbers = _tables(shape, logits.device)
    x = logits.detach().to(dtype or logits.dtype).requires_grad_()
    out = objective_loss(x, labels, CONFIG, numbers, weights, kernel=kernel,
                         real_vocab_size=shape.real)
    gen = torch.Generator(device=logits.device).manual_seed(1)
    upstream = torch.rand(out.loss.shape, generator=gen, device=logits.device)
    (out.loss * upstream).sum().backward()
    return out.loss.detach().double(), x.grad.double()


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> str:
    error = (got - want).abs()
    limit = atol + rtol * want.abs()
    worst = float((error - limit).max())
    verdict = "PASS" if worst <= 0 else "FAIL"
    return f"{verdict} {name}: max |diff| {float(error.max()):.3g} (limit {atol:g} + {rtol:g}|x|)"


def check_shape(shape: Shape, device: torch.device) -> Iterator[str]:
    logits, labels = _inputs(shape, device)
    tag = f"T={shape.tokens} V={shape.vocab} real={shape.real} {str(shape.dtype)[6:]}"
    triton_loss, triton_grad = _loss_and_grad(logits, labels, shape, "triton")
    torch_loss, torch_grad = _loss_and_grad(logits, labels, shape, "torch")
    exact_loss, exact_grad = _loss_and_grad(logits, labels, shape, "torch", torch.float64)
    low = shape.dtype != torch.float32
    rtol, atol = (2e-2, 2e-2) if low else (1e-4, 1e-5)
    yield _close(f"{tag} loss, triton vs torch stages", triton_loss, torch_loss, 1e-4, 1e-4)
    yield _close(f"{tag} loss, triton vs float64", triton_loss, exact_loss, 1e-4, 1e-4)
    yield _close(f"{tag} grad, triton vs torch stages", triton_grad, torch_grad, rtol, atol)
    yield _close(f"{tag} grad, triton vs float64", triton_grad, exact_grad, rtol, atol)
    # CE alone, by F.cross_entropy over the real columns in float64: independent of our code.
    ce_config = ObjectiveConfig(ntl=None)
    out = objective_loss(logits, labels, ce_config, None, kernel="triton",
                         real_vocab_size=shape.real, vocab_size=shape.vocab)
    reference = F.cross_entropy(logits[:, : shape.real].double(), labels,
                                ignore_index=CONFIG.ignore_index, reduction="none")
    yield _close(f"{tag} CE, triton vs F.cross_entropy float64", out.ce.double(), reference,
                 1e-4, 1e-4)
    if not torch.isfinite(triton_grad[:, shape.real:]).all() or triton_grad[:, shape.real:].any():
        yield f"FAIL {tag}: the padding columns' gradient is not 0"


def check_large(device: torch.device, small: bool) -> Iterator[str]:
    """More than 2^31 logits: offsets past int32 (bf16, ~4.3 GB)."""
    shape = Shape(40, 1000, 1000, torch.bfloat16) if small else Shape(
        16800, 128256, 128256, torch.bfloat16)
    logits, labels = _inputs(shape, device)
    weights, numbers = _tables(shape, device)
    results = []
    for kernel in ("triton", "torch"):
        with torch.no_grad():
            out = objective_loss(logits, labels, CONFIG, numbers, weights, kernel=kernel)
        results.append(out.loss.double())
    tag = f"{shape.tokens} x {shape.vocab} = {shape.tokens * shape.vocab:,} elements"
    yield _close(f"{tag} loss, triton vs torch stages", results[0], results[1], 1e-4, 1e-4)
    rows = slice(shape.tokens - 4, shape.tokens)  # the last rows sit past 2^31
    yield _close(f"{tag} last rows", results[0][rows], results[1][rows], 1e-4, 1e-4)


def check_host_syncs(device: torch.device) -> Iterator[str]:
    if device.type != "cuda":
        yield "SKIP host syncs: needs CUDA (torch.cuda.set_sync_debug_mode)"
        return
    shape = Shape(4096, 32768, 32000, torch.bfloat16)
    logits, labels = _inputs(shape, device)
    weights, numbers = _tables(shape, device)
    objective = Objective(CONFIG, numbers, weights, real_vocab_size=shape.real)

    def step():
        x = logits.detach().requires_grad_()
        out = objective(x, labels)
        out.loss.sum().backward()

    step()  # tables built and cached, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
        yield "PASS host syncs: none in a warmed-up forward + backward"
    except RuntimeError as error:
        yield f"FAIL host syncs: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m token_objectives.bench.gpu_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes (the CPU smoke run under TRITON_INTERPRET=1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = []
    for shape in shapes(args.small):
        for line in check_shape(shape, device):
            print(line, flush=True)
            lines.append(line)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for line in (*check_large(device, args.small), *check_host_syncs(device)):
        print(line, flush=True)
        lines.append(line)
    failed = [line for line in lines if line.startswith("FAIL")]
    passed = sum(line.startswith("PASS") for line in lines)
    print(f"gpu_check: {passed} passed, {len(failed)} failed, {len(lines) - passed - len(failed)} "
          f"skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
