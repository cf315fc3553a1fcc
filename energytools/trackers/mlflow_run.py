"""--log mlflow: a run in MLflow's local file store OUT/mlruns (or MLFLOW_TRACKING_URI)."""
from __future__ import annotations

import os
import time

from .base import Tracker, flat_params, register

EXPERIMENT = "energytools"
#: MLflow takes at most this many params or metrics per batch call, and values of this length
BATCH, VALUE_LENGTH = 100, 6000


@register("mlflow")
class MlflowTracker(Tracker):
    module, extra = "mlflow", "mlflow"

    def __init__(self, out, config, state, resumed):
        super().__init__(out, config, state, resumed)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(out / 'mlruns').resolve()}"
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless told: it is the offline default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = state.get("run_id") if resumed and state.get("tracking_uri") == uri else None
        if run_id is None:
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
            run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            params = [Param(k, v[:VALUE_LENGTH]) for k, v in flat_params(config).items()]
            for start in range(0, len(params), BATCH):
                self.client.log_batch(run_id, params=params[start:start + BATCH])
        else:
            self.client.update_run(run_id, status="RUNNING")
        state.update(run_id=run_id, tracking_uri=uri)
        self.run_id = run_id

    def log(self, values, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in values.items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH])

    def close(self, ok):
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")
