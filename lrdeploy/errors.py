"""Errors lrdeploy raises on purpose.

    Exception
    ├── LrdeployError            the user can fix it; the CLI prints "Error: <message>" and exits 1
    │   ├── ModelLoadError       missing file, not ONNX, unsafe external data
    │   ├── CalibrationDataError calibration/eval inputs that do not fit the model
    │   ├── NoEligibleLayersError nothing to compress
    │   ├── BudgetError          a rank budget that cannot be met
    │   ├── OutputError          the output directory cannot be written
    │   └── MissingDependencyError an optional package (torch, TensorRT, ...) is not installed
    └── InternalError            a bug in lrdeploy; keeps its traceback

Every LrdeployError message is one line that names the problem and the fix.
"""


class LrdeployError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class ModelLoadError(LrdeployError):
    """The model file is missing, is not ONNX, or references unsafe external data."""


class CalibrationDataError(LrdeployError):
    """Calibration or evaluation inputs are missing, malformed, or do not match the model."""


class NoEligibleLayersError(LrdeployError):
    """The model has no linear layer that low-rank factorization could shrink."""


class BudgetError(LrdeployError):
    """The requested rank budget is invalid or cannot be met."""


class OutputError(LrdeployError):
    """Results cannot be written where the user asked."""


class MissingDependencyError(LrdeployError):
    """An optional dependency needed for this command is not installed."""


class InternalError(Exception):
    """A bug in lrdeploy: an invariant that should always hold did not."""
