"""Run metrics: a tqdm progress bar, a JSONL file, optional TensorBoard and a summary table.

Only process 0 writes or prints (every other process gets a :class:`MetricsWriter` whose methods
do nothing). One JSON object per line in ``<run_dir>/metrics.jsonl``::

    {"step": 120, "kind": "train", "loss": 2.31, "accuracy": 0.41, "lr": 0.001,
     "grad_norm": 0.83, "tokens_per_s": 51234.0, "time": 12.3}
    {"step": 250, "kind": "eval", "loss": 0.02, "accuracy": 0.998, "bits_per_byte": ...}

TensorBoard event files are written to ``<run_dir>/tensorboard`` when ``tensorboardX`` (or
``torch.utils.tensorboard``) is importable; nothing is required otherwise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "summary_table", "bits_per_byte"]


def bits_per_byte(loss_nats: float) -> float:
    """Bits per byte of a byte-level model whose mean loss is ``loss_nats`` per byte."""
    return loss_nats / math.log(2.0)


def _tensorboard_writer(logdir: Path):
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found]
        except ImportError:
            return None
    return SummaryWriter(str(logdir))


class MetricsWriter:
    """JSONL + progress bar + optional TensorBoard, active only when ``enabled``."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress: bool = True,
        resume: bool = False,
        print_fn=print,
    ):
        self.enabled = enabled
        self._print = print_fn
        self.path = Path(run_dir) / "metrics.jsonl"
        self._bar = None
        self._tb = None
        self._tb_used = False
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._truncate_after(start_step)
        self._file = self.path.open("a" if resume else "w")
        self._tb = _tensorboard_writer(self.path.parent / "tensorboard")
        self._tb_used = self._tb is not None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def _truncate_after(self, step: int) -> None:
        # Drop lines from steps past the checkpoint we resume from: they will be redone.
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(line + "\n" for line in keep))

    @property
    def tensorboard_dir(self) -> Path | None:
        return self.path.parent / "tensorboard" if self._tb_used else None

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record |= {k: _plain(v) for k, v in values.items()}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def advance(self, steps: int, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False,
            )
        self._bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            self._print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def summary_table(rows: list[tuple[str, Any]], title: str = "summary") -> str:
    """A two-column text table."""
    width = max(len(k) for k, _ in rows)
    lines = [f"== {title} " + "=" * max(0, width + 30 - len(title))]
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)
