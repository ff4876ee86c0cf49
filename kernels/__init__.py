"""Triton kernels of armijo_fused (installed as ``armijo_fused.kernels``).

No ``from __future__ import annotations`` in these modules: it turns ``BLOCK_SIZE: tl.constexpr``
into the string ``"tl.constexpr"``, which Triton 3.0's interpreter does not take for a constexpr
(it then passed every tile size as a runtime value and ``tl.arange`` refused it).
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python started in the repository root finds this
    # source folder before an installed package of that name (Hugging Face's ``kernels``, which
    # transformers imports: `import transformers; transformers.Trainer` failed there). Step
    # aside for the installed one, found as an import would find it (an editable install too)
    # with this folder's root left out; without one, this folder stays, harmless. sys.path is
    # not touched (other threads import meanwhile), and the roots left out are shared, so that
    # another checkout's copy, found here, steps aside in turn.
    def _step_aside():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        roots = sys.__dict__.setdefault("_armijo_fused_kernels_roots", set())
        root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        roots.add(root)

        def ours(spec) -> bool:
            where = spec.origin or next(iter(spec.submodule_search_locations or ()), None)
            return where is not None and any(
                os.path.realpath(where).startswith(r + os.sep) for r in roots)

        try:
            path = [p for p in sys.path if os.path.realpath(p or os.curdir) not in roots]
            for finder in sys.meta_path:
                try:
                    spec = (finder.find_spec("kernels", path)
                            if finder is importlib.machinery.PathFinder
                            else finder.find_spec("kernels", None))
                except (AttributeError, ImportError):
                    continue
                if spec is not None and spec.loader is not None and not ours(spec):
                    break
            else:
                return
            module = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = module  # (the import statement returns what is here)
            spec.loader.exec_module(module)
        finally:
            roots.discard(root)

    _step_aside()
    del _step_aside
