"""Loading pre-tokenized splits and cutting them into (inputs, targets) batches.

Training batches come from :class:`BatchSampler`, whose whole state is one
integer, ``step``: batch ``t`` is a pure function of ``(seed, t)``, so a
trainer resumes exactly by saving ``sampler.state_dict()`` and restoring it.

How batch ``t`` is built: the token stream is cut into ``n_windows``
non-overlapping windows of ``seq_len + 1`` tokens (inputs plus the shifted
targets).  Window number ``g = t * batch_size + b`` belongs to epoch
``g // n_windows``; each epoch has its own seeded permutation of the windows and
its own random offset of the window grid (so window boundaries differ between
epochs).  Every window is thus seen exactly once per epoch, in a shuffled order.

Evaluation uses :func:`iter_eval_batches`, which walks the split sequentially
and covers every target token exactly once (see ``pretokenize`` for the
bits-per-byte formula).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from moekit.data.errors import DataError
from moekit.data.pretokenize import read_tokens

if TYPE_CHECKING:  # torch is only imported when batches are actually built
    import torch


def _to_torch(arr: np.ndarray, device: Any = None) -> "torch.Tensor":
    import torch

    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    return t if device is None else t.to(device, non_blocking=True)


class BatchSampler:
    """Deterministic, resumable sampler of ``[batch_size, seq_len]`` int64 batches.

    Args:
        tokens: 1-D token array (usually a memmap from ``read_tokens``).
        batch_size: Sequences per batch (B).
        seq_len: Tokens per sequence (S).
        seed: Seed of the window permutations.
        step: Index of the next batch to yield (the resumable state).
        device: If given, tensors are moved there.

    Iterating yields ``(inputs, targets)`` forever and advances ``step``;
    ``batch(t)`` returns batch ``t`` without touching the state.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *,
                 seed: int = 0, step: int = 0, device: Any = None) -> None:
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1; got {batch_size}, "
                            f"{seq_len}")
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.step = int(step)
        self.device = device
        n_targets = len(tokens) - 1
        full = n_targets // seq_len if n_targets > 0 else 0
        if full < 1:
            raise DataError(f"the split has {len(tokens)} tokens, too few for one "
                            f"sequence of seq_len={seq_len} (+1 target); use a shorter "
                            f"seq_len or more data.")
        # One window fewer than fits leaves >= seq_len tokens of slack, so the grid
        # can be shifted by any offset in [0, seq_len) each epoch.
        self.n_windows = full - 1 if full >= 2 else full
        self._max_shift = n_targets - self.n_windows * seq_len  # inclusive bound
        self._epoch_cache: dict[int, tuple[int, np.ndarray]] = {}

    # -- state ------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """The sampler's state; only ``step`` changes during training."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "n_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore ``step``; refuse a state saved with different settings or data."""
        for key in ("seed", "batch_size", "seq_len", "n_tokens"):
            mine = self.state_dict()[key]
            if key in state and int(state[key]) != mine:
                raise DataError(f"cannot resume the batch sampler: saved {key}="
                                f"{state[key]} but this sampler has {key}={mine}.")
        self.step = int(state["step"])

    def epoch(self, step: int | None = None) -> float:
        """Fractional number of passes over the data before batch ``step``."""
        step = self.step if step is None else step
        return step * self.batch_size / self.n_windows

    # -- batches ----------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        plan = self._epoch_cache.get(epoch)
        if plan is None:
            rng = np.random.default_rng([self.seed, epoch])
            shift = int(rng.integers(0, self._max_shift + 1))
            plan = (shift, rng.permutation(self.n_windows))
            if len(self._epoch_cache) >= 2:  # a batch spans at most two epochs
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[epoch] = plan
        return plan

    def window_starts(self, step: int) -> np.ndarray:
        """Start offsets (into ``tokens``) of the windows of batch ``step``."""
        if step < 0:
            raise DataError(f"step must be >= 0; got {step}")
        g = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        starts = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(g // self.n_windows):
            shift, perm = self._epoch_plan(int(epoch))
            sel = g // self.n_windows == epoch
            starts[sel] = shift + perm[g[sel] % self.n_windows] * self.seq_len
        return starts

    def batch(self, step: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Batch number ``step`` as ``(inputs, targets)``, each ``[B, S]`` int64."""
        idx = self.window_starts(step)[:, None] + np.arange(self.seq_len + 1)
        win = np.asarray(self.tokens[idx], dtype=np.int64)
        return _to_torch(win[:, :-1], self.device), _to_torch(win[:, 1:], self.device)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        return self

    def __next__(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        out = self.batch(self.step)
        self.step += 1
        return out


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, *,
                      device: Any = None) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """Sequential ``(inputs, targets)`` batches covering every target exactly once.

    Windows start at ``0, S, 2S, ...``; full windows come in batches of up to
    ``batch_size`` rows, and a final shorter window (if any) as its own
    ``[1, L]`` batch.  Summing the loss over all targets therefore sums it over
    ``tokens[1:]``, as bits-per-byte needs.
    """
    n_targets = len(tokens) - 1
    if n_targets < 1:
        return
    n_full = n_targets // seq_len
    for first in range(0, n_full, batch_size):
        rows = min(batch_size, n_full - first)
        idx = (np.arange(first, first + rows)[:, None] * seq_len
               + np.arange(seq_len + 1))
        win = np.asarray(tokens[idx], dtype=np.int64)
        yield _to_torch(win[:, :-1], device), _to_torch(win[:, 1:], device)
    rest = n_targets - n_full * seq_len
    if rest:
        win = np.asarray(tokens[n_full * seq_len:], dtype=np.int64)[None, :]
        yield _to_torch(win[:, :-1], device), _to_torch(win[:, 1:], device)


class TokenDataset:
    """A pre-tokenized split: its tokens (memmap) and the text size they encode.

    Args:
        path: A ``<split>.bin`` file.
        n_bytes: UTF-8 bytes of the split's text (for bits-per-byte), if known.
        name: Display name of the split.
    """

    def __init__(self, path: str | Path, *, n_bytes: int | None = None,
                 name: str | None = None) -> None:
        self.path = Path(path)
        self.tokens = read_tokens(self.path)
        self.n_bytes = n_bytes
        self.name = name or self.path.stem

    def __len__(self) -> int:
        return int(len(self.tokens))

    def __repr__(self) -> str:
        return (f"TokenDataset({self.name!r}, n_tokens={len(self)}, "
                f"n_bytes={self.n_bytes})")

    def sampler(self, batch_size: int, seq_len: int, *, seed: int = 0, step: int = 0,
                device: Any = None) -> BatchSampler:
        """A resumable random :class:`BatchSampler` over this split."""
        return BatchSampler(self.tokens, batch_size, seq_len, seed=seed, step=step,
                            device=device)

    def eval_batches(self, batch_size: int, seq_len: int, *, device: Any = None
                     ) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """Sequential batches covering the split once (see :func:`iter_eval_batches`)."""
        return iter_eval_batches(self.tokens, batch_size, seq_len, device=device)

    def bits_per_byte(self, total_nll_nats: float) -> float:
        """Convert summed NLL (nats, over all targets of the split) to bits per byte."""
        if not self.n_bytes:
            raise DataError(f"the byte count of split {self.name!r} is unknown; load it "
                            f"through load_prepared() to get it.")
        return float(total_nll_nats) / float(np.log(2.0)) / self.n_bytes


__all__ = ["BatchSampler", "TokenDataset", "iter_eval_batches"]
