"""Where a training run's metrics go besides ``metrics.jsonl``: TensorBoard event files (tensorboardX, the writer
Ray Tune's own TensorBoard logger uses), and MLflow or Weights & Biases through Ray's integrations
(``setup_mlflow``, ``setup_wandb``: rank 0 logs), each asked for by ``--report-to``. MLflow reads its server from
``MLFLOW_TRACKING_URI`` and W&B its key and project from ``WANDB_API_KEY`` and ``WANDB_PROJECT``, as they do
everywhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

Tracker = Literal["tensorboard", "mlflow", "wandb"]
PACKAGES: dict[str, str] = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(trackers: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the package to install for each tracker asked for whose package is missing."""
    missing = [name for name in trackers if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ValueError(",".join(missing) + " needs " + " and ".join(PACKAGES[m] for m in missing)
                         + f" installed (pip install {' '.join(PACKAGES[m] for m in missing)})")


class Trackers:
    """The trackers of one run on one worker: only rank 0 writes. ``start_step`` > 0 (a resumed run) hides from
    TensorBoard the events of the steps after it, which are trained again."""

    def __init__(self, run_dir: Path, name: str, trackers: tuple[str, ...], rank: int, start_step: int = 0,
                 config: dict[str, Any] | None = None):
        self._tensorboard = self._mlflow = self._wandb = None
        if rank != 0:
            return
        if "tensorboard" in trackers:
            from tensorboardX import SummaryWriter

            # events reach the file from a writer thread, every 10 s and at close (flush() does not wait for it)
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10,
                                              purge_step=start_step + 1 if start_step else None)
        if "mlflow" in trackers:
            from ray.air.integrations.mlflow import setup_mlflow

            self._mlflow = setup_mlflow(config, experiment_name=name, run_name=name,
                                        create_experiment_if_not_exists=True)
        if "wandb" in trackers:
            import os

            from ray.air.integrations.wandb import setup_wandb

            self._wandb = setup_wandb(config, project=os.environ.get("WANDB_PROJECT", "video_llava"), name=name)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Every number of ``metrics`` at ``step``."""
        numbers = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self._tensorboard is not None:
            for key, value in numbers.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(numbers, step=step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        """Write what is pending and end the trackers' runs (at the run's last step)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()
        self._tensorboard = self._mlflow = self._wandb = None
