"""The command line's parser and its entry points, `main` and `entry` (see `rotjax.cli`)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import jax

from rotjax import __version__, match
from rotjax.cli import _align, _inspect, _merge
from rotjax.cli._common import CLIError, Interrupted, reason, signals_interrupt

# Set to 1: errors that exit 2 raise with their traceback instead (for reporting a bug).
TRACEBACK_ENV = "ROTJAX_TRACEBACK"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _seed(text: str) -> int:
    """A random seed: what `jax.random.key` takes, 0 <= n < 2^63."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 2^63)")
    return value


def _layer_list(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a layer index") from None
        if out[-1] < 0:
            raise argparse.ArgumentTypeError(f"{out[-1]} is not a layer index (>= 0)")
        if out[-1] in out[:-1]:  # (recorded twice in alignment.json)
            raise argparse.ArgumentTypeError(f"layer {out[-1]} given twice")
    if not out:
        raise argparse.ArgumentTypeError("no layer index given")
    return tuple(out)


def blocks(text: str) -> tuple[str, ...]:
    """``"rotation,scale"`` -> ``("rotation", "scale")``: an argparse ``type`` for lists of
    `rotjax.match.BLOCKS` (``ArgumentTypeError`` naming the unknown ones), or ``"all"`` /
    ``"paper"`` alone (kept as such: `rotjax align` resolves them)."""
    if text.strip() in ("all", "paper"):
        return (text.strip(),)
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in match.BLOCKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown blocks {unknown or [text]}; choose from {','.join(match.BLOCKS)} "
            "(or all, or paper, alone)"
        )
    return names


class _UsageError(CLIError):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, as every other bad input
        # argparse takes a value starting with "-" that is not one number (`--weights -1,2`)
        # for an option, and said only that the value was missing
        if m := re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: expected one argument", message):
            message += f" (a value that starts with '-' is written {m[1]}=VALUE)"
        raise _UsageError(self.prog, message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rotjax",
        description="Align and merge transformer checkpoints through their parameter symmetries.",
        epilog=f"{TRACEBACK_ENV}=1 in the environment: an error raises with its traceback "
        "instead of exiting 2 with one message",
    )
    p.add_argument("--version", action="version", version=f"rotjax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    i = sub.add_parser("inspect", help="architecture, symmetry groups and parameter counts")
    i.add_argument("dir", help="Hugging Face checkpoint directory (config.json + weights)")
    i.set_defaults(run=_inspect.run)
    fmt = argparse.RawDescriptionHelpFormatter
    a = sub.add_parser(
        "align",
        help="align MODEL_DIR to ANCHOR_DIR and write it as a Hugging Face checkpoint",
        epilog=_align.EPILOG,
        formatter_class=fmt,
    )
    _align.add_arguments(
        a, blocks=blocks, positive_int=_positive_int, layer_list=_layer_list, seed=_seed
    )
    a.set_defaults(run=_align.run)
    m = sub.add_parser(
        "merge",
        help="align models to the first one and merge them into one checkpoint",
        epilog=_merge.EPILOG,
        formatter_class=fmt,
    )
    _merge.add_arguments(m, positive_int=_positive_int, seed=_seed)
    m.set_defaults(run=_merge.run)
    return p


def entry() -> None:
    """The ``rotjax`` console script: exits with `main`'s status. After an interrupt it exits
    at once (``os._exit``, the streams flushed): the temporary files are gone by then, and the
    interpreter's shutdown, with XLA's threads still running the interrupted computation,
    crashed (a segmentation fault, status 139, in about 1 run in 3)."""
    code = main()
    if code > 128:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    command, out = "rotjax", None
    try:
        with signals_interrupt():
            args, extra = parser().parse_known_args(argv)
            if extra:  # (argparse names the top-level command, not the one they were given to)
                raise _UsageError(
                    f"rotjax {args.command}", f"unrecognized arguments: {' '.join(extra)}"
                )
            command, out = f"rotjax {args.command}", getattr(args, "out", None)
            return args.run(args)
    except _UsageError as e:
        print(f"{e.prog}: error: {reason(e)} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except Interrupted as e:
        # the checkpoint appears whole or not at all: after it, only printing was left
        written = out is not None and Path(out).is_dir() and any(Path(out).iterdir())
        done = f"{out} written whole before it" if written else "nothing written"
        print(f"{command}: interrupted ({e}); {done}", file=sys.stderr)
        return 128 + e.signum
    except (CLIError, ValueError, OSError, ImportError, TypeError) as e:
        if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes"):
            # with the error it reports, where it names one by `raise ... from None`
            e.__suppress_context__ = False
            raise
        print(f"{command}: error: {reason(e)}", file=sys.stderr)
        return 2
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
        if not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e):
            raise  # another runtime failure: a bug, with its traceback
        # (nothing written: the checkpoint appears whole or not at all)
        print(
            f"{command}: error: out of memory; lower --batch-size or --max-examples, or use "
            "a machine with more memory; nothing written",
            file=sys.stderr,
        )
        return 2
