"""Every user-facing error of elalora, under one base class :class:`ElaLoRAError`.

A user-facing error means "the input is wrong, and the message says what to change": a bad config
value, target modules that match nothing, a corrupt or foreign adapter directory, an unknown task
or bad data files, a run that cannot start as asked, a missing optional dependency. The command
line catches :class:`ElaLoRAError`, prints its message as one line and exits with code 2.

The classes also derive from the built-in type they replaced (``ValueError``, ``ImportError``,
``RuntimeError``), so code that caught those keeps working.

Imports: nothing (the bottom of the import order).
"""

from __future__ import annotations

__all__ = ["ElaLoRAError", "ConfigError", "TargetModuleError", "AdapterLoadError", "TaskError", "RunError",
           "ExportError",
           "MissingExtraError", "ReplicaMismatchError", "QuantizationError", "OutputPathError", "OutputLockedError",
           "TrainingDivergedError", "diverged_message", "loss_diverged_message"]


class ElaLoRAError(Exception):
    """Base class of every error caused by the user's input; the message is one line saying what to do."""


class ConfigError(ElaLoRAError, ValueError):
    """An invalid method configuration (the message names the field and the allowed range)."""


class TargetModuleError(ConfigError):
    """``target_modules`` matched nothing (or something that cannot be wrapped)."""


class AdapterLoadError(ElaLoRAError, ValueError):
    """An adapter directory or checkpoint that cannot be loaded onto the given model; the message says why."""


class TaskError(ElaLoRAError, ValueError):
    """A problem with the task name, the data files or the data-related arguments.

    The message is a single line naming what is wrong and how to fix it, suitable for showing to a
    command-line user without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class RunError(ElaLoRAError):
    """A training/evaluation run that cannot start as asked: a model path that does not exist, an
    output directory holding something else, options that do not combine."""


class ExportError(ElaLoRAError, ValueError):
    """An adapter that cannot be written in the asked export format or layout (an unknown layout, a
    model architecture or module the format has no slot for); the message names what to use instead."""


class MissingExtraError(ElaLoRAError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class ReplicaMismatchError(ElaLoRAError, RuntimeError):
    """DDP replicas hold different rank patterns (they would silently train different models)."""


class QuantizationError(ElaLoRAError, RuntimeError):
    """An operation that cannot be done on a quantised (bitsandbytes 4-bit / 8-bit) base, or a bad
    quantisation setting; the message says what to do instead."""


class OutputPathError(ElaLoRAError, ValueError):
    """A save that would destroy something elalora did not write (a file, a user's folder); the
    message says what to change."""


class OutputLockedError(ElaLoRAError, RuntimeError):
    """Another live process is writing the same output directory."""


class TrainingDivergedError(ElaLoRAError, FloatingPointError):
    """The loss or the adapter weights became NaN/inf, or the loss rose far above its start and stayed there;
    the message names the step."""


def diverged_message(step: int, what: str) -> str:
    """The one-line message of a :class:`TrainingDivergedError` at ``step``."""
    return (f"training diverged at step {step}: {what} is NaN or inf. Lower the learning rate (or add warm-up / "
            "gradient clipping) and train again")


def loss_diverged_message(step: int, start: float, now: float, factor: float, how: str) -> str:
    """The one-line message of a :class:`TrainingDivergedError` for a finite loss that ran away (the condition:
    :class:`elalora.integrations.trainer.LossDivergence`)."""
    return (f"training diverged at step {step}: the training loss rose from {start:.4g} to {now:.4g}, above "
            f"{factor:g}x its start {how}. Lower the learning rate (or add warm-up / gradient clipping) and "
            "train again")
