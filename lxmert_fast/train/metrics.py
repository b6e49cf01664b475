"""What a run reports: metrics.jsonl (TensorBoard too when installed), the progress bar on rank 0, samples per second,
and the losses averaged over ranks with the non-finite-loss flag that stops every rank together: read back every
micro-step for evaluation (``reduce_losses``), kept on the device during training (``LossGuard``)."""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lxmert_fast.files import write_text
from lxmert_fast.train.distributed import is_main, world_size

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """metrics.jsonl (one JSON object per line, each with an ``event``: train, eval or end), TensorBoard if
    installed (train/ and eval/); rank 0 only."""

    def __init__(self, output_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.file = None  # opened at the first record: a resumed run cuts the file back first
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record):
        if not self.enabled:
            return
        if self.file is None:
            self.file = open(self.path, "a")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("event") in ("train", "eval"):
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path, step):
    """On a resume from ``step`` (0: no checkpoint was written), drop the records the killed run wrote past it
    (they are trained again) and its end record."""
    if not os.path.isfile(path):
        return
    keep = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if rec.get("event") in ("train", "eval") and rec.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(keep))


def progress_bar(total, initial=0, desc="train"):
    """tqdm on rank 0 (stderr), a no-op object elsewhere."""
    if is_main():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
    return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class Timer:
    """Samples per second between two calls of ``rate``."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.samples = 0

    def add(self, n):
        self.samples += n

    def rate(self):
        now = time.perf_counter()
        r = self.samples / max(now - self.t0, 1e-9)
        self.t0, self.samples = now, 0
        return r


def reduce_losses(losses, device):
    """Average a dict of scalar losses over ranks; also says whether any rank saw a non-finite total.

    One small all-reduce per micro-step: every rank must agree to stop, or the others would hang in the next
    collective.
    """
    keys = sorted(losses)
    vec = torch.stack([losses[k].detach().float().reshape(()) for k in keys]).to(device)
    bad = (~torch.isfinite(vec)).any().float().reshape(1)
    vec = torch.cat([torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0), bad])
    if world_size() > 1:
        dist.all_reduce(vec)
        vec[:-1] /= world_size()
    values = vec.tolist()
    return dict(zip(keys, values[:-1], strict=True)), values[-1] > 0


@dataclass
class LossReading:
    """What a LossGuard read back: the mean of each loss since the last ``reset_means`` (averaged over ranks) and,
    if a micro-step's loss was non-finite on some rank, the first such micro-step and this rank's losses there."""

    means: dict
    bad_micro_step: int | None
    bad_losses: dict


class LossGuard:
    """The training losses kept on the device, read back only when asked (``read``): no host-device sync per step.

    Each micro-step's losses are averaged over ranks (one small all-reduce, queued on the device like the step)
    with a flag that any rank saw a NaN or inf. ``found_inf`` turns 1 at the first such micro-step and stays 1, on
    every rank: the engine's optimiser skips every update from then on, on the device (lxmert_fast.train.optimization:
    ``optimizer.found_inf``), so no weight is ever updated from a non-finite loss, and the loop stops at its next
    read-back, all ranks at the same one."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.found_inf = torch.zeros((), device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._keys, self._bad_losses, self._sums, self._count = None, None, None, 0

    def add(self, losses: dict, micro_step: int) -> None:
        """Accumulate one micro-step's scalar losses (device tensors); ``micro_step`` names it if non-finite."""
        keys = sorted(losses)
        vec = torch.stack([losses[k].detach().float().reshape(()) for k in keys]).to(self.device)
        bad = (~torch.isfinite(vec)).any().float().reshape(1)
        reduced = torch.cat([torch.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0), bad])
        if world_size() > 1:
            dist.all_reduce(reduced)
            reduced[:-1] /= world_size()
        first = (reduced[-1] > 0) & (self.found_inf == 0)
        if self._keys is None:
            self._keys, self._bad_losses = keys, torch.zeros_like(vec)
        self._first_bad = torch.where(first, micro_step, self._first_bad)
        self._bad_losses = torch.where(first, vec, self._bad_losses)
        torch.maximum(self.found_inf, (reduced[-1] > 0).float(), out=self.found_inf)
        # in float64, in order, as Python floats were summed when each step was read back
        step_sum = reduced[:-1].double()
        self._sums = step_sum if self._sums is None else self._sums + step_sum
        self._count += 1

    def read(self) -> LossReading:
        """One read-back (a sync): the means since ``reset_means`` and the first non-finite micro-step, if any."""
        if self._keys is None:
            return LossReading({}, None, {})
        n = len(self._keys)
        sums = self._sums if self._sums is not None else torch.zeros(n, dtype=torch.float64, device=self.device)
        values = torch.cat([self._first_bad.double().reshape(1), self._bad_losses.double(), sums]).tolist()
        first_bad = int(values[0])
        means = {k: v / self._count for k, v in zip(self._keys, values[1 + n :], strict=True)} if self._count else {}
        return LossReading(means, None if first_bad < 0 else first_bad,
                           dict(zip(self._keys, values[1 : 1 + n], strict=True)))

    def reset_means(self) -> None:
        self._sums, self._count = None, 0
