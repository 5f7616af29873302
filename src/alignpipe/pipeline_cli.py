"""`alignpipe pipeline compile|run|submit` (filled in by the Kubeflow pipeline work)."""

from __future__ import annotations

import argparse


def add_pipeline_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="compile, run locally or submit the Kubeflow pipeline")
    actions = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    del actions
