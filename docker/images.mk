# `make images`: build the two images the KFP components run in (docker/Dockerfile for GPU nodes,
# docker/Dockerfile.cpu for CPU tasks) with docker or podman (`DOCKER=podman`); `make push-images` pushes them.
# The tags are read from components/image.py, the one place they are pinned. The Makefile includes this file.
#
# Knobs for restricted networks (each optional; docs/kubeflow.md):
#   CA_BUNDLE=FILE         a CA bundle pip (and uv) trust in the build; passed as the build secret `ca_bundle`
#   WHEELS=DIR             a local wheel folder pip looks in first (find-links), e.g. the CPU torch wheel
#   INDEX_URL=URL          the pip index instead of PyPI; EXTRA_INDEX_URL=URL an extra one
#   TORCH_INDEX_URL=URL    where torch comes from (defaults: the CPU / cu130 wheel index; empty: the pip index)
#   BUILD_FLAGS=...        anything else for `build`, e.g. `--network host` or `--build-arg PYTHON_IMAGE=...`
# The build context is a staged copy (.tmp/image-context-<flavor>: the package sources of the working tree and
# wheels/), so the build never reads or writes the checkout itself.
DOCKER ?= docker
IMAGE_GPU := $(shell python3 components/image.py gpu)
IMAGE_CPU := $(shell python3 components/image.py cpu)
CA_BUNDLE ?=
WHEELS ?=
INDEX_URL ?=
EXTRA_INDEX_URL ?=
BUILD_FLAGS ?=
SERVE_MODEL ?= models:/alignpipe-policy-onnx@champion
SERVE_IMAGE ?= localhost/alignpipe-policy-onnx:champion
SERVED_MODEL_NAME = $(firstword $(subst /, ,$(subst @, ,$(patsubst models:/%,%,$(SERVE_MODEL)))))
IMAGE_SOURCES := pyproject.toml README.md src components pipelines
comma := ,

image_args = $(if $(CA_BUNDLE),--secret id=ca_bundle$(comma)src=$(abspath $(CA_BUNDLE))) \
	$(if $(INDEX_URL),--build-arg INDEX_URL=$(INDEX_URL)) \
	$(if $(EXTRA_INDEX_URL),--build-arg EXTRA_INDEX_URL=$(EXTRA_INDEX_URL)) \
	$(if $(filter undefined,$(origin TORCH_INDEX_URL)),,--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) \
	$(BUILD_FLAGS)

# $(call stage_context,DIR): the package sources (tracked and untracked, not ignored) and the wheel folder.
define stage_context
rm -rf $(1) && mkdir -p $(1)/alignpipe $(1)/wheels
git ls-files -z -co --exclude-standard -- $(IMAGE_SOURCES) | xargs -0 cp --parents -t $(1)/alignpipe
$(if $(WHEELS),cp -l $(WHEELS)/*.whl $(1)/wheels/ 2>/dev/null || cp $(WHEELS)/*.whl $(1)/wheels/)
endef

# $(call sources_digest,DIR): a digest of the staged sources and the wheel names, passed as the build arg
# SOURCES_DIGEST: buildah (podman) keys its layer cache on the build args, not on the bind-mounted context, and
# would otherwise reuse an install of older sources.
sources_digest = $$(cd $(1) && { find alignpipe -type f -print0 | sort -z | xargs -0 sha256sum; ls wheels; } | \
	sha256sum | cut -c1-16)

.PHONY: images image-gpu image-cpu image-serve push-images

images: image-gpu image-cpu

image-gpu:
	$(call stage_context,.tmp/image-context-gpu)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile -t $(IMAGE_GPU) $(image_args) \
		--build-arg SOURCES_DIGEST=$(call sources_digest,.tmp/image-context-gpu) .tmp/image-context-gpu
	rm -rf .tmp/image-context-gpu

image-cpu:
	$(call stage_context,.tmp/image-context-cpu)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE_CPU) $(image_args) \
		--build-arg SOURCES_DIGEST=$(call sources_digest,.tmp/image-context-cpu) .tmp/image-context-cpu
	rm -rf .tmp/image-context-cpu

# `make image-serve`: the serving image of SERVE_MODEL from the registry at MLFLOW_TRACKING_URI (docker/Dockerfile.serve:
# the CPU image plus the model's files, `alignpipe serve` on port 8080, the model id the registered name), tagged
# SERVE_IMAGE. Build the CPU image first (`make image-cpu`).
image-serve:
	rm -rf .tmp/image-context-serve && mkdir -p .tmp/image-context-serve
	MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false mlflow artifacts download -u $(SERVE_MODEL) -d .tmp/image-context-serve/model >/dev/null
	$(DOCKER) build -f docker/Dockerfile.serve -t $(SERVE_IMAGE) --build-arg BASE_IMAGE=$(IMAGE_CPU) \
		--build-arg SERVED_MODEL_NAME=$(SERVED_MODEL_NAME) $(BUILD_FLAGS) .tmp/image-context-serve
	rm -rf .tmp/image-context-serve

push-images: images
	$(DOCKER) push $(IMAGE_GPU)
	$(DOCKER) push $(IMAGE_CPU)
