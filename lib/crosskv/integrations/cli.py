"""``python -m crosskv <command>``: eval, list, assets, bench, overhead (method bytes), search (KVSharer), figures.

Each command is a pair of functions — ``configure(parser)`` adds its arguments, ``run(args) -> int``
does the work — listed in :data:`SUBCOMMANDS`; a new command is one more entry. Expected errors
(unknown method/task/parameter, a context too long for the model, a bad jsonl line, a hub-only task
offline, a device this machine lacks, an output file in a missing folder) print one line on stderr and exit
with code 2 — output paths and file parameters are checked before any model loads; the library itself only logs.

``eval`` prints one JSON object per run as the last line of stdout (``--out FILE`` appends it to a
jsonl file too). Under ``torchrun --nproc_per_node N python -m crosskv eval ...`` samples are
sharded across ranks (gloo on CPU, nccl on GPU) and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import traceback
import typing
from dataclasses import dataclass
from typing import Any, Callable

from crosskv.evidence import figures
from crosskv.integrations.argtypes import nonnegative_int, output_file, output_folder, positive_float, positive_int
from crosskv.methods import kvsharer
from crosskv.core.params import coerce

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ("key", "model", "dtype", "method", "params", "task", "context", "samples", "seed", "options",
                  "score", "metric", "kv_bytes", "kv_bytes_full", "kept", "method_bytes", "factor", "kept_16bit", "kv_bytes_end",
                  "kv_bytes_full_end", "kept_end", "prefill_s", "compress_s", "decode_tok_s", "peak_mem_bytes",
                  "seconds", "world_size")
PROMPT_SPLIT_NOTE = ("All methods compress only the context part of a prompt (chat prefix + instruction + "
                     "haystack); the question, generation prompt and decoded tokens are appended exactly. "
                     "kvpress presses prune during the context prefill (their default), crosskv methods in "
                     "compress() right after it: like for like.")


@dataclass(frozen=True)
class Subcommand:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# --- eval ------------------------------------------------------------------------------------------

def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder or hub id (default: %(default)s)")
    p.add_argument("--method", required=True, help="registered method name (see `crosskv list`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--task", required=True, help="task name, jsonl:PATH or longbench:<task>")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="task option (repeatable), e.g. depth=50")
    p.add_argument("--context", type=positive_int, default=2048, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--samples", type=positive_int, default=10)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--out", type=output_file, default=None, help="also append the JSON summary to this jsonl file")
    p.add_argument("--results-dir", type=output_folder, default=None,
                   help="results store (default: $CROSSKV_RESULTS or data/results)")
    p.add_argument("--force", action="store_true", help="recompute even if the run is stored")
    p.add_argument("--no-store", action="store_true", help="neither read nor write the results store")
    p.add_argument("--details", action="store_true", help="include per-sample details in the printed JSON")
    add_threads(p)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (1 is fastest on a shared machine; default: torch's choice)")


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _init_distributed(device: str | None) -> str | None:
    """Join the torchrun process group when WORLD_SIZE > 1; return the device this rank should use."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device or "cpu"


def refuse_meta(args: argparse.Namespace) -> None:
    """``--device meta`` holds no weights: only ``overhead`` (binding, no forward) runs there."""
    if str(getattr(args, "device", "") or "").startswith("meta"):
        raise ValueError(f"--device meta: {args.command} runs the model, and the meta device holds no weights "
                         "(use `crosskv overhead --device meta` for shapes)")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from crosskv.run import harness
    from crosskv.methods import make_method
    from crosskv.core.models import load_model
    from crosskv.tasks import make_task

    refuse_meta(args)
    method = make_method(args.method, **_pairs(args.set, "--set"))
    task = make_task(args.task, args.context, args.samples, args.seed, **_pairs(args.opt, "--opt"))
    set_threads(args)
    device = _init_distributed(args.device)
    try:
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
        record = harness.evaluate(model, tokenizer, method, task, force=args.force, store=not args.no_store,
                                  results_dir=args.results_dir)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    summary = {k: record.get(k) for k in SUMMARY_FIELDS}
    if args.details:
        summary["details"] = record.get("details")
    line = json.dumps(summary, default=str)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    print(line)
    return 0


# --- list ------------------------------------------------------------------------------------------

def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=("methods", "compositions", "tasks", "all"), default="all")


