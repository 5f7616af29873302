"""The serving copy of the export stage's policy graph: logits of the last position only.

The exported KV-cache decoder returns logits for every input position, so a prefill of an 80-token prompt runs the
LM head (hidden x vocabulary) 80 times where sampling reads one row: about a quarter of a prefill's work at the
default model's size. `last_position_logits` writes a copy of the graph with a `Slice` of the last position before
the LM head's MatMul; `serving_graph` keeps that copy only when it gives the original graph's last-position logits
on a probe (left padding included), else the original graph is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROBE_TOLERANCE = 1e-4  # max |logit difference| between the two graphs on the probe


def last_position_logits(src: Path, dst: Path) -> bool:
    """Write to `dst` the graph `src` with its `logits` computed for the last position only; False (nothing
    written) when `logits` is not a MatMul of a (batch, sequence, hidden) input (another exporter's graph)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    index = next((i for i, n in enumerate(graph.node) if "logits" in n.output), None)
    if index is None or graph.node[index].op_type != "MatMul":
        return False
    node = graph.node[index]
    names = ("alignpipe_last_start", "alignpipe_last_end", "alignpipe_last_axis")
    for name, value in zip(names, (-1, np.iinfo(np.int64).max, 1)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
    hidden = "alignpipe_last_hidden"
    graph.node.insert(index, helper.make_node("Slice", [node.input[0], *names], [hidden], name="alignpipe_last"))
    node.input[0] = hidden
    for out in graph.output:  # the sequence axis of `logits` is now 1
        if out.name == "logits" and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].ClearField("dim_param")
            out.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(dst))
    return True


def serving_graph(src: Path, workdir: Path) -> Path:
    """The policy graph to serve: the last-position copy (in `workdir`) when it matches `src` on a probe, else
    `src`."""
    dst = Path(workdir) / "policy.last.onnx"
    try:
        if not last_position_logits(Path(src), dst) or not _same_last_logits(src, dst):
            return Path(src)
    except Exception:  # onnx missing or a graph it cannot edit: serve the export as it is
        return Path(src)
    return dst


def _same_last_logits(a: Path, b: Path) -> bool:
    """Whether graphs `a` and `b` give the same last-position logits for a left-padded batch of two."""
    import onnxruntime as ort

    from alignpipe.lm.onnx_runtime import CPU

    ids = np.array([[0, 0, 5, 9, 13], [3, 7, 11, 2, 4]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    last = []
    for path in (a, b):
        session = ort.InferenceSession(str(path), providers=[CPU])
        feeds = {"input_ids": ids, "attention_mask": mask}
        for i in session.get_inputs()[2:]:
            feeds[i.name] = np.zeros([2, *(0 if not isinstance(d, int) else d for d in i.shape[1:])], np.float32)
        last.append(session.run(["logits"], feeds)[0][:, -1])
    return last[0].shape == last[1].shape and float(np.abs(last[0] - last[1]).max()) <= PROBE_TOLERANCE
