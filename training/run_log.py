"""The run's scalar log: TensorBoard events and a JSON-lines file with the same numbers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLog"]


class RunLog:
    """Writes ``log.jsonl`` (one JSON object per event) and TensorBoard scalars under ``tb/``.

    Only the main process should create one; the others log nothing.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.run_dir / "log.jsonl").open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, event: str, step: int, **values: Any) -> None:
        """Record ``values`` at ``step``; numbers also go to TensorBoard as ``event/name``."""
        record = {"event": event, "step": step, "time": round(time.time(), 3)}
        for k, v in values.items():
            record[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{event}/{k}", v, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
