"""armijo_fused: drop-in PyTorch optimizers with a fused stochastic Armijo line search."""

from .linesearch.trial import get_rng_state, in_trial, set_rng_state
from .optimizers import ArmijoAdam, ArmijoOptimizer, ArmijoSGD

__version__ = "0.1.0"

__all__ = ["ArmijoAdam", "ArmijoOptimizer", "ArmijoSGD", "get_rng_state", "in_trial", "set_rng_state",
           "__version__"]