def run_list(args: argparse.Namespace) -> int:
    from crosskv.methods import REGISTRY
    from crosskv.methods.base import method_fields
    from crosskv.tasks import FAMILIES, TASKS, get_task
    from crosskv.tasks.longbench import LONGBENCH

    lines = []
    if args.what in ("methods", "all"):
        lines += ["Methods (--method NAME, --set key=value):", f"  note: {PROMPT_SPLIT_NOTE}"]
        for name in sorted(REGISTRY):
            cls = REGISTRY[name]
            lines.append(f"  {name}: {cls.description}")
            if cls.note:
                lines.append(f"      note: {cls.note}")
            for field, (annotation, default) in method_fields(cls).items():
                lines.append(f"      {field}: {_type_name(annotation)} = {default!r}")
    if args.what in ("compositions", "all"):
        lines += composition_lines()
    if args.what in ("tasks", "all"):
        get_task("ppl")  # loads every task module
        lines.append("Tasks (--task NAME, --opt key=value; --context is the prompt length in tokens):")
        for name in sorted(TASKS):
            spec = TASKS[name]
            opts = ", ".join(f"{k}: {_type_name(t)} = {d!r}" for k, (t, d) in spec.options.items())
            lines.append(f"  {name} [{spec.kind}, {spec.metric}{'' if spec.higher_is_better else ', lower is better'}]"
                         f": {spec.description}")
            if opts:
                lines.append(f"      options: {opts}")
        for prefix in sorted(FAMILIES):
            lines.append(f"  {prefix}:{'PATH' if prefix == 'jsonl' else '<task>'}")
        for prefix, example in (("jsonl", "jsonl:PATH"), ("longbench", "longbench:hotpotqa")):
            opts = ", ".join(f"{k}: {_type_name(t)} = {d!r}" for k, (t, d) in get_task(example).options.items())
            lines.append(f"      {prefix} options: {opts}")
        lines.append(f"      longbench tasks (need the hub): {', '.join(LONGBENCH)}; max_new_tokens = 0 means "
                     "LongBench's own length")
    print("\n".join(lines))
    return 0


def composition_lines() -> list[str]:
    """``crosskv list compositions``: the base × evict × bits matrix of ``compose``, one line per base and rule."""
    from crosskv.methods.compose import BUDGET_RULE, EVICTIONS, PARAMETER_REFUSALS, composition_matrix

    lines = ["Compositions (--method compose --set base=B evict=E evict_ratio=R bits=N): evict → base → quantize",
             f"  budget rule: {BUDGET_RULE}", "  bits > 0: quantization of whatever the cache stores, last"]
    groups: dict[tuple, list[dict]] = {}
    for row in composition_matrix():
        groups.setdefault((row["base"], row["supported"], row["rule"]), []).append(row)
    every_evict = len(EVICTIONS)
    for (base, supported, rule), rows in groups.items():
        evicts = list(dict.fromkeys(r["evict"] for r in rows))
        evicts = "any" if len(evicts) == every_evict else ",".join(evicts)
        bits = ",".join(dict.fromkeys(str(r["bits"]) for r in rows))
        lines.append(f"  {base:<26} evict={evicts:<58} bits={bits:<8} {'supported' if supported else 'REFUSED'}: {rule}")
    lines += [f"  refused: {reason}" for reason in PARAMETER_REFUSALS]
    return lines


# --- assets, bench ---------------------------------------------------------------------------------

def configure_assets(p: argparse.ArgumentParser) -> None:
    pass


def run_assets(args: argparse.Namespace) -> int:
    from crosskv.core.assets import ensure_assets

    for name, path in ensure_assets().items():
        print(f"{name}: {path}")
    return 0


