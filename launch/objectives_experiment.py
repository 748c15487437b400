"""CE against CE + NTL-WAS, CE + NTL-MSE, CE + Gaussian targets and CE + PDL on an arithmetic
task a tiny Llama learns on a 2-core CPU, plus CE against CE + NTL-WAS with the Llama-3
tokenization; paired seeds, 95% intervals, figures (docs/experiments/README.md):

    python launch/objectives_experiment.py --output-dir docs/experiments \
        --docs-page docs/experiments/README.md          # the measured run (about 35 minutes)
    python launch/objectives_experiment.py --quick      # the same pipeline in a minute
    python launch/objectives_experiment.py --render --output-dir docs/experiments \
        --docs-page docs/experiments/README.md          # table and figures from results.json

Writes into --output-dir: results.json (every run's metrics, curves and first generations; the
paired differences with their intervals), results.md (the table made from it),
learning_curves.png and differences.png; with --docs-page, the table into that page too.
Runs --workers runs at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")

REPO = Path(__file__).resolve().parents[1]
# The arms run with the Llama-3 tokenization: the baseline and the paper's NTL.
LLAMA3_ARMS = ("CE", "CE + NTL-WAS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from token_objectives.experiments.run import ARMS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "objectives")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                        help="the digit-level arms (CE is always run)")
    parser.add_argument("--no-llama3", action="store_true",
                        help=f"leave out the Llama-3 arms {list(LLAMA3_ARMS)}")
    parser.add_argument("--quick", action="store_true",
                        help="20 steps of a 1-layer model on 40 problems, seeds 1 and 2: the "
                        "pipeline end to end, not the science")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--docs-page", type=Path,
                        help="a docs page whose results block gets the table")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: remake results.md, the figures and the docs "
                        "page's table from --output-dir/results.json")
    args = parser.parse_args(argv)
    args.seeds = list(dict.fromkeys(args.seeds))
    if "CE" not in args.arms:
        args.arms = ["CE", *args.arms]
    if args.quick and args.seeds == parser.get_default("seeds"):
        args.seeds = [1, 2]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads((args.output_dir / "results.json").read_text(encoding="utf-8"))
    else:
        results = run_all(args, argv)
        (args.output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n",
                                                      encoding="utf-8")
    text = render(results, args.output_dir, args.docs_page)
    print(f"\n{text}\n\n{len(results['runs'])} runs in {results['seconds']:.0f} s; "
          f"{args.output_dir}", flush=True)
    return 0


def run_all(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Every run, two (--workers) at a time; what results.json holds."""
    from token_objectives.experiments import report
    from token_objectives.experiments.run import Settings, decile_members, run_arm

    settings = Settings.quick() if args.quick else Settings()
    jobs = [(arm, "digits", seed) for seed in args.seeds for arm in args.arms]
    if not args.no_llama3:
        jobs += [(arm, "llama3", seed) for seed in args.seeds for arm in LLAMA3_ARMS]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    print(f"{len(jobs)} runs, {args.workers} at a time; settings {asdict(settings)}", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_arm, arm, vocabulary, seed, settings): (arm, vocabulary, seed)
                   for arm, vocabulary, seed in jobs}
        try:
            for future in as_completed(futures):
                rows.append(future.result())
                _print_row(rows[-1], len(rows), len(jobs), time.perf_counter() - start)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    order = {job: i for i, job in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["arm"], r["vocabulary"], r["seed"])])
    return report.assemble(
        rows, command=shlex.join(["python", "launch/objectives_experiment.py",
                                  *(sys.argv[1:] if argv is None else argv)]),
        seconds=time.perf_counter() - start, machine=f"{platform.machine()}, {_cores()} cores",
        settings=asdict(settings), seeds=args.seeds,
        decile_members={"digits": decile_members("digits", settings)})


def render(results: dict, out: Path, docs_page: Path | None) -> str:
    """results.md, learning_curves.png and differences.png into `out`, and the table into the
    docs page's results block; returns the table."""
    from token_objectives.experiments import figures, report

    text = report.markdown(results)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    figures.learning_curves(results, out / "learning_curves.png")
    figures.differences(results, out / "differences.png")
    if docs_page:
        report.replace_block(docs_page, text)
    return text


def _print_row(row: dict, done: int, total: int, seconds: float) -> None:
    m = row["metrics"]
    print(f"[{done}/{total} {seconds:5.0f} s] {row['vocabulary']:6} {row['arm']:13} seed "
          f"{row['seed']}: exact {m['exact_accuracy']:.3f}, MAE {m['mae']:.1f}, digit error "
          f"{m['digit_error']:.3f}, answer CE {row['valid_ce']:.3f} "
          f"({row['train_seconds']:.0f} s training)", flush=True)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
