"""tilepipe: a workflow-orchestrated ML pipeline for large satellite scenes.

Nothing reaches the internet and nothing is written outside the project: the usage reports of the
tools tilepipe runs (DVC, MLflow, Prefect's server, ONNX Runtime) are off in every tilepipe process
and the processes it starts, unless the environment sets them otherwise. ONNX Runtime and MLflow
would otherwise write a device or installation id under ~/.cache and ~/.config and send events.
"""

import os

NO_USAGE_REPORTS = {
    "DO_NOT_TRACK": "true",  # the common convention (MLflow reads it too)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "ORT_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
for _name, _value in NO_USAGE_REPORTS.items():
    os.environ.setdefault(_name, _value)