def configure_bench(p: argparse.ArgumentParser) -> None:
    from crosskv.run.bench import DEFAULT_METHODS, DEFAULT_MODES, MODES

    p.add_argument("--model", default="smollm2-135m", help="alias, random:<shape>, local folder or hub id")
    p.add_argument("--contexts", type=positive_int, nargs="+", default=[2048, 4096])
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=None, help="default: 1")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="method names or name:key=value,… specs (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=nonnegative_int, default=1)
    p.add_argument("--decode-tokens", type=positive_int, default=32)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES,
                   help="eager; compiled: decode steps under torch.compile(fullgraph=True, dynamic=True); static: "
                        "the cache frozen after the question, steps under mode=reduce-overhead (default: eager)")
    p.add_argument("--memory-gb", type=positive_float, default=None, metavar="GB",
                   help="throughput at fixed memory: each method runs at the largest batch whose weights, cache and "
                        "peak temporaries fit in GB GiB (from a batch-1 run; excludes --batch-sizes)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=output_file, default=None, help="also write the table as CSV to this file")
    add_threads(p)


def run_bench(args: argparse.Namespace) -> int:
    from crosskv.run.bench import bench
    from crosskv.core.models import load_model

    refuse_meta(args)
    if args.memory_gb is not None and args.batch_sizes:
        raise ValueError(f"--memory-gb {args.memory_gb} picks each method's batch: drop --batch-sizes")
    set_threads(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    table = bench(model, tokenizer, args.methods, args.contexts, batch_sizes=args.batch_sizes or [1],
                  repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens, seed=args.seed,
                  modes=args.modes, memory_gb=args.memory_gb)
    shown = table.drop(columns=["device", "machine", "model", "dtype"])
    print(f"{table['model'][0]} ({table['dtype'][0]}) on {table['machine'][0]}, device {table['device'][0]}")
    print(shown.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


SEARCH_CHOICES = {"metric": kvsharer.METRICS, "order": kvsharer.ORDERS, "criterion": kvsharer.CRITERIA}


def search_option(name: str) -> Callable[[str], Any]:
    """argparse type of the search option ``name``: parsed by its :class:`~crosskv.methods.kvsharer.SearchOptions`
    annotation and refused with :class:`~crosskv.methods.kvsharer.SearchConfig`'s own message."""
    annotation = typing.get_type_hints(kvsharer.SearchOptions)[name]

    def parse(text: str) -> Any:
        try:
            value = coerce(text, annotation, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        probe = {"shared_layers": None, "rate": value} if name == "rate" else {name: value}
        try:
            dataclasses.replace(kvsharer.SearchConfig(shared_layers=1), **probe)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text} is refused: {err}") from None
        return value
    parse.__name__ = name
    return parse


def configure_overhead(p: argparse.ArgumentParser) -> None:
    from crosskv.run.bench import DEFAULT_METHODS

    p.add_argument("--model", default="smollm2-135m",
                   help="alias, random:<shape>, local folder or hub id (random:<shape> also on --device meta)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="method names or name:key=value,… specs (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, or meta (random:<shape> only: from shapes, nothing allocated)")
    p.add_argument("--out", type=output_file, default=None, help="also write the table as CSV to this file")


def run_overhead(args: argparse.Namespace) -> int:
    from crosskv.core.models import load_model
    from crosskv.run.bench import overhead

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    table = overhead(model, tokenizer, args.methods)
    print(f"{args.model} on {args.device}: method_bytes = bytes a method adds to the model while installed, minus "
          "model weights it lets a deployment drop (negative: a net saving)")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


def configure_search(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``python -m crosskv search`` (added to ``parser`` if given): one flag per field of
    :class:`~crosskv.methods.kvsharer.SearchOptions`, with its default and help."""
    parser = parser or argparse.ArgumentParser(prog="crosskv search", description="KVSharer strategy search")
    parser.add_argument("--model", default="smollm2-135m", help="model alias, folder or hub id")
    amount = parser.add_mutually_exclusive_group(required=True)
    for option in dataclasses.fields(kvsharer.SearchOptions):
        target = amount if option.name in ("shared_layers", "rate") else parser
        target.add_argument("--" + option.name.replace("_", "-"), type=search_option(option.name),
                            default=option.default, choices=SEARCH_CHOICES.get(option.name),
                            help=option.metadata["help"] + " (default: %(default)s)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="model dtype (default: the loader's, bfloat16)")
    parser.add_argument("--device", default=None)
    add_threads(parser)
    parser.add_argument("--out", type=output_file, required=True, help="where to write the strategy JSON")
    return parser


def run_search(args: argparse.Namespace) -> int:
    """Run the search described by parsed :func:`configure_search` arguments and write ``args.out``."""
    from crosskv.core.models import load_model
    from crosskv.methods.kvsharer_search import search

    config = kvsharer.SearchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kvsharer.SearchOptions)})
    refuse_meta(args)
    set_threads(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    strategy = search(model, tokenizer, config, progress=True)
    path = strategy.save(args.out)
    log.info("%d consumers %s in %.1f s (%d candidates) → %s", len(strategy.mapping), strategy.mapping,
             strategy.search_seconds, strategy.candidates_tried, path)
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "eval": Subcommand("score one method on one task (one JSON line on stdout)", configure_eval, run_eval),
    "list": Subcommand("list methods (parameters, defaults) and tasks (options)", configure_list, run_list),
    "assets": Subcommand("fetch, verify and convert the embedded model and corpus", configure_assets, run_assets),
    "bench": Subcommand("prefill/compress/decode speed, held bytes and peak memory of methods × contexts",
                        configure_bench, run_bench),
    "overhead": Subcommand("method_bytes of methods on a model (random:<shape> on the meta device: from shapes)",
                           configure_overhead, run_overhead),
    "search": Subcommand("KVSharer strategy search on calibration data -> strategy JSON",
                         configure_search, run_search),
    "figures": Subcommand("execute the notebooks under a parameter profile and regenerate figures/",
                          figures.configure_cli, figures.run_cli),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosskv", description="Cross-layer KV-cache compression: run and measure.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in SUBCOMMANDS.items():
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m crosskv`` and the ``crosskv`` script; returns the exit code."""
    from crosskv.core.assets import AssetError
    from crosskv.tasks import TaskUnavailableError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return SUBCOMMANDS[args.command].run(args)
    except (ValueError, OSError, AssetError, TaskUnavailableError) as err:
        if args.verbose:
            traceback.print_exc()
        print(f"crosskv {args.command}: error: {err}", file=sys.stderr)
        return 2
