"""`imgclf experiments`: the presets (variants x seeds), DVC's queue behind one adapter, and the table of
results read back from MLflow."""
