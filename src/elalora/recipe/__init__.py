"""The training recipe behind ``elalora train``: :class:`RunSpec` -> :func:`prepare` -> :func:`build`
-> :func:`fit` -> :func:`save_run`, or all of it at once with :func:`train`.

``train`` runs the Hugging Face ``Trainer`` with the elalora callback (or PEFT's own LoRA for
``lora`` / ``gelora``: plain LoRA has one path, PEFT's) and writes one self-contained run
directory (layout in :mod:`.rundir`). Everything is written into a temporary sibling directory that
replaces the output directory only when the run has finished, so a failed or interrupted run
leaves nothing half-written. The CLI, the benchmarks and the examples use these public functions.

Modules: :mod:`.run` (the phases and ``train``; this package only re-exports),
:mod:`.loading` (model paths, tokenizers, base models, adapters; the one loading sequence of
data and model, :func:`~.loading.load_for_task`), :mod:`.trainer`
(collators, the Trainer subclass, training arguments, evaluation), :mod:`.rundir` (the run
directory), :mod:`.methods` (method configs, GeLoRA plans, schedules), :mod:`.evaluation` (a saved
run evaluated and analysed: ``elalora eval`` / ``analyze``).

Imports: :mod:`.run`, :mod:`.spec`.
"""

from .run import (Built, Fitted, Prepared, RunResult, build, default_output_dir, fit, log, prepare,
                  save_run, train, write_figures)
from .spec import RunSpec

__all__ = ["RunSpec", "Prepared", "Built", "Fitted", "RunResult", "prepare", "build", "fit", "save_run", "train",
           "default_output_dir", "log", "write_figures"]
