"""The code of every logged adapter model (MLflow "models from code"): `mlflow.pyfunc.load_model`
runs this file, which names the model class, instead of unpickling a `python_model.pkl` (a pickle
runs whatever code it was made to run; this file is source anyone can read beside the model's
MLmodel). The class is `flows.pyfunc_model.LoraAdapterModel`, from the installed lowregret
(pinned in the model's requirements)."""

import mlflow.models

from flows.pyfunc_model import LoraAdapterModel

mlflow.models.set_model(LoraAdapterModel())
