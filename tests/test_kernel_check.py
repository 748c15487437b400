"""`token-objectives check-kernels`: the Triton kernels compiled ahead of time for real GPUs (no
GPU needed), their SASS read for spills and for the full-vocab loop's static instruction count,
and the PTX read for 128-bit loads when the real width is not a multiple of 16."""

from __future__ import annotations

import importlib.util
import re

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("the test extra installs triton (x86-64 Linux)", allow_module_level=True)

from token_objectives.cli import main
from token_objectives.ops import kernel_check
from token_objectives.ops.kernel_check import Variant

LAST_LINE = re.compile(r"ntl/ce instructions per element: (\d+\.\d+)")


def _variant(kernel: str, dtype: str, **on: bool) -> Variant:
    return next(v for v in kernel_check.variants((dtype,))
                if v.kernel == kernel and all(dict(v.flags)[k] == b for k, b in on.items()))


def test_check_kernels_builds_every_variant_for_sm90_without_spills(capsys):
    code = main(["check-kernels", "--arch", "sm_90", "--dtype", "bf16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, "\n".join(lines)
    rows = [line.split() for line in lines[1:-1]]
    # 30 constexpr combinations per kernel: the 16 of (numbers, wasserstein, squash, mean logit,
    # gaussian), and the 14 of them with the number loop, again over digit groups (grouped).
    assert len(rows) == 60 and all(row[0] == "sm_90" and row[5] == "0" for row in rows), lines
    ratio = float(LAST_LINE.fullmatch(lines[-1]).group(1))
    assert ratio <= 1.2, "\n".join(lines)


@pytest.mark.parametrize("arch", ["sm_80", "sm_100"])
def test_ntl_costs_the_full_vocab_loop_almost_nothing(arch):
    reports = [kernel_check.check(_variant("forward", "bf16", NUMBERS=numbers,
                                           WASSERSTEIN=numbers, SQUASH=numbers,
                                           MEAN_LOGIT=False), arch)
               for numbers in (False, True)]
    assert all(r.spills == 0 for r in reports)
    assert kernel_check.ntl_over_ce(reports) <= 1.2, [r.per_element for r in reports]


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_a_real_width_off_a_multiple_of_16_keeps_128_bit_accesses(kernel):
    ptx = kernel_check.compile_variant(_variant(kernel, "bf16", NUMBERS=True), "sm_90").asm["ptx"]
    access = "ld" if kernel == "forward" else "st"
    # Every access to the logits row (the 16-bit ones are the gathered number / target columns)
    # in the loops over whole blocks and the masked last block is 128-bit.
    vector = len(re.findall(rf"\b{access}\.global(\.nc)?\.v4\.b32\b", ptx))
    narrow = len(re.findall(rf"\b{access}\.global(\.nc)?\.b16\b", ptx))
    assert vector >= 4 and narrow <= 2, (
        f"{kernel}: {vector} 128-bit and {narrow} 16-bit {access}.global: the block loops lost "
        f"their vector width")


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   NOP ;
        /*0030*/                   FADD R5, R4, R5 ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   FMUL R6, R5, R5 ;
        /*0060*/               @P1 BRA `(.L_x_2) ;
.L_x_3:
        /*0070*/                   BRA `(.L_x_3);
"""


def test_loops_are_read_from_the_backward_branches():
    bodies = kernel_check.loops(SASS)
    assert [len(b) for b in bodies] == [3, 2]  # NOPs and the trap's self-branch left out
    assert bodies[0][0].startswith("LDG.E.128")


def test_a_spill_or_a_compile_error_fails_the_check(monkeypatch):
    variant = _variant("forward", "bf16", NUMBERS=False, MEAN_LOGIT=False)
    spilled = kernel_check.Report(variant, "sm_90", registers=255, local_bytes=8, spills=2,
                                  loop_instructions=160, per_thread=16)
    monkeypatch.setattr(kernel_check, "variants", lambda dtypes: [variant])
    monkeypatch.setattr(kernel_check, "check", lambda v, arch: spilled)
    lines = []
    assert kernel_check.run(("sm_90",), ("bf16",), out=lines.append) == 1
    assert lines[-1] == "ntl/ce instructions per element: 1.00"

    def broken(v, arch):
        raise RuntimeError("ptxas fatal: something\nPTXAS error: out of registers")

    monkeypatch.setattr(kernel_check, "check", broken)
    lines.clear()
    assert kernel_check.run(("sm_90",), ("bf16",), out=lines.append) == 1
    assert "compile error: RuntimeError: PTXAS error: out of registers" in lines[1]


def test_an_unknown_architecture_is_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        main(["check-kernels", "--arch", "hopper"])
    assert "use e.g. sm_90" in capsys.readouterr().err
