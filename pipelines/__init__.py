"""Beam pipelines built from `curation/`: one module per stage, each with `run(argv, test_pipeline)`."""
