"""Ahead-of-time build of the Triton kernels, without a GPU: every variant the dispatch can
launch (`triton_kernels.launch_flags` over the objective's options, for bf16, fp16 and fp32
logits) is compiled to PTX and cubin for an architecture with the ptxas that ships in the triton
wheel, and its SASS is read for registers, spills and the cost of the full-vocab loop.

The loop's cost is a static count: the SASS instructions of the loop body (from the target of
the loop's backward branch to that branch) divided by the columns one thread handles per
iteration (BLOCK / (32 * num_warps)). It says nothing measured about time on a GPU.

No communication; imports triton, the standard library and `triton_kernels` only, in the
functions that compile, so that `check-kernels --help` loads neither triton nor torch.

    token-objectives check-kernels --arch sm_90 --dtype bf16
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ARCHS = ("sm_80", "sm_90", "sm_100")
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# The kernels' names in triton_kernels.
KERNELS = {"forward": "_partials_kernel", "backward": "_gradient_kernel"}
# The padded width the check compiles for (a multiple of 16, as Megatron pads the vocab) and the
# real width inside it (GPT-2's 50257: not a multiple of 16, so Triton gets no hint for it).
PADDED_WIDTH, REAL_WIDTH = 50304, 50257
# Integer arguments that Triton specialises as divisible by 16 at launch when the padded width
# is (pointers from torch's allocator are too); every other int is compiled without the hint.
ALIGNED_INTS = ("row_stride", "grad_row_stride", "width")
FLOATS = ("squash_min", "squash_scale", "inv_real_vocab", "inv_sigma")
LONG_POINTERS = ("targets_ptr", "number_cols_ptr")
INT_POINTERS = ("number_groups_ptr", "target_groups_ptr")
LOGIT_POINTERS = ("logits_ptr", "grad_ptr")


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: which kernel, the logits' dtype and the constexpr flags."""

    kernel: str
    dtype: str
    flags: tuple[tuple[str, object], ...]

    @property
    def numbers(self) -> bool:
        """Whether the number loop runs (NTL or the Gaussian target)."""
        flags = dict(self.flags)
        return bool(flags["NUMBERS"] or flags["GAUSSIAN"])

    def label(self) -> str:
        on = [name.lower() for name, value in self.flags if value is True]
        return f"{self.kernel:<8} {self.dtype:<4} {'+'.join(on) or 'ce'}"


@dataclass(frozen=True)
class Report:
    """What the SASS of one variant says for one architecture."""

    variant: Variant
    arch: str
    registers: int
    local_bytes: int  # local memory per thread, where spills go
    spills: int  # local-memory stores and loads (STL/LDL) in the SASS
    loop_instructions: int
    per_thread: int  # columns a thread handles per iteration of the full-vocab loop

    @property
    def per_element(self) -> float:
        return self.loop_instructions / self.per_thread


def variants(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[Variant]:
    """Every distinct constexpr combination the dispatch can launch on a wide (>= MAX_BLOCK)
    shard, per kernel and logits dtype."""
    from token_objectives.ops import triton_kernels

    combos = []
    for numbers, wasserstein, mean_logit, squash, gaussian, grouped in itertools.product(
            (False, True), repeat=6):
        flags = triton_kernels.launch_flags(numbers, wasserstein, mean_logit, squash,
                                            PADDED_WIDTH, gaussian, grouped)
        key = tuple(sorted(flags.items()))
        if key not in combos:
            combos.append(key)
    return [Variant(kernel, dtype, flags)
            for kernel in KERNELS for dtype in dtypes for flags in combos]


def _capability(arch: str) -> int:
    match = re.fullmatch(r"sm_(\d+)a?", arch)
    if match is None:
        raise ValueError(f"unknown architecture {arch!r}: pass e.g. sm_80, sm_90 or sm_100")
    return int(match.group(1))


def compile_variant(variant: Variant, arch: str, *, hint_real_width: bool = False):
    """triton.compile of `variant` for `arch` (no GPU needed); returns the CompiledKernel, whose
    .asm holds "ptx" and "cubin". hint_real_width: compile as if the real width were a multiple
    of 16 too (for comparing against the usual case, where it is not)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from token_objectives.ops import triton_kernels

    fn = getattr(triton_kernels, KERNELS[variant.kernel])
    flags = dict(variant.flags)
    num_warps = flags.pop("num_warps")
    signature, attrs = {}, {}
    aligned = ALIGNED_INTS + (("real_width",) if hint_real_width else ())
    for index, name in enumerate(fn.arg_names):
        if name in flags:
            signature[name] = "constexpr"
            continue
        if name in LOGIT_POINTERS:
            signature[name] = f"*{DTYPES[variant.dtype]}"
        elif name in LONG_POINTERS:
            signature[name] = "*i64"
        elif name in INT_POINTERS:
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name in aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=flags, attrs=attrs)
    target = GPUTarget("cuda", _capability(arch), 32)
    options = {"num_warps": num_warps}
    if variant.kernel == "backward":
        options.update(triton_kernels.GRADIENT_OPTIONS)
    return triton.compile(source, target=target, options=options)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def read_sass(cubin: bytes) -> tuple[str, str]:
    """(resource usage, SASS) of a cubin, by the cuobjdump and nvdisasm of the triton wheel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", file.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", file.name], check=True,
                              capture_output=True, text=True).stdout
    return usage, sass


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def loops(sass: str) -> list[list[str]]:
    """The bodies of the innermost loops of a SASS listing, in the listing's order: each from a
    label to a branch back to it, as their instructions (NOPs left out)."""
    body: list[str] = []
    labels: dict[str, int] = {}
    found = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction is None or instruction.group(1).startswith("NOP"):
            continue
        body.append(instruction.group(1))
        branch = _BRANCH.search(instruction.group(1))
        if branch and branch.group(1) in labels:
            found.append((labels[branch.group(1)], len(body)))
    innermost = [(a, b) for a, b in found if b - a > 1  # not the trap's branch to itself
                 and not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]
    return [body[a:b] for a, b in innermost]


