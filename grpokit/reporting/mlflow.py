"""``report_to: mlflow``: MLflow (``pip install grpokit[mlflow]``, the MLflow client).

The run is created in experiment ``project`` (else ``MLFLOW_EXPERIMENT_NAME``, else ``grpokit``) on the
tracking store of ``MLFLOW_TRACKING_URI`` (a server's ``http(s)://`` address, ``sqlite:///mlflow.db`` with the
full ``mlflow`` package, or ``file:./mlruns`` with ``MLFLOW_ALLOW_FILE_STORE=true``), named ``run_name``. The
run's config becomes its params (values cut to MLflow's length limit), every metrics row its metrics at their
step (MLflow's key alphabet has no ``@``: ``eval/pass@4`` is logged as ``eval/pass_at_4``; a key that others
extend, ``rewards/<name>`` beside ``rewards/<name>/errors``, as ``rewards/<name>/value``), each completions
table a ``log_table`` artifact ``completions/step_<step>.json``, and ``metrics.png`` an artifact.

A resumed run continues the same MLflow run (its id is kept in ``trackers.json``); its params are not logged
again (MLflow refuses to change a param).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from grpokit.reporting.trackers import SAMPLES_KEY, TrackerRun, project_name, scalars, table_of

KEY_RE = re.compile(r"[^0-9A-Za-z_\-. :/]")


def metric_key(key: str) -> str:
    """``key`` in MLflow's alphabet (alphanumerics, ``_ - . : /`` and space): ``@`` -> ``_at_``, others -> ``_``."""
    return KEY_RE.sub("_", key.replace("@", "_at_"))


def metric_keys(values: dict[str, float]) -> dict[str, float]:
    """A metrics row with MLflow's keys (``metric_key``); a key that others extend (``rewards/f`` beside
    ``rewards/f/errors``) becomes ``<key>/value``, since a file store keeps each metric in a file of that path."""
    keys = {metric_key(k): v for k, v in values.items()}
    parents = {k.rsplit("/", 1)[0] for k in keys if "/" in k}
    return {(f"{k}/value" if k in parents else k): v for k, v in keys.items()}


class MLflowTracker:
    name = "mlflow"

    def __init__(self, run: TrackerRun):
        self.run = run
        self.client = None
        self.run_id = None

    def start(self, config: dict[str, Any]) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        try:
            self.client = MlflowClient()
            if self.run.run_id is not None:
                self.run_id = self.run.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                return self.run_id
            name = project_name(self.run, "MLFLOW_EXPERIMENT_NAME")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"report_to: mlflow could not open its tracking store (MLFLOW_TRACKING_URI: a server "
                               f"URL, sqlite:///mlflow.db with the full mlflow package, or file:./mlruns with "
                               f"MLFLOW_ALLOW_FILE_STORE=true): {first}") from e
        self.run_id = self.client.create_run(experiment_id, run_name=self.run.run_name).info.run_id
        params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in config.items()]
        for lo in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[lo:lo + MAX_PARAMS_TAGS_PER_BATCH])
        return self.run_id

    def log(self, row: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in metric_keys(scalars(row)).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        columns, rows = table_of(records)
        data = {c: [row[j] for row in rows] for j, c in enumerate(columns)}
        self.client.log_table(self.run_id, data, f"{SAMPLES_KEY}/step_{step}.json")

    def log_image(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)
            self.run_id = None
