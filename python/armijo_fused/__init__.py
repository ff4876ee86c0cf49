"""armijo_fused: drop-in PyTorch optimizers with a fused stochastic Armijo line search."""

from .optimizers import ArmijoAdam, ArmijoOptimizer, ArmijoSGD

__version__ = "0.1.0"

__all__ = ["ArmijoAdam", "ArmijoOptimizer", "ArmijoSGD", "__version__"]
