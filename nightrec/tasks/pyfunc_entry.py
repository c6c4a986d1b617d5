"""The model file MLflow runs to build the pyfunc ("models from code"); see :mod:`nightrec.tasks.pyfunc_model`."""

from mlflow.models import set_model

from nightrec.tasks.pyfunc_model import HistoryRecommender

set_model(HistoryRecommender())
