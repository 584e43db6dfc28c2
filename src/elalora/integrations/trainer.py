"""Hugging Face ``Trainer`` integration.

The Trainer's order per optimizer step (transformers 5.x) is ``on_pre_optimizer_step`` →
``optimizer.step()`` → ``on_optimizer_step`` → ``lr_scheduler.step()`` → ``zero_grad()`` →
``global_step += 1`` → ``on_step_end``. Gradients are gone by ``on_step_end``, so the scores and the
allocation run in ``on_optimizer_step``: once per optimizer step under gradient accumulation, with
``t = state.global_step`` (0-based). The total number of steps comes from ``state.max_steps``.

Checkpoints: the adapters' parameters and masks are part of the model's state dict, so the
Trainer's own checkpoint holds them; the rest of the method's state (EMA scores, step counter,
rank history) goes to ``elalora_state.pt`` in the same ``checkpoint-N`` folder. On resume the
Trainer restores its state *after* ``on_train_begin``, so the callback restores its own at the
first step it sees with ``global_step > 0``.

The handle is taken by duck type (this module sits below :mod:`elalora.model`, which builds the
callback in ``handle.callback()``). Imports: transformers, :mod:`elalora._io`, :mod:`elalora.errors`,
:mod:`elalora.integrations.distributed`.

Divergence: both callbacks stop a run whose logged loss or gradient norm is NaN/inf
(:func:`check_logs_finite`) or whose loss rose far above its start and stayed there
(:class:`LossDivergence`, the condition written in its docstring); a resume is checked before the
Trainer loads anything (:meth:`ElaLoRACallback.attach`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from .._io import atomic_write_bytes

__all__ = ["ElaLoRACallback", "DivergenceCallback", "LossDivergence", "STATE_FILE"]

STATE_FILE = "elalora_state.pt"


def read_state_file(path: Path, handle) -> dict:
    """The handle state in a checkpoint's ``elalora_state.pt``, checked against ``handle``
    (:func:`elalora.validation.check_handle_state`: method, form, budget, capacities, schedule, allocator
    values) before anything is loaded; an unreadable file is an :class:`~elalora.errors.AdapterLoadError`."""
    from ..errors import AdapterLoadError

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (truncated zip, pickle errors, ...)
        raise AdapterLoadError(f"{path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    try:
        handle.validate_state_dict(state)
    except AdapterLoadError as e:
        raise AdapterLoadError(f"{path}: {e}") from None
    return state


class LossDivergence:
    """A training loss that rose far above its start and stayed there: the run diverged, though every
    value is finite (``--lr 1000`` on the LoRA form ends at a loss of thousands, never NaN).

    The condition, on the losses the Trainer logs (each the mean over its logging interval):

    * the reference ``L_ref = max(L_1, floor)``: the first logged loss (with ``logging_first_step`` the
      loss of the untrained model), floored at ``floor = 0.1`` so that a run starting near zero loss is
      not stopped by noise;
    * a logged loss is *high* when it exceeds ``factor × L_ref`` (``factor = 10``);
    * the run is stopped at the ``patience``-th consecutive high log (``patience = 3``), or at the end of
      training (the Trainer's final log, which carries ``train_loss``, the mean over the run) when the last
      logged loss is high and so is the run's mean loss: a run too short for ``patience`` logs that ended
      diverged.

    Ordinary noise does not fire: one or two high logs in a row are forgiven, and a binary classifier
    starting at ``ln 2 ≈ 0.69`` must stay above 6.9 (a loss no trained model has) for three logs.
    """

    def __init__(self, factor: float = 10.0, patience: int = 3, floor: float = 0.1) -> None:
        self.factor, self.patience, self.floor = float(factor), int(patience), float(floor)
        self.reference: float | None = None
        self.high = 0
        self.last: float | None = None

    def fresh(self) -> "LossDivergence":
        """A new watch with the same settings (a new ``train()`` call starts from a new reference)."""
        return type(self)(self.factor, self.patience, self.floor)

    def update(self, logs: dict | None, step: int) -> None:
        """Feed one ``on_log`` payload; raises :class:`~elalora.errors.TrainingDivergedError` when the
        condition holds."""
        import math

        from ..errors import TrainingDivergedError, loss_diverged_message

        if not logs:
            return
        loss = logs.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            if self.reference is None:
                self.reference = max(float(loss), self.floor)
                return
            self.last = float(loss)
            self.high = self.high + 1 if loss > self.factor * self.reference else 0
            if self.high >= self.patience:
                raise TrainingDivergedError(loss_diverged_message(step, self.reference, float(loss), self.factor,
                                                                  f"for {self.high} logged steps in a row"))
        mean = logs.get("train_loss")
        if (isinstance(mean, (int, float)) and self.reference is not None and self.high
                and mean > self.factor * self.reference):
            raise TrainingDivergedError(loss_diverged_message(step, self.reference, float(self.last), self.factor,
                                                              f"at the end of training (mean {mean:.4g})"))


def check_logs_finite(logs: dict | None, step: int) -> None:
    """Raise :class:`~elalora.errors.TrainingDivergedError` if the logged loss or gradient norm is
    NaN/inf. This is the cheap divergence check: the Trainer computes both anyway, once per logging
    interval, and a NaN weight makes every later loss NaN, so the run stops at most
    ``logging_steps`` steps after it diverged (set ``logging_nan_inf_filter=False`` so that the
    Trainer does not average NaN losses away)."""
    import math

    from ..errors import TrainingDivergedError, diverged_message

    if not logs:
        return
    for key in ("loss", "grad_norm"):
        v = logs.get(key)
        if isinstance(v, (int, float)) and not math.isfinite(v):
            raise TrainingDivergedError(diverged_message(step, f"the training {key.replace('_', ' ')} ({v})"))


class DivergenceCallback(TrainerCallback):
    """Stops a ``Trainer`` run whose loss or gradient norm becomes NaN/inf (see :func:`check_logs_finite`), or
    whose loss rose far above its start and stayed there (:class:`LossDivergence`; ``loss_watch=None`` turns
    that off); :class:`ElaLoRACallback` does the same checks itself."""

    def __init__(self, loss_watch: LossDivergence | None = None) -> None:
        self.loss_watch = loss_watch if loss_watch is not None else LossDivergence()

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss_watch = self.loss_watch.fresh()

    def on_log(self, args, state, control, logs=None, **kwargs):
        check_logs_finite(logs, state.global_step)
        self.loss_watch.update(logs, state.global_step)


class ElaLoRACallback(TrainerCallback):
    """Drives an :class:`~elalora.model.AdaptiveModel` from a ``Trainer``; no arithmetic from the user.

    Logged through the Trainer's logging (so TensorBoard / W&B receive them):
    ``elalora/total_rank``, ``elalora/ranks_moved`` (since the last log) and ``elalora/rounds``.
    Reporting callbacks only see these if this callback runs before them: use
    :meth:`attach` (``handle.callback().attach(trainer)``) rather than ``callbacks=[...]``.
    """

    def __init__(self, handle, *, check_consistency: bool = False, loss_watch: LossDivergence | None = None) -> None:
        self.handle = handle
        self.check_consistency = check_consistency
        self.loss_watch = loss_watch if loss_watch is not None else LossDivergence()
        self._moved_since_log = 0
        self._rounds = 0
        self._restored = False
        self._resume_path = None

    def attach(self, trainer) -> "ElaLoRACallback":
        """Insert this callback first in ``trainer``'s callback list and return it.

        Also records the path given to ``trainer.train(resume_from_checkpoint=PATH)`` (the Trainer
        passes it to no callback), so that a checkpoint outside ``args.output_dir`` resumes too, and checks
        that checkpoint's handle state against this handle *before* the Trainer loads anything from it: a
        resume into another method, form, budget or capacity is refused naming both sides, where the
        Trainer would fail later on its optimizer state with a message that names neither.
        """
        trainer.callback_handler.callbacks.insert(0, self)
        train = trainer.train
        cb = self

        def train_recording_resume_path(*args, **kwargs):
            rfc = kwargs.get("resume_from_checkpoint", args[0] if args else None)
            if rfc is True:
                from transformers.trainer_utils import get_last_checkpoint

                last = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
                ckpt = Path(last) if last else None
            else:
                ckpt = Path(rfc) if isinstance(rfc, (str, os.PathLike)) else None
            cb._resume_path = rfc if isinstance(rfc, (str, os.PathLike)) else None
            if ckpt is not None and (ckpt / STATE_FILE).is_file():
                read_state_file(ckpt / STATE_FILE, cb.handle)  # refuses before the Trainer loads its state
            return train(*args, **kwargs)

        trainer.train = train_recording_resume_path
        return self

    # ------------------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, **kwargs):
        if not state.max_steps or state.max_steps <= 0:
            raise ValueError("the Trainer did not report max_steps; set max_steps or num_train_epochs")
        self.handle.set_total_steps(int(state.max_steps))
        alloc = self.handle.allocator
        if hasattr(alloc, "set_step_examples") and getattr(alloc, "step_examples", None) is None:
            # ALoRA's ablation budget compares with this process's training examples per step
            alloc.set_step_examples(int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps))
        self._restored = state.global_step == 0
        self.loss_watch = self.loss_watch.fresh()

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._restored:
            self._restore(args, state)
            self._restored = True

    def _restore(self, args, state) -> None:
        if state.global_step == 0 or self.handle.step_count == state.global_step:
            return
        candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        for rfc in (getattr(args, "resume_from_checkpoint", None), self._resume_path):
            if isinstance(rfc, (str, os.PathLike)) and Path(rfc) not in candidates:
                candidates.insert(0, Path(rfc))
        for c in candidates:
            f = c / STATE_FILE
            if f.is_file():
                self.handle.load_state_dict(read_state_file(f, self.handle))
                if self.handle.step_count != state.global_step:
                    raise RuntimeError(f"{f} is at step {self.handle.step_count}, "
                                       f"the Trainer resumed at {state.global_step}")
                return
        raise RuntimeError(
            f"resuming at step {state.global_step} but no {STATE_FILE} was found in "
            f"{', '.join(str(c) for c in candidates)}; the checkpoint was not written with the elalora callback")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        events = self.handle.step(optimizer, step=state.global_step)
        if events:
            self._rounds += 1
            self._moved_since_log += sum(e.pruned for e in events)
            control.should_log = True
        if self.check_consistency and events:
            from .distributed import assert_replicas_agree

            assert_replicas_agree(self.handle)

    def on_log(self, args, state, control, logs=None, **kwargs):
        check_logs_finite(logs, state.global_step)
        self.loss_watch.update(logs, state.global_step)
        if logs is None or "loss" not in logs and "train_loss" not in logs:
            return
        extra = {"elalora/total_rank": self.handle.total_rank, "elalora/ranks_moved": self._moved_since_log,
                 "elalora/rounds": self._rounds}
        self._moved_since_log = 0
        logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        buf = io.BytesIO()
        torch.save(self.handle.state_dict(), buf)
        atomic_write_bytes(ckpt / STATE_FILE, buf.getvalue())
