"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    opt = namespace["opt"]
    assert opt.param_groups[0]["step"] == 50
    assert float(namespace["loss"]) < 1.0


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in README.read_text() and "make test" in ci


def test_python_started_in_the_repository_root_imports_an_installed_kernels_package(tmp_path):
    # the source folder kernels/ (installed as armijo_fused.kernels) shadowed Hugging Face's
    # ``kernels`` package for Python started here: `import transformers; transformers.Trainer`
    # raised "cannot import name 'CUDAProperties' from 'kernels' (.../kernels/__init__.py)"
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("CUDAProperties = 'the installed package'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "from kernels import CUDAProperties; import armijo_fused.kernels; print(CUDAProperties)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the installed package"
    # the root on the path a second time under another spelling (a symlink) is still this folder
    (tmp_path / "link").symlink_to(root)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "link"), str(tmp_path / "site")])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the installed package"
    # another copy of this folder found first (a second checkout): it steps aside in turn, no
    # recursion; with nothing else installed, that copy stays
    other = tmp_path / "other" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text((root / "kernels" / "__init__.py").read_text())
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "other"), str(tmp_path / "site")])
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the installed package"
    env["PYTHONPATH"] = str(tmp_path / "other")
    probe = ("import kernels, sys; print(kernels.__file__, sys.path.count('')); "
             "import armijo_fused.kernels")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
