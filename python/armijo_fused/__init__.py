"""armijo_fused: drop-in PyTorch optimizers with a fused stochastic Armijo line search."""

from .linesearch.trial import in_trial
from .optimizers import ArmijoAdam, ArmijoOptimizer, ArmijoSGD

__version__ = "0.1.0"

__all__ = ["ArmijoAdam", "ArmijoOptimizer", "ArmijoSGD", "in_trial", "__version__"]
