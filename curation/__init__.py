"""clip-curation's pure library: schema, shards, records, and each stage's logic.

Nothing here imports Beam or Dagster, so it can be used and tested alone.
"""

__version__ = "0.1.0"
