"""Triton kernels of armijo_fused (installed as ``armijo_fused.kernels``).

No ``from __future__ import annotations`` in these modules: it turns ``BLOCK_SIZE: tl.constexpr``
into the string ``"tl.constexpr"``, which Triton 3.0's interpreter does not take for a constexpr
(it then passed every tile size as a runtime value and ``tl.arange`` refused it).
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python started in the repository root finds this
    # source folder before an installed package of that name (Hugging Face's ``kernels``, which
    # transformers imports: `import transformers; transformers.Trainer` failed there). Step
    # aside for the installed one; without one, this folder stays, harmless.
    def _step_aside():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", others)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # (the import statement returns what is here at the end)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["kernels"]
            raise

    _step_aside()
    del _step_aside
