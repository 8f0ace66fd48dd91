"""An in-process job sees the environment its resources give it (API keys, credentials), and only while it runs."""

import os
import sys
import types

import dagster as dg

from assets.launch import run_stage
from assets.resources import BeamRunnerResource


def test_an_in_process_job_gets_the_resources_environment(monkeypatch):
    seen = {}
    job = types.ModuleType("fake_stage_job")
    job.run = lambda argv: seen.update(argv=argv, key=os.environ.get("OPENAI_API_KEY")) or "done"
    monkeypatch.setitem(sys.modules, "fake_stage_job", job)
    monkeypatch.setenv("OPENAI_API_KEY", "the-code-location's")
    result = run_stage(dg.build_asset_context(), "fake_stage_job", ["--x"], BeamRunnerResource(),
                       {"OPENAI_API_KEY": "the-resource's"})
    assert result == "done" and seen == {"argv": ["--x"], "key": "the-resource's"}
    assert os.environ["OPENAI_API_KEY"] == "the-code-location's"  # put back afterwards
