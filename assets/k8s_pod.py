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


def _add_resources(own: dict, stage: dict) -> None:
    """The stage's requests and limits added to `own`, resource by resource: one `own` names in either keeps
    `own`'s values in both (a request of the stage's beside a limit of its own could exceed it, which the
    API server refuses). A request left above its limit is lowered to it, and an extended resource
    (nvidia.com/gpu) requested below its limit is raised to it: Kubernetes does not overcommit those."""
    requests_key, limits_key = _key(own, "requests"), _key(own, "limits")
    requests, limits = dict(own.get(requests_key) or {}), dict(own.get(limits_key) or {})
    for name in {*stage.get("requests", {}), *stage.get("limits", {})} - {*requests, *limits}:
        for part, into in (("requests", requests), ("limits", limits)):
            if name in stage.get(part, {}):
                into[name] = stage[part][name]
    for name in set(requests) & set(limits):
        if "/" in name or _quantity(requests[name]) > _quantity(limits[name]):
            requests[name] = limits[name]
    own.update({key: value for key, value in ((requests_key, requests), (limits_key, limits)) if value})


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30,
             "Ti": 2 ** 40}


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "48Gi", "8") as a number, to compare a request with its limit."""
    text = str(value)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


def job_pod_spec(base: dict, step_k8s: dict) -> dict:
    """The resource's PodSpec (volumes, mounts, ...) with the step's `dagster-k8s/config` added: its CPU,
    memory and GPU requests and limits, node selector and tolerations, so a rewrite job lands on a GPU node
    with its GPU, as its step would. Resources merge by name, `base`'s winning (a CPU limit of every job
    does not drop the stage's GPU; see `_add_resources`); tolerations are the union; a node selector (or
    any other field) that `base` sets is its own, whole, since two selectors may name different pools.
    `base` is not changed in place."""
    spec = copy.deepcopy(base)
    spec["containers"] = spec.get("containers") or [{}]
    first = spec["containers"][0]
    resources = step_k8s.get("container_config", {}).get("resources", {})
    if resources or spec_value(first, "resources"):
        _merge_into(first, "resources", {})
        _add_resources(first[_key(first, "resources")], resources)
    pod = step_k8s.get("pod_spec_config", {})
    for name, value in pod.items():
        if name == "tolerations":
            key = _key(spec, name)
            spec[key] = (spec.get(key) or []) + [t for t in value if t not in (spec.get(key) or [])]
        elif spec_value(spec, name) is None:
            spec[name] = copy.deepcopy(value)
    return spec


def unmounted(spec: dict, paths: list[str]) -> list[str]:
    """The paths among `paths` (absolute ones) that no volume mount of the first container holds."""
    mounts = [PurePosixPath(spec_value(m, "mount_path") or "/nonexistent")
              for m in spec_value((spec.get("containers") or [{}])[0], "volume_mounts") or []]
    return [p for p in paths if not any(PurePosixPath(p).is_relative_to(m) for m in mounts)]
