"""Language-model plumbing: tokenizers and models, policy sampling, the reward model, ONNX Runtime."""
