"""The generator in the MLflow Model Registry: a pyfunc model (class ids, seeds -> images),
loadable with mlflow.pyfunc.load_model and servable with `mlflow models serve`."""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

import polyinr
from polyinr.core.config import TrackingConfig
from polyinr.model import sampling
from polyinr.training import tracking

DEFAULT_NAME = "polyinr-generator"
# MLflow's "models from code": the model is this script, not a pickled object.
MODEL_CODE = """from mlflow.models import set_model

from polyinr.commands.registry import GeneratorModel

set_model(GeneratorModel())
"""


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Rows of (class_id, seed) -> uint8 images (N, H, W, 3); params psi, resolution, chunk."""

    def load_context(self, context):
        from polyinr.model.generator import load_generator

        # The weights travel as the exported checkpoint, loaded weights-only (no pickled code).
        self.g, self.meta = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        """model_input columns class_id, seed (int) -> uint8 (N, H, W, 3), as `generate`."""
        params = params or {}
        missing = {"class_id", "seed"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input needs columns class_id and seed; missing {missing}")
        resolution = int(params.get("resolution") or self.meta["resolution"])
        ws = sampling.mapping(
            self.g,
            [int(c) for c in model_input["class_id"]],
            [int(s) for s in model_input["seed"]],
            float(params.get("psi", 1.0)),
        )
        chunk = int(params.get("chunk", sampling.DEFAULT_CHUNK))
        images = sampling.render(self.g, ws, sampling.view_grid(resolution), chunk)
        return sampling.to_hwc(images)  # (N, H, W, 3)


def signature(resolution: int) -> ModelSignature:
    """Inputs (class_id, seed) per image; psi, resolution and chunk as inference params."""
    return ModelSignature(
        inputs=Schema([ColSpec("long", "class_id"), ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema(
            [
                ParamSpec("psi", "double", 1.0),
                ParamSpec("resolution", "long", resolution),
                ParamSpec("chunk", "long", sampling.DEFAULT_CHUNK),
            ]
        ),
    )


def publish(
    generator_path: str | Path,
    resolution: int,
    tracking_cfg: TrackingConfig,
    name: str = DEFAULT_NAME,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log the exported generator as a pyfunc model in a run (`run_id`, or a new one) and
    register it under `name` with version `tags`; returns `models:/<name>/<version>`.

    A version of the same run with the same tags is returned as it is (rerunning a publish
    that changed nothing registers nothing).
    """
    tags = dict(tags or {})
    if run_id is not None:
        mlflow.set_tracking_uri(tracking_cfg.uri)
        query = f"name = '{name}' and run_id = '{run_id}'"
        for existing in mlflow.MlflowClient().search_model_versions(query):
            if {k: existing.tags.get(k) for k in tags} == tags:
                return f"models:/{name}/{existing.version}"
    requirements = [f"{p}=={version(p)}" for p in ("torch", "numpy", "pandas", "tqdm", "mlflow")]
    with tempfile.TemporaryDirectory() as tmp, tracking.start_run(tracking_cfg, run_id=run_id):
        code = Path(tmp) / "polyinr_generator.py"
        code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=str(code),
            artifacts={"generator": str(generator_path)},
            # The polyinr package travels with the model, so it loads where polyinr is absent.
            code_paths=[str(Path(polyinr.__file__).parent)],
            signature=signature(resolution),
            # Stored as the serving example (serving_input_example.json); MLflow checks it
            # by a prediction, kept cheap by a small resolution.
            input_example=(
                pd.DataFrame({"class_id": [0], "seed": [0]}),
                {"psi": 1.0, "resolution": 16},
            ),
            pip_requirements=requirements,
            registered_model_name=name,
        )
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, info.registered_model_version, key, value)
    return f"models:/{name}/{info.registered_model_version}"
