"""Core: typed configs, errors, JSON/JSONL io, the one run path (runner), distributed-launch helpers."""
