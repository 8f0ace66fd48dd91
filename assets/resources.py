"""Resources shared by the stage assets: where builds live and which Beam runner runs them."""

from pathlib import Path

import dagster as dg


class StorageResource(dg.ConfigurableResource):
    """Root directory of all dataset builds; each build (partition) gets its own subdirectory."""

    root: str = "./runs"

    def build_dir(self, build: str) -> Path:
        path = Path(self.root).expanduser().resolve() / build
        path.mkdir(parents=True, exist_ok=True)
        return path


class BeamRunnerResource(dg.ConfigurableResource):
    """The Beam runner and its flags, turned into pipeline arguments for every stage."""

    runner: str = "DirectRunner"
    direct_num_workers: int = 1
    extra_flags: list[str] = []

    def flags(self) -> list[str]:
        known = {"DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "PortableRunner"}
        if self.runner not in known:
            raise dg.Failure(f"BeamRunnerResource.runner: unknown runner {self.runner!r}; use one of {sorted(known)}")
        flags = [f"--runner={self.runner}"]
        if self.runner == "DirectRunner" and self.direct_num_workers > 1:
            flags += [f"--direct_num_workers={self.direct_num_workers}", "--direct_running_mode=multi_processing"]
        return flags + list(self.extra_flags)
