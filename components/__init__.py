"""KFP components of alignpipe: `stages` (one lightweight component per stage), `image` (the pinned image tags)
and `runtime` (what the component bodies call inside the container)."""
