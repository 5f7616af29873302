"""KFP components of alignpipe, installed as `alignpipe.components`: `stages` (one lightweight component per stage,
generated from the stage registry), `image` (the pinned image tags) and `runtime` (what the component bodies call
inside the container)."""
