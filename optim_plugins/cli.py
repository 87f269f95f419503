"""``optim-plugins``: list | describe NAME | demo | plot-schedule NAME | bench | run RECIPE."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _list(args: argparse.Namespace) -> int:
    import optim_plugins as op

    from .registry import get_optimizer_spec, get_scheduler_spec

    print("optimizers:")
    for name in op.list_optimizers():
        spec = get_optimizer_spec(name)
        print(f"  {name:<22} {spec.summary}")
    print("schedulers:")
    for name in op.list_schedulers():
        spec = get_scheduler_spec(name)
        print(f"  {name:<22} {spec.summary}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    import optim_plugins as op

    print(op.describe(args.name))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    losses = run_demo(optimizer=args.optimizer, lr=args.lr, steps=args.steps, schedule=args.schedule)
    if not losses[-1] < losses[0]:
        print("demo: the loss did not fall", file=sys.stderr)
        return 1
    print(f"demo: loss fell from {losses[0]:.4f} to {losses[-1]:.4f}")
    return 0


def _plot_schedule(args: argparse.Namespace) -> int:
    from .schedulers.plot import parse_option_pairs, plot_schedule

    out = plot_schedule(args.name, args.steps, parse_option_pairs(args.option, args.name), args.output)
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import DEFAULT_OUTPUT, run_suite

    suite = "memory" if args.memory else args.suite
    if args.output is None:
        args.output = DEFAULT_OUTPUT.get(suite, f"benchmarks/{suite}.md")
    command = ("optim-plugins bench " + " ".join(sys.argv[2:])).strip()
    print(run_suite(suite, args, command))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .recipes import run_recipe

    summary = run_recipe(args.recipe, args.set, args.output_dir, resume=args.resume)
    stages = summary["stages"]
    for stage, result in stages.items():
        if result.get("eval_loss_start") is not None:
            print(f"{stage}: eval loss {result['eval_loss_start']:.4f} -> {result['eval_loss_end']:.4f} "
                  f"(perplexity {result['eval_perplexity_end']:.2f}), {result['global_step']} steps")
    print(f"run: {summary['seconds']:.0f} s; metrics, plots and checkpoints in {summary['output_dir']}")
    return 0


def _plot_telemetry(args: argparse.Namespace) -> int:
    from .telemetry import plot_heatmap

    out = plot_heatmap(args.source, args.output, metric=args.metric, log=not args.linear)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import SUITES

    parser = argparse.ArgumentParser(prog="optim-plugins", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print every registered optimizer and schedule").set_defaults(run=_list)
    describe = commands.add_parser("describe", help="options, defaults and docs of one optimizer or schedule")
    describe.add_argument("name")
    describe.set_defaults(run=_describe)
    demo = commands.add_parser("demo", help="train a small classifier and print its loss falling")
    demo.add_argument("--optimizer", default="adamw")
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--schedule", default="constant")
    demo.set_defaults(run=_demo)
    plot = commands.add_parser("plot-schedule", help="write a PNG of a schedule's lr (and cycled momentum) per step")
    plot.add_argument("name")
    plot.add_argument("--steps", type=int, required=True, help="num_training_steps")
    plot.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a schedule option, typed by its schema (repeatable), e.g. num_warmup_steps=100")
    plot.add_argument("-o", "--output", default="lr.png")
    plot.set_defaults(run=_plot_schedule)
    heat = commands.add_parser("plot-telemetry", help="write a PNG heat map (layers x steps) of op.telemetry records")
    heat.add_argument("source", metavar="RUN_DIR_OR_JSON", help="a telemetry JSON-lines file, or a run directory holding telemetry*.jsonl")
    heat.add_argument("-o", "--output", default="telemetry.png")
    heat.add_argument("--metric", default="update_ratio",
                      help="update_ratio (default), grad_norm, update_norm, weight_norm, lr or second_moment")
    heat.add_argument("--linear", action="store_true", help="plot values, not log10 of them")
    heat.set_defaults(run=_plot_telemetry)
    bench = commands.add_parser("bench", help="time optimizer steps side by side with torch.optim; write a table")
    bench.add_argument("--optimizers", default="adamw,sgd,rmsprop", help="comma-separated registry names")
    bench.add_argument("--params", type=float, default=4e6, help="number of fp32 parameters")
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--suite", default="speed", choices=sorted(SUITES),
                       help="; ".join(f"{name}: {text}" for name, text in SUITES.items()))
    bench.add_argument("-o", "--output", default=None, help="table file (default: benchmarks/<suite>.md; '' for none)")
    bench.add_argument("--memory", action="store_true", help="same as --suite memory")
    bench.add_argument("--dtype", default="float32", help="parameter dtype for --memory (float32, bfloat16)")
    bench.set_defaults(run=_bench)
    run = commands.add_parser("run", help="run a recipe YAML (recipes/): train, write metrics, plots, checkpoints")
    run.add_argument("recipe", help="a recipe YAML, or the name of one under recipes/ (llm_finetune)")
    run.add_argument("--resume", action="store_true", help="continue the run in the output directory from its last checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key (dotted, value read as YAML; repeatable), e.g. finetune.max_steps=10 or smoke=true")
    run.add_argument("--output-dir", default=None, help="output directory (default: the recipe's output_dir)")
    run.set_defaults(run=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:  # bad names and options: a clear message, no traceback
        print(f"optim-plugins: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
