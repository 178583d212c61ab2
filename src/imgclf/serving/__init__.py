"""The served model: what `mlflow models serve` and `mlflow.pyfunc.load_model` run, and `imgclf predict`.

pyfunc.py   the MLflow pyfunc around the trained net (class names, probabilities, the top-k, the run's TTA, its
            weights checked when it loads), and how train logs it with its code, signature and model_config
request.py  a request in any of MLflow's JSON forms -> the net's pixels under the input policy, or a one-line 400
classes.py  a loaded net's outputs checked against its class names
predict.py  `imgclf predict PATH...`

Imports the shared modules, files/ and data/ (encoded images are converted as prepare converts them, under
data/policy.py); tracking/ imports it to log the model.
"""
