"""``optim-plugins``: list | describe NAME | demo | plot-schedule NAME | bench | run RECIPE | lr-find RECIPE | compare RECIPE."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _probe_state_bytes(name: str) -> float | None:
    """State bytes per parameter of ``name`` after one step on a 64x64 weight and a 64 bias (fp32,
    4160 parameters, 8-bit states included); None where one step on a bare tensor list is not possible."""
    from .bench.memory import state_bytes_after_one_step

    try:
        return state_bytes_after_one_step(name, 64)[0]
    except Exception:  # a plugin that needs a model, a device or more: the column says "?"
        return None


def _backends(spec) -> list[str]:
    """The backends an optimizer runs with here (each ``backend=`` tried once on a probe tensor)."""
    import typing

    import torch

    option = spec.options.get("backend")
    if option is None:
        return ["torch"]
    if not spec.capabilities.elementwise:
        return ["reference"]  # whole-tensor math steps tensor by tensor whatever backend= says
    names = [b for b in typing.get_args(option.annotation) if b != "auto"]
    ok = []
    for backend in names:
        try:
            spec.factory([torch.nn.Parameter(torch.zeros(2))], backend=backend)
            ok.append(backend)
        except Exception:
            pass
    return ok


def _list(args: argparse.Namespace) -> int:
    import warnings

    import optim_plugins as op

    from .registry import get_optimizer_spec, get_scheduler_spec

    rows = []
    for name in op.list_optimizers():
        spec = get_optimizer_spec(name)
        caps = spec.capabilities
        flags = [f for f in ("elementwise", "needs_closure", "needs_create_graph", "needs_model", "train_eval", "amp_aware")
                 if getattr(caps, f)]
        module = getattr(spec.factory, "__module__", "") or ""
        family = module.rsplit(".", 1)[-1] if module.startswith("optim_plugins.") else module.split(".")[0] or "?"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = None if args.no_memory else _probe_state_bytes(name)
        memory = "-" if args.no_memory else ("?" if state is None else f"{state:.2f}")
        rows.append((name, family, memory, ",".join(_backends(spec)), f"shard:{caps.shardable}", " ".join(flags) or "-"))
    head = ("optimizer", "family", "state B/param", "backends", "sharding", "flags")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()  # noqa: E731
    print("\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)]))
    print("state B/param: bytes of optimizer state per parameter after one step on a 64x64 + 64 fp32 probe "
          "(factored states grow slower than the tensor; `optim-plugins bench --suite memory` measures 1M parameters)")
    print("\nschedulers:")
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
    from .recipes import dry_run, process_rank, run_recipe, stage_line, task_of

    if args.dry_run:
        if args.resume:
            raise ValueError("--dry-run with --resume: a dry run trains nothing, so there is nothing to resume")
        print(dry_run(args.recipe, args.set, args.output_dir), end="")
        return 0
    summary = run_recipe(args.recipe, args.set, args.output_dir, resume=args.resume)
    if process_rank()[0] != 0:  # under torchrun: rank 0 reports
        return 0
    task = task_of({"task": summary["recipe"]})
    for stage, result in summary["stages"].items():
        print(f"{stage}: " + stage_line(result, task))
    print(f"run: {summary['seconds']:.0f} s; metrics, plots and checkpoints in {summary['output_dir']}")
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    from .recipes import lr_find_recipe

    result = lr_find_recipe(args.recipe, args.set, stage=args.stage, num_steps=args.steps, start_lr=args.start_lr,
                            end_lr=args.end_lr, output=args.output)
    if result.suggested_lr is None:
        print(f"lr-find: no suggestion (the loss diverged within {len(result.lrs)} steps); lowest loss at lr "
              f"{result.min_loss_lr}")
    else:
        print(f"lr-find: suggested lr {result.suggested_lr:.3g} (steepest fall of the smoothed loss); "
              f"lowest loss at lr {result.min_loss_lr:.3g}" + ("; diverged after that" if result.diverged else ""))
    print(f"wrote {args.output}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .recipes import compare_recipe

    compare_recipe(args.recipe, args.optimizers.split(","), args.set, args.output_dir)
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
    listing = commands.add_parser("list", help="table of every optimizer (family, state bytes/param, backends, flags) and schedule")
    listing.add_argument("--no-memory", action="store_true", help="skip the state-size probe (one step per optimizer)")
    listing.set_defaults(run=_list)
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
    bench.add_argument("--optimizers", default=None, help="comma-separated registry names (default: the suite's)")
    bench.add_argument("--params", type=float, default=None, help="number of fp32 parameters (default: the suite's)")
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--suite", default="speed", choices=sorted(SUITES),
                       help="; ".join(f"{name}: {text}" for name, text in SUITES.items()))
    bench.add_argument("-o", "--output", default=None, help="table file (default: benchmarks/<suite>.md; '' for none)")
    bench.add_argument("--memory", action="store_true", help="same as --suite memory")
    bench.add_argument("--dtype", default="float32", help="parameter dtype for --memory (float32, bfloat16)")
    bench.set_defaults(run=_bench)
    sets = dict(action="append", default=[], metavar="KEY=VALUE",
                help="override a recipe key (dotted, value read as YAML; repeatable), e.g. finetune.max_steps=10 or smoke=true")
    run = commands.add_parser("run", help="run a recipe YAML (recipes/): train, write metrics, plots, checkpoints")
    run.add_argument("recipe", help="a recipe YAML, or the name of one under recipes/ (llm_finetune, asr_finetune, ...)")
    run.add_argument("--resume", action="store_true", help="continue the run in the output directory from its last checkpoint")
    run.add_argument("--set", **sets)
    run.add_argument("--output-dir", default=None, help="output directory (default: the recipe's output_dir)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved recipe and the parameter-group table; train nothing, write nothing")
    run.set_defaults(run=_run)
    finder = commands.add_parser("lr-find", help="lr range test on a recipe's model, data and optimizer; print the suggested lr, plot")
    finder.add_argument("recipe")
    finder.add_argument("--set", **sets)
    finder.add_argument("--stage", default=None, help="whose data (default: the first stage that trains)")
    finder.add_argument("--steps", type=int, default=100, help="batches of the test (>= 2)")
    finder.add_argument("--start-lr", type=float, default=1e-6)
    finder.add_argument("--end-lr", type=float, default=1.0)
    finder.add_argument("-o", "--output", default="lr_find.png", help="plot of loss against lr")
    finder.set_defaults(run=_lr_find)
    compare = commands.add_parser("compare", help="run one recipe per optimizer; write a comparison table and plot")
    compare.add_argument("recipe")
    compare.add_argument("--optimizers", required=True,
                         help="comma-separated registry names, each optionally with options: adamw:lr=3e-3,lion:lr=3e-4,maxfactor")
    compare.add_argument("--set", **sets)
    compare.add_argument("--output-dir", default=None, help="default: the recipe's output_dir + '_compare'")
    compare.set_defaults(run=_compare)
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
