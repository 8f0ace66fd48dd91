"""The composition root: every asset, check and resource of the project, in one `Definitions`."""

import dagster as dg

from assets.ingest import raw_pairs, raw_pairs_reject_ratio, raw_pairs_schema_valid
from assets.resources import BeamRunnerResource, StorageResource

defs = dg.Definitions(
    assets=[raw_pairs],
    asset_checks=[raw_pairs_schema_valid, raw_pairs_reject_ratio],
    resources={
        "storage": StorageResource(root=dg.EnvVar("CLIP_CURATION_ROOT").get_value("./runs") or "./runs"),
        "beam_runner": BeamRunnerResource(),
    },
)