def check(variant: Variant, arch: str) -> Report:
    """Compile `variant` for `arch` and read its SASS. The full-vocab loop is the first loop
    with 128-bit loads: the loop over whole blocks, which comes before the partial last block's;
    the number tokens' loops gather single columns."""
    compiled = compile_variant(variant, arch)
    usage, sass = read_sass(compiled.asm["cubin"])
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    spills = sum(1 for line in sass.splitlines() if re.search(r"\b(STL|LDL)\b", line))
    bodies = [body for body in loops(sass)
              if any(re.search(r"\bLDG\S*\.128\b", instruction) for instruction in body)]
    if not bodies:
        raise RuntimeError(f"{variant.label()} on {arch}: no loop with 128-bit loads in its SASS "
                           "(the logits' loads lost their vector width)")
    flags = dict(variant.flags)
    per_thread = max(1, flags["BLOCK"] // (32 * flags["num_warps"]))
    return Report(variant, arch, registers, local, spills, len(bodies[0]), per_thread)


def ntl_over_ce(reports: list[Report]) -> float:
    """The worst ratio, over architectures, dtypes and NTL flavours, of the forward loop's
    instructions per element with NTL on to CE alone (same arch, dtype and mean-logit flag)."""
    base = {(r.arch, r.variant.dtype, dict(r.variant.flags)["MEAN_LOGIT"]): r.per_element
            for r in reports if r.variant.kernel == "forward" and not r.variant.numbers}
    ratios = [r.per_element / base[key] for r in reports
              if r.variant.kernel == "forward" and r.variant.numbers
              and (key := (r.arch, r.variant.dtype, dict(r.variant.flags)["MEAN_LOGIT"])) in base]
    return max(ratios, default=1.0)


def run(archs: tuple[str, ...] = ARCHS, dtypes: tuple[str, ...] = tuple(DTYPES),
        out=print) -> int:
    """Compile and report every variant for every arch; returns the exit code (1 on a compile
    error or a spill). The last line printed is `ntl/ce instructions per element: R`."""
    failed = False
    reports = []
    out(f"{'arch':<7} {'kernel':<8} {'dtype':<4} {'variant':<36} {'regs':>4} {'spill':>5} "
        f"{'loop':>5} {'/thr':>4} {'instr/elem':>10}")
    for arch in archs:
        _capability(arch)
        for variant in variants(dtypes):
            kernel, dtype, flavour = variant.label().split()
            try:
                report = check(variant, arch)
            except Exception as error:  # noqa: BLE001 - any compile failure is reported
                cause = [line for line in str(error).splitlines() if line.strip()] or [""]
                out(f"{arch:<7} {kernel:<8} {dtype:<4} {flavour:<36} compile error: "
                    f"{type(error).__name__}: {cause[-1].strip()[:200]}")
                failed = True
                continue
            reports.append(report)
            failed |= report.spills > 0 or report.local_bytes > 0
            out(f"{arch:<7} {kernel:<8} {dtype:<4} {flavour:<36} {report.registers:>4} "
                f"{report.spills:>5} {report.loop_instructions:>5} {report.per_thread:>4} "
                f"{report.per_element:>10.2f}")
    out(f"ntl/ce instructions per element: {ntl_over_ce(reports):.2f}")
    return 1 if failed else 0


def _arch(text: str) -> str:
    if re.fullmatch(r"sm_\d+a?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an architecture: use e.g. sm_90")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """`token-objectives check-kernels`: `run` over --arch and --dtype; returns its exit code."""
    parser = argparse.ArgumentParser(
        prog="token-objectives check-kernels",
        description="compile every Triton kernel variant ahead of time (no GPU needed) and print "
        "registers, spills and the inner loop's SASS instructions per element")
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), type=_arch,
                        help="architectures to compile for (default: sm_80 sm_90 sm_100)")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES),
                        help="logits dtypes (default: all)")
    args = parser.parse_args(argv)
    return run(tuple(args.arch), tuple(args.dtype))
