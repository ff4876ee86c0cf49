"""Command line: ``python -m armijo_fused <command>`` (also installed as ``armijo-fused``).

Commands:
    demo     train a small transformer on Shakespeare with ArmijoAdam and AdamW
             (:mod:`armijo_fused.demo`)
    report   block Hessian spectra, heterogeneity and line-search telemetry of a model or a
             recorded run, as PNG plots and a markdown summary
             (:mod:`armijo_fused.diagnostics.report`)

Each command's own options follow it (``python -m armijo_fused demo --help``). A command's
modules are imported only when it runs (``--help`` still imports torch, with the package).
"""

from __future__ import annotations

import argparse
import os
import sys


def prepare_out_dir(path, clear=()) -> str | None:
    """Create a command's output directory before any work and delete the files named in
    ``clear`` (the command's own outputs, so a rerun leaves none of an older run's): None, or
    the problem as one line (a bad --out used to fail after the training, with a traceback)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {path} exists and is not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        for name in clear:
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    except OSError as e:
        return f"--out {path}: {e.strerror or e}"
    if not os.access(path, os.W_OK):
        return f"--out {path} is not writable"
    return None


def _run_demo(argv) -> int:
    from .demo import main

    return main(argv)


def _run_report(argv) -> int:
    try:
        from .diagnostics.report import main
    except ImportError as e:
        raise SystemExit(f"the report command is not available in this installation ({e})") from e
    return main(argv)


COMMANDS = {
    "demo": (_run_demo, "train a small transformer on Shakespeare: ArmijoAdam vs AdamW"),
    "report": (_run_report, "block Hessian spectra, heterogeneity and step-size telemetry plots"),
}


def program() -> str:
    """How the user called the command line, for usage lines: the ``armijo-fused`` script or
    ``python -m armijo_fused``."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return "armijo-fused" if script == "armijo-fused" else "python -m armijo_fused"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program(), description="armijo_fused command line")
    sub = p.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (_, text) in COMMANDS.items():
        # the command parses its own options (and its own --help)
        c = sub.add_parser(name, help=text, description=text, add_help=False)
        c.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = _parser().parse_args(argv[:1])  # the command name; the rest belongs to the command
    run = COMMANDS[ns.command][0]
    result = run(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
