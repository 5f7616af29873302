"""Serving over `alignpipe.lm`: MLflow pyfunc models that run the exported ONNX graphs (`models`) and a local
`mlflow models serve` for tests and benchmarks (`server`)."""
