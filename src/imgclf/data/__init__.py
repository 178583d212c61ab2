"""The prepare stage's wing: data sources (`sources/`, one plug-in module each), image and label conversion
(`images.py`, shared with predict) and the pool of processes that decode images into prepare's files
(`decode_pool.py`). Imports errors, registry and files/ only."""
