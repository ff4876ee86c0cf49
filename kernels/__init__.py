"""Triton kernels of armijo_fused (installed as ``armijo_fused.kernels``).

No ``from __future__ import annotations`` in these modules: it turns ``BLOCK_SIZE: tl.constexpr``
into the string ``"tl.constexpr"``, which Triton 3.0's interpreter does not take for a constexpr
(it then passed every tile size as a runtime value and ``tl.arange`` refused it).
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python started in the repository root finds this
    # source folder before an installed package of that name (Hugging Face's ``kernels``, which
    # transformers imports: `import transformers; transformers.Trainer` failed there). Step
    # aside for the installed one, found as any import would find it with this folder off the
    # path (an editable install too); without one, this folder stays, harmless.
    def _step_aside():
        import importlib
        import os
        import sys

        if getattr(sys, "_armijo_fused_stepping_aside", False):
            return  # another copy of this folder, found while stepping aside: it stays
        here = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        me, path = sys.modules.pop("kernels"), sys.path[:]
        sys.path[:] = [p for p in path if os.path.realpath(p or os.curdir) != here]
        sys._armijo_fused_stepping_aside = True
        try:
            importlib.import_module("kernels")  # (the import statement returns sys.modules')
        except ModuleNotFoundError as e:
            if e.name != "kernels":
                raise
            sys.modules["kernels"] = me
        finally:
            sys.path[:] = path
            del sys._armijo_fused_stepping_aside

    _step_aside()
    del _step_aside
