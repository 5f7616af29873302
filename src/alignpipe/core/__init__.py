"""Core, the ground floor: typed configs, errors, JSON/JSONL io, output folders, hashing, distributed-launch helpers.
It imports nothing above it (tests/test_layers.py)."""
