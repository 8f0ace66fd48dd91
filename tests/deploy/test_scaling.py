"""deploy/SCALING.md carries exactly the table that deploy/scaling.py computes from its figures."""

import importlib.util
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _scaling():
    spec = importlib.util.spec_from_file_location("scaling", DEPLOY / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_md_has_the_computed_plan():
    assert _scaling().render() in (DEPLOY / "SCALING.md").read_text()


def test_every_gpu_figure_is_marked_as_an_assumption():
    for name, figure in _scaling().FIGURES.items():
        assert figure.source.strip()
        if "gpu" in name:
            assert figure.source.startswith("assumption"), name
