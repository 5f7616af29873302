"""The container images of the components: pinned here once, read by components/stages.py, docker/images.mk
(`python3 components/image.py gpu|cpu`) and the tests. Bump the tag with the package version (pyproject.toml)."""

REGISTRY = "ghcr.io/alignpipe/alignpipe"
VERSION = "0.1.0"  # == [project] version in pyproject.toml (tests/test_images.py checks it)
GPU_IMAGE = f"{REGISTRY}:{VERSION}-cuda"  # docker/Dockerfile: CUDA torch + onnxruntime-gpu, for GPU nodes
CPU_IMAGE = f"{REGISTRY}:{VERSION}-cpu"  # docker/Dockerfile.cpu: CPU torch + onnxruntime, for data/validate/register

IMAGES = {"gpu": GPU_IMAGE, "cpu": CPU_IMAGE}

if __name__ == "__main__":
    import sys

    print(IMAGES[sys.argv[1]] if len(sys.argv) > 1 else "\n".join(IMAGES.values()))
