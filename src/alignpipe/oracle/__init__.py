"""The task's oracle: pycodestyle scoring, evaluation metrics, judges."""
