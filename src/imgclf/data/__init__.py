"""The prepare stage's wing: what turns a data source into images and labels.

sources/        data sources, one plug-in module each, registered under the name `data.dataset` takes
images.py       image and label conversion and checks, shared with `imgclf predict`
decode_pool.py  the worker processes that decode a folder's images straight into prepare's files

Imports the shared modules (errors, registry) and files/ only; prepare.py (the writer) uses it.
"""
