"""A stage's pipeline runs reuse the model loaded for their config, and load another only for another config."""

from dataclasses import dataclass

from pipelines.model_cache import reused


@dataclass
class Config:
    model: str


def test_the_same_config_reuses_and_another_replaces():
    loads = []

    def load(name):
        loads.append(name)
        return object()

    first = reused("test-kind", Config("a"), lambda: load("a"))
    assert reused("test-kind", Config("a"), lambda: load("a")) is first and loads == ["a"]
    other = reused("test-kind", Config("b"), lambda: load("b"))
    assert other is not first and loads == ["a", "b"]
    assert reused("test-kind", Config("a"), lambda: load("a")) is not first  # only the last one is kept
    assert reused("other-kind", Config("a"), lambda: load("x")) is not first and loads == ["a", "b", "a", "x"]


def test_the_same_config_with_other_model_files_loads_them_afresh():
    loads = []
    first = reused("files-kind", Config("a"), lambda: loads.append(1) or object(), ["sha-1"])
    assert reused("files-kind", Config("a"), lambda: loads.append(2) or object(), ["sha-1"]) is first
    assert reused("files-kind", Config("a"), lambda: loads.append(3) or object(), ["sha-2"]) is not first
    assert loads == [1, 3]
