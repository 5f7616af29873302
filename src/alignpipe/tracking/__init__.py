"""MLflow: stage runs (runs), the model registry (registry), policies and ONNX exports in it (policies)."""
