"""The served model: what `mlflow models serve` and `mlflow.pyfunc.load_model` run.

pyfunc.py  the MLflow pyfunc around the trained net (class names, probabilities, the top-k, the run's TTA, one-line
           HTTP 400s), and how train logs it with its code, signature and input example

Imports the shared modules, files/ and data/images.py (encoded images are converted as prepare converts them);
tracking/ imports it to log the model.
"""
