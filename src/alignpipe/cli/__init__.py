"""Command-line adapters: the stage CLI, the KFP pipeline commands, TrainJob manifests, the run report."""
