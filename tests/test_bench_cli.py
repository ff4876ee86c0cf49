"""The command lines of the benchmark scripts: every command scripts/gpu_checks.sh runs is
accepted by its script's parser (a renamed or misspelled flag fails here, on a CPU, not in a
scarce GPU session), every parser shows its defaults in --help, and ``--out`` means the same in
every script (bench/_env.py's ``add_out_argument``).

The parsers are reached through each script's ``main(argv)``, with ``parse_args`` made to stop
right after parsing (``_Parsed``), so nothing is measured."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
GPU_CHECKS = ROOT / "scripts" / "gpu_checks.sh"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith(("_", "test_")))
SEVERAL_FILES = ("convergence", "layerwise", "sgd_momentum")  # the others write one JSON

sys.path.insert(0, str(BENCH))
from _env import RESULTS, out_file  # noqa: E402


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the command line parsed."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace):
        super().__init__()
        self.parser, self.namespace = parser, args


@pytest.fixture
def parse_only(monkeypatch, capsys):
    """``parse(script, argv)``: the script's parser and namespace for ``argv``, stopped before
    anything runs; an argv the parser refuses fails the test with argparse's message."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(self, parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)

    def run(script: Path, argv: list[str]) -> _Parsed:
        monkeypatch.syspath_prepend(str(script.parent))
        module = importlib.import_module(script.stem)
        try:
            module.main(argv)
        except _Parsed as parsed:
            return parsed
        except SystemExit as e:
            pytest.fail(f"{script.name} {shlex.join(argv)}: exit {e.code}\n"
                        f"{capsys.readouterr().err}")
        pytest.fail(f"{script.name}: main() returned without parsing its arguments")

    return run


def gpu_check_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script path, argv) of every ``$PY <path>.py ...`` line of scripts/gpu_checks.sh, with
    ``$(... && echo WORDS)`` replaced by its WORDS and each variable by a placeholder."""
    commands = []
    for line in text.splitlines():
        m = re.search(r"\$PY ((?:bench|scripts)/\w+\.py)(.*)$", line)
        if not m:
            continue
        args = re.sub(r"\$\([^()]*&& echo ([^()]*)\)", r"\1", m.group(2))
        args = re.sub(r"\$\{?\w+\}?", "VAR", args)
        assert not args.rstrip().endswith("\\"), f"continued line, teach this parser: {line}"
        commands.append((m.group(1), shlex.split(args)))
    return commands


COMMANDS = gpu_check_commands(GPU_CHECKS.read_text())


def test_every_python_command_of_gpu_checks_is_found():
    runs = [line for line in GPU_CHECKS.read_text().splitlines()  # (setup.py: the build)
            if re.search(r"\$PY (?!setup\.py)\S+\.py", line)]
    assert len(COMMANDS) == len(runs) >= 10
    assert ("scripts/acceptance_report.py", ["--junit", "VAR", "--strict"]) in COMMANDS


@pytest.mark.parametrize("script,argv", COMMANDS, ids=[f"{s} {shlex.join(a)}" for s, a in COMMANDS])
def test_gpu_checks_command_parses(parse_only, script, argv):
    parser = parse_only(ROOT / script, argv).parser
    # spelled out: argparse takes a prefix (--step for --steps), which a renamed flag may still be
    flags = [a.split("=")[0] for a in argv if a.startswith("--")]
    assert all(f in parser._option_string_actions for f in flags), (script, flags)


def test_a_misspelled_flag_is_caught(parse_only):
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --repaets 20"):
        parse_only(BENCH / "bench_kernels.py", ["--repaets", "20"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_shows_every_default_and_out_is_shared(parse_only, script):
    parser = parse_only(script, []).parser
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS:
            assert action.help, f"{script.name} {action.option_strings}: no help, no default shown"
    (out,) = [a for a in parser._actions if "--out" in a.option_strings]
    assert out.default == str(RESULTS) and out.type.__qualname__ == "add_out_argument.<locals>.check"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_out_takes_a_directory_and_a_json_path_only_where_one_file_is_written(
        parse_only, script, tmp_path):
    assert parse_only(script, ["--out", str(tmp_path / "new")]).namespace.out == str(tmp_path / "new")
    (tmp_path / "dir.json").mkdir()  # an existing directory is one, whatever its name
    assert parse_only(script, ["--out", str(tmp_path / "dir.json")]).namespace.out.endswith("dir.json")
    refused = ["x.md", "x.png"] + (["x.json"] if script.stem in SEVERAL_FILES else [])
    for name in refused:
        with pytest.raises(pytest.fail.Exception, match="exit 2"):
            parse_only(script, ["--out", str(tmp_path / name)])
    if script.stem not in SEVERAL_FILES:
        assert parse_only(script, ["--out", str(tmp_path / "x.json")]).namespace.out.endswith("x.json")
        assert parse_only(script, ["--out", str(tmp_path / "X.JSON")]).namespace.out.endswith("JSON")
    # a new directory named with a dot (a device, a version), or with a trailing /
    for name in ("h200.cuda", "run-1.5", "new.json/"):
        assert parse_only(script, ["--out", f"{tmp_path}/{name}"]).namespace.out.endswith(name)


def test_a_several_file_script_refuses_a_json_path_before_running(tmp_path, capsys):
    import layerwise

    with pytest.raises(SystemExit) as e:
        layerwise.main(["--steps", "1", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "writes several files: give a directory" in err
    assert not list(tmp_path.iterdir())


def test_out_file(tmp_path):
    assert out_file(str(tmp_path / "a" / "r.json"), "x.json") == tmp_path / "a" / "r.json"
    assert (tmp_path / "a").is_dir()
    assert out_file(str(tmp_path / "b"), "x.json") == tmp_path / "b" / "x.json"
    assert (tmp_path / "b").is_dir()
    (tmp_path / "c.json").mkdir()
    assert out_file(str(tmp_path / "c.json"), "x.json") == tmp_path / "c.json" / "x.json"
    assert out_file(str(tmp_path / "d.json") + "/", "x.json") == tmp_path / "d.json" / "x.json"
    assert out_file(str(tmp_path / "E.JSON"), "x.json") == tmp_path / "E.JSON"
    assert out_file(str(RESULTS), "memory_cpu.json") == RESULTS / "memory_cpu.json"  # default


TINY = ["--device", "cpu", "--steps", "1", "--k", "2", "--width", "8", "--depth", "1",
        "--batch", "4"]


def test_a_one_file_script_writes_into_a_directory_or_to_a_json_path(tmp_path):
    """batched_candidates.py at a tiny size (bench/memory.py, the other obvious choice, starts
    six processes: 40 s)."""
    import batched_candidates

    batched_candidates.main([*TINY, "--out", str(tmp_path / "new" / "dir")])
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["batched_candidates_cpu.json"]
    batched_candidates.main([*TINY, "--out", str(tmp_path / "sub" / "mine.json")])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["mine.json"]
    assert json.loads((tmp_path / "sub" / "mine.json").read_text())["benchmark"] == "batched_candidates"
