"""MLflow: stage runs (runs), the model registry (registry), a local model server (serving)."""
