from .adam import ArmijoAdam
from .base import ArmijoOptimizer
from .sgd import ArmijoSGD

__all__ = ["ArmijoAdam", "ArmijoOptimizer", "ArmijoSGD"]
