"""Errors lrdeploy raises on purpose.

    Exception
    ├── LrdeployError              the user can fix it; the CLI prints "Error: <message>" and exits 1
    │   ├── ModelLoadError         missing file, not ONNX, unsafe external data
    │   ├── CalibrationDataError   calibration/eval inputs that do not fit the model
    │   ├── NoEligibleLayersError  nothing to compress
    │   ├── BudgetError            a rank budget outside (0, 1], or one the layers cannot meet
    │   ├── TargetNotMetError      no budget reaches the accuracy target asked for
    │   ├── OptionError            an option value that is invalid or does not fit the model or the other options
    │   ├── OutputError            the output directory cannot be written, or would overwrite an input
    │   ├── ExportError            a PyTorch model cannot be exported, or its ONNX export disagrees with it
    │   ├── EngineConfigError      engine options that cannot become a TensorRT configuration
    │   ├── MemoryLimitError       the build's statistics would not fit in the memory available
    │   └── MissingDependencyError an optional package (torch, TensorRT, ...) is not installed
    └── InternalError              a bug in lrdeploy; keeps its traceback

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
    """The requested rank budget is outside (0, 1] or cannot be met by the model's layers."""


class TargetNotMetError(LrdeployError):
    """No budget that was tried reaches the requested accuracy target."""


class OptionError(LrdeployError):
    """An option value is invalid, or does not fit the model or the other options."""


class OutputError(LrdeployError):
    """Results cannot be written where the user asked."""


class ExportError(LrdeployError):
    """A PyTorch model cannot be exported to ONNX, or the export does not match PyTorch."""


class EngineConfigError(LrdeployError):
    """An engine option that cannot be turned into a TensorRT configuration."""


class MemoryLimitError(LrdeployError):
    """The build would need more memory than the machine has available (estimated before the work starts)."""


class MissingDependencyError(LrdeployError):
    """An optional dependency needed for this command is not installed."""


class InternalError(Exception):
    """A bug in lrdeploy: an invariant that should always hold did not."""
