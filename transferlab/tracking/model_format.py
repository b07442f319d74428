"""How a stored classifier travels through MLflow without a pickle.

A model version's artifacts hold the classifier folder exactly as the stage wrote it
(``meta.json`` with its own digest and the digests of ``head.pt`` / ``backbone.pt``, state dicts
only) under ``artifacts/classifier/``, plus this module's :class:`ClassifierModel` as an MLflow
"model from code" (a Python file, not a cloudpickle), so ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` still work for users who trust the store.

transferlab itself never runs code from the artifact store:
``transferlab.tracking.registry.load_registered_model`` downloads the classifier folder and
rebuilds it with the installed package's ``load_classifier`` (``weights_only=True`` for every
tensor file, digests checked). A planted pickle there is refused with an error naming the file,
and nothing in it runs. (This file is what MLflow executes; it imports nothing from the store.)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

ARTIFACT = "classifier"


class ClassifierModel(PythonModel):
    """pyfunc wrapper: images (N, 3, H, W) float32 in [0, 1] -> logits (N, C)."""

    def load_context(self, context):
        from transferlab.classifiers import load_classifier

        self.model = load_classifier(Path(context.artifacts[ARTIFACT]))

    # the hint is one MLflow takes as "no schema to infer" (the signature is logged with the
    # model); without one it warns on every log, in terminal colours even in a log file
    def predict(self, context, model_input: np.ndarray, params=None):
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
            return self.model(x).numpy()


mlflow.models.set_model(ClassifierModel())
