"""The `moekit` command: a table from subcommand to a typed function whose docstring is its help.

Arguments are derived from each function's signature: parameters without a default are
positional, the rest are `--options`; `bool` becomes `--x/--no-x`, `list[T]` takes several
values, `Literal[...]` gives choices. The docstring's first paragraph is the command help, and an
`Args:` section gives per-option help. Implementations are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import typing
from pathlib import Path

COMMANDS: dict[str, str] = {
    "info": "moekit.info:info",
    "demo": "moekit.demo:demo",
    "data prepare": "moekit.data:prepare_cli",
    "train": "moekit.train.trainer:train_cli",
    "eval": "moekit.train.evaluate:eval_cli",
    "generate": "moekit.inference.cli:generate_cli",
    "bench": "moekit.bench.cli:bench_cli",
    "serve": "moekit.serve.cli:serve_cli",
    "bench serve": "moekit.bench.serve_cli:bench_serve_cli",
    "plan": "moekit.plan.cli:plan_cli",
    "convert": "moekit.checkpoint.convert:convert_cli",
    "upcycle": "moekit.checkpoint.upcycle:upcycle_cli",
    "compare": "moekit.train.compare:compare_cli",
    "sweep": "moekit.train.sweep:sweep_cli",
    "doctor": "moekit.doctor:doctor_cli",
    "simulate-ep": "moekit.distributed.cli:simulate_ep_cli",
    "quantize": "moekit.quant.cli:quantize_cli",
    "quant-report": "moekit.quant.cli:quant_report_cli",
    "prune": "moekit.memory.prune:prune_cli",
}


def _resolve(target: str):
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def _unavailable(name: str, err: Exception):
    """Stand-in for a command whose implementation cannot be imported (missing optional extra)."""
    missing = getattr(err, "name", None)

    def fn() -> int:
        from moekit.errors import MoekitError

        hint = "; install it (e.g. pip install 'moekit[dev]')" if missing else ""
        raise MoekitError(f"`moekit {name}` is unavailable: {err}{hint}")

    fn.__doc__ = f"(unavailable: {err})"
    return fn


def _doc_parts(fn) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    head, _, rest = doc.partition("\nArgs:\n")
    args: dict[str, str] = {}
    cur = None
    for line in rest.splitlines():
        s = line.strip()
        if not s:
            continue
        if ":" in s and not line.startswith("        ") and s.split(":", 1)[0].isidentifier():
            cur, text = s.split(":", 1)
            args[cur] = text.strip()
        elif cur:
            args[cur] += " " + s
    return head.strip(), args


def _add_params(parser: argparse.ArgumentParser, fn) -> None:
    hints = typing.get_type_hints(fn)
    _, arg_help = _doc_parts(fn)
    for name, p in inspect.signature(fn).parameters.items():
        tp = hints.get(name, str)
        origin = typing.get_origin(tp)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
            tp, origin, args = args[0], typing.get_origin(args[0]), typing.get_args(args[0])
        # argparse %-formats help strings: escape literal percent signs from docstrings.
        kw: dict = {"help": arg_help.get(name, "").replace("%", "%%")}
        flag = "--" + name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=p.default, **kw)
            continue
        if origin is list:
            kw["nargs"] = "+"
            tp = args[0] if args else str
        elif origin is typing.Literal:
            kw["choices"] = list(args)
            tp = type(args[0])
        kw["type"] = tp if tp in (int, float, str, Path) else str
        if p.default is inspect.Parameter.empty:
            parser.add_argument(name, **kw)
        else:
            if kw["help"] and p.default is not None:
                kw["help"] += f" (default: {p.default})".replace("%", "%%")
            parser.add_argument(flag, dest=name, default=p.default, **kw)


def build_parser(only: str | None = None, pair: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="moekit: Mixture-of-Experts LLM toolkit.")
    from moekit import __version__

    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, target in COMMANDS.items():
        parts = name.split()
        if parts[0] in COMMANDS and (name == parts[0]) == (pair is not None and pair.startswith(parts[0] + " ")):
            continue  # "bench serve" shadows "bench MODEL" only when asked for, and is hidden otherwise
        if only is not None and parts[0] != only:
            # Cheap entry for commands not being run: no import of their implementation.
            if parts[0] not in groups and parts[0] not in sub.choices:
                sub.add_parser(parts[0], help="")
            continue
        try:
            fn = _resolve(target)
        except (ImportError, AttributeError) as e:
            fn = _unavailable(name, e)
        head, _ = _doc_parts(fn)
        summary = head.split("\n\n")[0].replace("\n", " ")
        if len(parts) == 1:
            p = sub.add_parser(parts[0], help=summary.replace("%", "%%"), description=head.replace("%", "%%"),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        else:
            if parts[0] not in groups:
                gp = sub.add_parser(parts[0], help=f"{parts[0]} subcommands")
                groups[parts[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            p = groups[parts[0]].add_parser(parts[1], help=summary.replace("%", "%%"), description=head.replace("%", "%%"),
                                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_params(p, fn)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    words = " ".join([a for a in argv if not a.startswith("-")][:2])
    parser = build_parser(only=first if first in {n.split()[0] for n in COMMANDS} else None,
                          pair=words if words in COMMANDS and " " in words else None)
    ns = parser.parse_args(argv)
    fn = getattr(ns, "_fn", None)
    if fn is None:
        parser.print_help()
        return 0 if not argv else 2
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("_fn", "command", "subcommand")}
    from moekit.errors import MoekitError

    try:
        ret = fn(**kwargs)
    except MoekitError as e:
        print(f"moekit {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return ret if isinstance(ret, int) else 0


if __name__ == "__main__":
    sys.exit(main())

