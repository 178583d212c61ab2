"""evaluate's wing: what the evaluate stage draws.

figures.py  the confusion matrices, the most confidently misclassified images, the precision-recall curves per
            class (as PNGs and as `dvc plots` data)

Imports the shared modules and files/.
"""
