"""A stage's pipeline runs reuse the model loaded for their config, and load another only for another config."""

from dataclasses import dataclass

from pipelines.model_cache import keep_only, reused


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


def test_a_stage_that_starts_frees_the_other_stages_models():
    import weakref

    class Model:
        pass

    rewriter = reused("rewriter-test", Config("a"), Model)
    captioner = reused("captioner-test", Config("a"), Model)
    gone = weakref.ref(rewriter)
    del rewriter
    keep_only("captioner-test")
    assert gone() is None  # nothing else held it: its memory is free
    assert reused("captioner-test", Config("a"), Model) is captioner  # the starting stage's own is kept
    keep_only()
