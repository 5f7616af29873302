# `make images`: build the two images the KFP components run in (docker/Dockerfile for GPU nodes,
# docker/Dockerfile.cpu for CPU tasks) where a Docker engine exists; `make push-images` pushes them.
# The tags are read from components/image.py, the one place they are pinned. The Makefile includes this file.
DOCKER ?= docker
IMAGE_GPU := $(shell python3 components/image.py gpu)
IMAGE_CPU := $(shell python3 components/image.py cpu)

.PHONY: images image-gpu image-cpu push-images

images: image-gpu image-cpu

image-gpu:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile -t $(IMAGE_GPU) .

image-cpu:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile.cpu -t $(IMAGE_CPU) .

push-images: images
	$(DOCKER) push $(IMAGE_GPU)
	$(DOCKER) push $(IMAGE_CPU)
