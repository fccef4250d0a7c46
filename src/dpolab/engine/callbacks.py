"""Two TrainerCallbacks every run gets, for watching and stopping a run from outside its process (the studio):

- `ProgressCallback` appends to the run folder's progress.jsonl: a `begin` line (max_steps, the step it starts from),
  one `step` line per optimizer step, one `log` line per logged dict (train and eval). The main process only; a line is
  a few hundred bytes, written once per step, so it costs nothing next to a step.
- `StopCallback` ends training cleanly when the run folder's stop request appears: at the next step end it asks the
  Trainer to save a checkpoint and stop, so `--resume` continues exactly as if never stopped. Under several processes
  the flag is all-reduced (max) so every rank stops at the same step (a rank that saw it later would hang the others).
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from dpolab.folders.run import RunFolder


class ProgressCallback(TrainerCallback):
    def __init__(self, run: RunFolder):
        self.run = run

    def _write(self, state, entry: dict) -> None:
        if state.is_world_process_zero:
            self.run.append_progress({**entry, "time": time.time()})

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(state, {"event": "begin", "step": state.global_step, "max_steps": state.max_steps,
                            "num_train_epochs": state.num_train_epochs})

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state, {"event": "step", "step": state.global_step, "epoch": state.epoch})

    def on_log(self, args, state, control, logs=None, **kwargs):
        plain = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float, str, bool))}
        self._write(state, {"event": "log", "step": state.global_step, "epoch": state.epoch, **plain})


class StopCallback(TrainerCallback):
    def __init__(self, run: RunFolder):
        self.run = run
        self.stopped_at: int | None = None  # the step a stop request ended training at

    def _asked(self) -> bool:
        asked = self.run.stop_requested()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            import torch

            flag = torch.tensor([1.0 if asked else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and self._asked():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
