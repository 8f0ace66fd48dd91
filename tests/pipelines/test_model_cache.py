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
