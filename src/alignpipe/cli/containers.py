"""Run the compiled pipeline's tasks in containers: kfp.local's DockerRunner against a Docker-compatible API (a
Docker engine, or podman's `podman system service` through DOCKER_HOST), every task in one local image.

Why not DockerRunner as it comes: kfp 2.17's handler starts each container with `auto_remove=True`. Podman removes
the container when it exits, `wait()` then gets a 404, and the handler maps that to exit code 0, so a failing task
is reported SUCCESS. `docker_runner` swaps in `run_container` (no auto-remove, the exit code from `wait()`, then
remove) while the run lasts. The components' GPU image is not built on a CPU machine, so every task runs in `image`
(the CPU image in `make test-images`); the command and arguments are the compiled YAML's, unchanged.
"""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path
from typing import Any, Iterator

from alignpipe.core.errors import ConfigError
from alignpipe.core.outputs import is_ours

NETWORKS = ("none", "host")  # podman's default bridge network breaks log streaming (HTTP 500 "no such container")


def run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any], *, run_image: str,
                  **run_args: Any) -> int:
    """Run one task's command in `run_image` (instead of its component's `image`), stream its log, return its exit
    code, then remove the container."""
    print(f"task image {image} -> running in {run_image}", flush=True)
    container = client.containers.run(image=run_image, command=command, volumes=volumes, detach=True, **run_args)
    try:
        for chunk in container.logs(stream=True, follow=True):
            print(chunk.decode(errors="replace"), end="", flush=True)
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


def tracking_store(root: Path) -> str:
    """The MLflow store of a containerized run: a sqlite file and an artifact folder under the pipeline root (which
    every task sees at its own path), writable by the image's user. The experiment is created here, with its
    artifacts there: left to MLflow, they would go to `./mlruns` inside each task's container and be lost with it
    (and the registered models with them)."""
    from alignpipe.tracking import runs

    root = root.resolve()
    artifacts = root / "mlartifacts"
    artifacts.mkdir(exist_ok=True)
    artifacts.chmod(0o777)  # mkdir applies the umask
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs.create_experiment(uri, artifacts)
    (root / "mlflow.db").chmod(0o666)
    return uri


@contextlib.contextmanager
def docker_runner(image: str, pipeline_root: str | Path, network: str = "none") -> Iterator[Any]:
    """A kfp.local.DockerRunner that runs every task in the local `image` with `network`; for `kfp.local.init`.

    The tasks run as the image's user (non-root), so the pipeline root, which is mounted into every container at
    its own path, must be writable by it: a root this creates is made world-writable, an existing one must be."""
    try:
        import docker
    except ImportError:
        raise ConfigError("--image", "needs the docker Python SDK (pip install docker)") from None
    from kfp import local
    from kfp.local import docker_task_handler

    if network not in NETWORKS:
        raise ConfigError("--network", f"must be one of {', '.join(NETWORKS)}, got {network!r}")
    try:
        client = docker.from_env()
    except docker.errors.DockerException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError("--image", "no container engine answers at DOCKER_HOST (start Docker, or `podman system "
                          f"service --time=0 unix://SOCKET &` with DOCKER_HOST=unix://SOCKET): {first}") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ConfigError("--image", f"{image} is not in the local image store of {client.api.base_url} "
                                     "(build it: make image-cpu)") from None
    except docker.errors.DockerException as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError("--image", f"the container engine at {client.api.base_url} failed: {first}") from None
    finally:
        client.close()
    root = Path(pipeline_root).resolve()
    if not root.exists():
        root.mkdir(parents=True)
        root.chmod(0o777)  # mkdir applies the umask
    elif is_ours(root):  # a root `pipeline run --local` just made (alignpipe.core.outputs)
        root.chmod(0o777)
    elif not root.stat().st_mode & stat.S_IWOTH:
        raise ConfigError(str(root), "the tasks run as the image's non-root user: make the pipeline root "
                                     "writable for it (chmod a+w) or pick a new --root")
    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = lambda **kwargs: run_container(run_image=image, **kwargs)
    try:
        yield local.DockerRunner(network_mode=network)
    finally:
        docker_task_handler.run_docker_container = original

