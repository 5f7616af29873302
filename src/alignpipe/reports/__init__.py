"""Self-contained HTML pages built from the report.json dicts the stages write: one file each, inline CSS, images
as data: URIs, no script, no font or link out of the file, so they read the same in the Kubeflow UI (which shows a
single file), in MLflow and on an air-gapped cluster."""
