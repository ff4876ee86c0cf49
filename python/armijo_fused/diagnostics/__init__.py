"""Diagnostics: Hessian spectra (stochastic Lanczos quadrature), block heterogeneity, training
telemetry and reports. See docs/diagnostics.md for the math and examples."""

from .heterogeneity import Heterogeneity, heterogeneity, js_distance
from .hvp import DoubleBackwardError, HessianOperator, Segment, eval_mode
from .lanczos import hutchinson_trace, lanczos, make_probe, power_iteration, ritz
from .plots import plot_grad_norms, plot_heterogeneity, plot_spectra, plot_step_sizes
from .recorder import TelemetryRecorder
from .report import build_demo, write_report
from .slq import Spectrum, estimate_spectrum, slq
from .spectra import block_spectra, hessian_spectrum, model_blocks

__all__ = [
    "DoubleBackwardError", "HessianOperator", "Heterogeneity", "Segment", "Spectrum",
    "TelemetryRecorder", "block_spectra", "build_demo", "estimate_spectrum", "eval_mode",
    "hessian_spectrum", "heterogeneity", "hutchinson_trace", "js_distance", "lanczos",
    "make_probe", "model_blocks", "plot_grad_norms", "plot_heterogeneity", "plot_spectra",
    "plot_step_sizes", "power_iteration", "ritz", "slq", "write_report",
]
