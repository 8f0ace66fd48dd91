"""The job pod of the `k8s` launcher: the resource's PodSpec merged with its stage's requests, and checked to
mount the paths its job reads and writes.

Kubernetes takes a field in either spelling (`node_selector`, `nodeSelector`);
each is read in both and written back under the one the user gave.
"""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any


def _key(spec: dict, snake: str) -> str:
    """The spelling `spec` uses for a field: its own camelCase one if it has it, else snake_case."""
    head, *rest = snake.split("_")
    camel = head + "".join(word.title() for word in rest)
    return camel if camel in spec and snake not in spec else snake


def spec_value(spec: dict, snake: str) -> Any:
    """A PodSpec field given in either spelling, or None."""
    return spec.get(_key(spec, snake))


def _merge_into(spec: dict, snake: str, extra: dict) -> None:
    """`extra`'s entries under `spec[snake]`, the ones `spec` sets itself winning."""
    key = _key(spec, snake)
    spec[key] = {**extra, **(spec.get(key) or {})}


def job_pod_spec(base: dict, step_k8s: dict) -> dict:
    """The resource's PodSpec (volumes, mounts, ...) with the step's `dagster-k8s/config` added: its CPU,
    memory and GPU requests and limits, node selector and tolerations, so a rewrite job lands on a GPU node
    with its GPU, as its step would. Requests and limits merge per resource, `base`'s winning (a CPU limit
    of every job does not drop the stage's GPU); tolerations are the union; a node selector (or any other
    field) that `base` sets is its own, whole, since two selectors may name different pools. `base` is not
    changed in place."""
    spec = copy.deepcopy(base)
    spec["containers"] = spec.get("containers") or [{}]
    first = spec["containers"][0]
    resources = step_k8s.get("container_config", {}).get("resources", {})
    if resources:
        _merge_into(first, "resources", {})
        own = first[_key(first, "resources")]
        for part, values in resources.items():
            _merge_into(own, part, values)
    pod = step_k8s.get("pod_spec_config", {})
    for name, value in pod.items():
        if name == "tolerations":
            key = _key(spec, name)
            spec[key] = (spec.get(key) or []) + [t for t in value if t not in (spec.get(key) or [])]
        elif spec_value(spec, name) is None:
            spec[name] = copy.deepcopy(value)
    return spec


def unmounted(spec: dict, paths: list[str]) -> list[str]:
    """The absolute paths among `paths` that no volume mount of the first container holds."""
    mounts = [PurePosixPath(spec_value(m, "mount_path") or "/nonexistent")
              for m in spec_value((spec.get("containers") or [{}])[0], "volume_mounts") or []]
    return [p for p in paths if PurePosixPath(p).is_absolute()
            and not any(PurePosixPath(p).is_relative_to(m) for m in mounts)]
