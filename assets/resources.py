"""Resources shared by the stage assets: storage, the Beam runner, the LLM engine and the captioner.

Each resource checks itself when a run starts (`setup_for_execution`), so a
misconfigured one fails the run before any stage writes a byte, with a
message that names the resource and the field. Secrets (API keys, cloud
credentials) are plain string fields meant to be set with `dg.EnvVar(...)`,
so they never appear in run config or in the UI.
"""

import argparse
import fnmatch
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import dagster as dg
from pydantic import Field

from assets.k8s_pod import spec_value
from curation.shards import OVERWRITE_SENTINEL, TEMP_GLOB, atomic_write_bytes

RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "PortableRunner")
LAUNCHERS = ("auto", "in_process", "subprocess", "k8s")
TEXT_ENGINES = ("transformers", "vllm", "openai")
LOCAL_PROTOCOLS = ("", "file", "local")
# Published in place of a shard manifest by an output without one (the trained model): see publish().
FILE_LIST = "published_files.json"
# Set to "k8s" (deploy/helm), it runs every step in its own pod (assets/definitions.py).
EXECUTOR_ENV = "CLIP_CURATION_EXECUTOR"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# LLMEngineResource fields that only some backends read.
ENGINE_ONLY_FIELDS = {"gguf_file": ("transformers", "vllm"), "max_num_seqs": ("vllm",),
                      "gpu_memory_utilization": ("vllm",), "tensor_parallel_size": ("vllm",),
                      "enable_prefix_caching": ("transformers", "vllm"), "dtype": ("transformers", "vllm")}


def misconfigured(resource: str, field: str, problem: str) -> dg.Failure:
    """The one error shape for bad resource config: `Resource.field: problem`."""
    return dg.Failure(description=f"{resource}.{field}: {problem}")


class StorageResource(dg.ConfigurableResource):
    """Where dataset builds live: a local root directory, or an fsspec URI (s3://, gs://, memory://, ...).

    Stages read and write local Parquet shards (the shard writer's atomic
    rename needs a POSIX file system), so with a remote root every build is
    made under `staging` and each finished stage output is uploaded with
    fsspec under `root/<build>/<asset>`.
    """

    root: str = Field(default="./runs", description="Local directory or fsspec URI holding every build.")
    staging: str = Field(default="./runs/.staging",
                         description="Local scratch directory used when `root` is a remote URI.")
    key: Optional[str] = Field(default=None, description="Access key for a remote root; set with EnvVar.")
    secret: Optional[str] = Field(default=None, description="Secret for a remote root; set with EnvVar.")

    @property
    def protocol(self) -> str:
        return urlparse(self.root).scheme if "://" in self.root else ""

    @property
    def is_remote(self) -> bool:
        return self.protocol not in LOCAL_PROTOCOLS

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if not self.root.strip():
            raise misconfigured("StorageResource", "root", "empty; give a directory or an fsspec URI")
        if self.is_remote:
            import fsspec
            try:
                fsspec.get_filesystem_class(self.protocol)
            except (ImportError, ValueError) as exc:
                raise misconfigured("StorageResource", "root",
                                    f"no fsspec file system for {self.protocol!r}: {exc}") from exc

    def _local_root(self) -> Path:
        base = self.staging if self.is_remote else self.root.removeprefix("file://").removeprefix("local://")
        return Path(base).expanduser().resolve()

    def build_dir(self, build: str) -> Path:
        """The local directory of one build (partition); builds never share a directory."""
        if not build or "/" in build or build.startswith("."):
            raise misconfigured("StorageResource", "build", f"{build!r} is not a valid build name")
        path = self._local_root() / build
        path.mkdir(parents=True, exist_ok=True)
        return path

    def uri_for(self, build: str, name: str) -> str:
        """Where a stage output is published: the local path, or the URI under a remote root."""
        if not self.is_remote:
            return str(self.build_dir(build) / name)
        return f"{self.root.rstrip('/')}/{build}/{name}"

    def publish(self, build: str, name: str) -> str:
        """Mirror a finished local stage output at a remote root; local roots need nothing.

        The remote manifest goes first and comes back last, so a reader never pairs the old manifest with
        new shards; remote files the output no longer has (an overwrite with fewer shards) are deleted;
        an output whose manifest the remote already has (a no-op rerun) is not uploaded again, and of a
        changed one only what the remote manifest does not vouch for (a resume's new shards, the small
        files beside them). An output without a shard manifest (the trained model) gets a list of its
        files (FILE_LIST: path, size, mtime) in its place: the marker of a finished upload, and what tells
        a rerun which files changed.
        """
        uri = self.uri_for(build, name)
        if not self.is_remote:
            return uri
        import fsspec
        options = {k: v for k, v in {"key": self.key, "secret": self.secret}.items() if v}
        fs, path = fsspec.core.url_to_fs(uri, **options)
        local = self.build_dir(build) / name
        manifest = local / "manifest.json"
        if not manifest.is_file() and local.is_dir():
            manifest = local / FILE_LIST
            atomic_write_bytes(manifest, json.dumps(_file_list(local), indent=1).encode())
        remote_manifest = f"{path}/{manifest.name}"
        published = fs.cat_file(remote_manifest) if fs.exists(remote_manifest) else None
        if manifest.is_file() and published == manifest.read_bytes():
            return uri
        # What the remote marker vouches for was uploaded whole before it: those files, unchanged since
        # and of the same size remote, are not uploaded again (a resumed output adds its new shards only).
        vouched, wanted = _identities(published, manifest.name), _identities(manifest, manifest.name)
        if published is not None:
            fs.rm_file(remote_manifest)
        files = _published_files(local)
        targets = {_rooted(f"{path}/{file.relative_to(local).as_posix()}") for file in files}
        # Keyed by one spelling of each path; deleted by the name the file system gave.
        remote = {_rooted(listed): (listed, info) for listed, info in fs.find(path, detail=True).items()} \
            if fs.exists(path) else {}
        for target, (listed, _) in remote.items():
            if target not in targets:
                fs.rm_file(listed)
        for file in [*files, manifest]:
            name = file.relative_to(local).as_posix()
            target = f"{path}/{name}"
            if not file.is_file() or (name in wanted and vouched.get(name) == wanted[name]
                                      and remote.get(_rooted(target), ("", {}))[1].get("size") == file.stat().st_size):
                continue
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(file), target)
        return uri


def _published_files(local: Path) -> list[Path]:
    """The files of an output that are uploaded before its marker (manifest or file list); never a temp
    file a killed write left (the stage removes those when it runs again)."""
    return sorted(p for p in local.rglob("*") if p.is_file() and p.name not in ("manifest.json", FILE_LIST,
                                                                               OVERWRITE_SENTINEL)
                  and not any(fnmatch.fnmatch(part, TEMP_GLOB) for part in p.relative_to(local).parts))


def _identities(marker: bytes | Path | None, name: str) -> dict[str, tuple]:
    """Relative path -> identity of each file a marker lists: a manifest's shards and WebDataset tars by
    size and sha256, a file list's files by size and mtime. An unreadable marker vouches for nothing."""
    try:
        record = json.loads(marker.read_bytes() if isinstance(marker, Path) else marker or b"null")
        if name == FILE_LIST:
            return {path: (size, mtime) for path, size, mtime in record}
        twin = record.get("webdataset") or {}
        return {**{s["name"]: (s["bytes"], s["sha256"]) for s in record["shards"]},
                **{f"{twin['directory']}/{s['name']}": (s["bytes"], s["sha256"]) for s in twin.get("shards", [])}}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _file_list(local: Path) -> list[list]:
    """[relative path, size, mtime_ns] of every file to publish: unchanged files give the same bytes."""
    return [[p.relative_to(local).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in _published_files(local)]


def _option_flag(name: str, value: str) -> str:
    """A pipeline option as its flag. Beam's switches take no value: "true" or "" gives the bare switch,
    "false" its --no_ form (use_public_ips: "false" is --no_use_public_ips); anything else --name=value."""
    switch = value.strip().lower()
    if switch in ("", "true"):
        return f"--{name}"
    return f"--no_{name}" if switch == "false" else f"--{name}={value}"


def _rooted(path: str) -> str:
    """One spelling of a remote path: file systems list them with or without the leading slash."""
    return "/" + path.lstrip("/")


# The stages that run a Beam job, which `stage_options` may name (assets.stages.STAGES holds their order).
BEAM_STAGES = ("ingest", "balance", "rewrite", "caption", "export")


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long to be a path
        return False


def _mounts_volumes(pod_spec: dict) -> bool:
    """Whether the job pod's spec gives it volumes and mounts some in its first container."""
    containers = spec_value(pod_spec, "containers") or [{}]
    return bool(spec_value(pod_spec, "volumes")) and bool(spec_value(containers[0], "volume_mounts"))


class BeamRunnerResource(dg.ConfigurableResource):
    """The Beam runner, its options, and how the job is launched from the Dagster step.

    `launcher="auto"` runs DirectRunner jobs in the step's process and every
    other runner's job through Dagster Pipes in a subprocess (its logs stream
    back into the run). `k8s` launches the job in its own pod with
    dagster-k8s's Pipes client. The pipelines have no runner-specific code:
    everything a runner needs is a flag here.
    """

    runner: str = Field(default="DirectRunner", description=f"One of {', '.join(RUNNERS)}.")
    direct_num_workers: int = Field(default=1, description="DirectRunner worker processes (1 = in process).")
    options: dict[str, str] = Field(default={}, description="Extra pipeline options, e.g. {'flink_master': 'host:8081'}; "
                                                           "a switch takes 'true' (or '') or 'false' "
                                                           "({'use_public_ips': 'false'} is --no_use_public_ips).")
    stage_options: dict[str, dict[str, str]] = Field(
        default={}, description="Per-stage overrides of `options`, keyed by stage name (e.g. GPU workers for "
                                "'rewrite' and 'caption' on Dataflow).")
    launcher: str = Field(default="auto", description=f"One of {', '.join(LAUNCHERS)}.")
    k8s_image: Optional[str] = Field(default=None, description="Image of the job pod when launcher is k8s.")
    k8s_namespace: Optional[str] = Field(default=None, description="Namespace of the job pod when launcher is "
                                                                  "k8s; empty: the code location's own.")
    k8s_pod_spec: dict[str, Any] = Field(
        default={}, description="PodSpec of the job pod when launcher is k8s (camelCase or snake_case): its "
                                "`volumes` and the first container's `volumeMounts` must mount the staging dir at "
                                "the same path as the step's pod. The stage's CPU, memory and GPU requests, node "
                                "selector and tolerations are added unless it sets its own.")
    credentials: Optional[str] = Field(
        default=None, description="Path of a cloud credentials file (GOOGLE_APPLICATION_CREDENTIALS); set with EnvVar.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check()

    def check(self) -> None:
        if self.runner not in RUNNERS:
            raise misconfigured("BeamRunnerResource", "runner", f"unknown runner {self.runner!r}; use one of {list(RUNNERS)}")
        if self.launcher not in LAUNCHERS:
            raise misconfigured("BeamRunnerResource", "launcher", f"unknown launcher {self.launcher!r}; use one of {list(LAUNCHERS)}")
        if self.direct_num_workers < 1:
            raise misconfigured("BeamRunnerResource", "direct_num_workers", f"must be >= 1, got {self.direct_num_workers}")
        if self.launcher == "k8s" and not self.k8s_image:
            raise misconfigured("BeamRunnerResource", "k8s_image", "required when launcher is 'k8s'")
        if self.launcher == "k8s" and not _mounts_volumes(self.k8s_pod_spec):
            raise misconfigured("BeamRunnerResource", "k8s_pod_spec", "with launcher 'k8s' it must give the job "
                                "pod `volumes` and mount them in its first container (`volumeMounts`): the job "
                                "reads and writes the staging dir, which its own pod lacks, and the step would find "
                                "no output")
        if self.credentials and not _is_file(self.credentials):
            # Never echo the value: a secret created --from-file puts the key itself here, not its path.
            raise misconfigured("BeamRunnerResource", "credentials", "is not the path of a file (a key's contents "
                                "instead of its path? mount the secret as a file and give its path)")
        unknown = sorted(set(self.stage_options) - set(BEAM_STAGES))
        if unknown:
            raise misconfigured("BeamRunnerResource", "stage_options", f"unknown stage(s) {unknown}; the Beam "
                                f"stages are {list(BEAM_STAGES)}")
        for name in [*self.options, *(n for o in self.stage_options.values() for n in o)]:
            if name.startswith("-") or name in ("runner", "input", "output"):
                raise misconfigured("BeamRunnerResource", "options", f"{name!r}: give option names without dashes, "
                                    "and set runner/input/output through their own fields")
        # Beam's own parser exits the process on a value it refuses (a switch given a value, a number that
        # is none): parsed here, that fails the run at its first step naming the field, not inside a job.
        from pipelines.runner import beam_parser
        parser = beam_parser()
        for stage in (None, *self.stage_options):
            field = "options" if stage is None else f"stage_options[{stage!r}]"
            try:
                _, unknown = parser.parse_known_args(self._flags(stage))
            except argparse.ArgumentError as exc:
                raise misconfigured("BeamRunnerResource", field, f"Beam refuses it: {exc}") from exc
            if unknown:  # every stage refuses a flag Beam does not know: found here, not after the stages before
                raise misconfigured("BeamRunnerResource", field, f"{' '.join(unknown)}: not an option Beam knows")

    def flags(self, stage: Optional[str] = None) -> list[str]:
        """The runner flags of one stage: shared options, then that stage's overrides."""
        self.check()
        return self._flags(stage)

    def _flags(self, stage: Optional[str]) -> list[str]:
        flags = [f"--runner={self.runner}"]
        if self.runner == "DirectRunner" and self.direct_num_workers > 1:
            flags += [f"--direct_num_workers={self.direct_num_workers}", "--direct_running_mode=multi_processing"]
        options = {**self.options, **self.stage_options.get(stage or "", {})}
        return flags + [_option_flag(name, value) for name, value in sorted(options.items())]

    def effective_launcher(self) -> str:
        if self.launcher != "auto":
            return self.launcher
        return "in_process" if self.runner == "DirectRunner" else "subprocess"

    def environment(self) -> dict[str, str]:
        """Environment for a launched job: the credentials file, if any."""
        return {"GOOGLE_APPLICATION_CREDENTIALS": self.credentials} if self.credentials else {}


class LLMEngineResource(dg.ConfigurableResource):
    """The text engine that rewrites captions: backend, model, loading and serving settings, sampling.

    A field left empty keeps the stage's own default (and its demo sizing), so
    a vLLM run picks its own hardware-dependent `max_num_seqs` unless told.
    """

    engine: str = Field(default="transformers", description=f"One of {', '.join(TEXT_ENGINES)}.")
    model: str = Field(default="", description="Model directory or hub id (openai: the served model name). "
                                               "Empty: the stage's default (the demo's bundled model).")
    gguf_file: Optional[str] = Field(default=None, description="GGUF file inside `model` (transformers, vllm).")
    dtype: Optional[str] = Field(default=None, description=f"One of {', '.join(DTYPES)}; empty: auto "
                                                           "(bf16 on CUDA, fp32 on CPU).")
    temperature: Optional[float] = Field(default=None, description="Sampling temperature of the rewrites "
                                                                   "(fusion has its own: the caption run config's).")
    top_p: Optional[float] = Field(default=None, description="Nucleus sampling mass.")
    max_new_tokens: Optional[int] = Field(default=None, description="Tokens generated per rewrite at most.")
    max_num_seqs: Optional[int] = Field(default=None, description="vllm: sequences scheduled at once; "
                                                                  "empty: vLLM's hardware-dependent default.")
    gpu_memory_utilization: Optional[float] = Field(default=None, description="vllm: share of GPU memory it "
                                                                              "may use, in (0, 1].")
    tensor_parallel_size: Optional[int] = Field(default=None, description="vllm: GPUs one model is split over.")
    enable_prefix_caching: Optional[bool] = Field(
        default=None, description="transformers, vllm: compute a prompt prefix shared by many requests once.")
    base_url: Optional[str] = Field(default=None, description="OpenAI-compatible endpoint (engine openai).")
    api_key: Optional[str] = Field(default=None, description="API key of the endpoint; set with EnvVar('OPENAI_API_KEY').")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        check_engine("LLMEngineResource", self.engine, TEXT_ENGINES, self.model, self.base_url)
        if self.temperature is not None and not 0 <= self.temperature <= 5:
            raise misconfigured("LLMEngineResource", "temperature", f"must be in [0, 5], got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise misconfigured("LLMEngineResource", "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise misconfigured("LLMEngineResource", "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise misconfigured("LLMEngineResource", "dtype", f"unknown dtype {self.dtype!r}; use one of {list(DTYPES)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise misconfigured("LLMEngineResource", "gpu_memory_utilization",
                                f"must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise misconfigured("LLMEngineResource", name, f"must be >= 1, got {value}")
        # A setting the chosen backend has no use for is a mistake in the config, not something to drop quietly.
        for name, engines in ENGINE_ONLY_FIELDS.items():
            if getattr(self, name) is not None and self.engine not in engines:
                raise misconfigured("LLMEngineResource", name, f"applies to engine {' or '.join(engines)}, "
                                    f"not {self.engine!r}")

    def engine_options(self) -> dict:
        """The backend settings that are set, as the stage's engine options (its --rewrite_engine_options)."""
        names = ("max_num_seqs", "gpu_memory_utilization", "tensor_parallel_size", "enable_prefix_caching")
        options = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        # base_url may come from OPENAI_BASE_URL for every resource; only the openai backend takes it.
        return options | ({"base_url": self.base_url} if self.engine == "openai" and self.base_url else {})

    def environment(self, variable: str = "OPENAI_API_KEY") -> dict[str, str]:
        """The key as the environment variable the stage's engine reads it from."""
        return {variable: self.api_key} if self.api_key else {}


class CaptionerResource(dg.ConfigurableResource):
    """The vision-language engine that writes synthetic captions."""

    engine: str = Field(default="transformers", description=f"One of {', '.join(TEXT_ENGINES)}.")
    model: str = Field(default="", description="Model directory or hub id. Empty: only for demo-sized builds, "
                                               "whose demo flags bring a tiny model; a run of any other build "
                                               "that includes the caption step fails at its first step.")
    max_new_tokens: Optional[int] = Field(default=None, description="Tokens per synthetic caption at most. "
                                                                    "Empty: the stage's default.")
    base_url: Optional[str] = Field(default=None, description="OpenAI-compatible endpoint (engine openai).")
    api_key: Optional[str] = Field(default=None, description="API key of the endpoint; set with EnvVar('OPENAI_API_KEY').")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        check_engine("CaptionerResource", self.engine, TEXT_ENGINES, self.model, self.base_url)
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise misconfigured("CaptionerResource", "max_new_tokens", f"must be positive, got {self.max_new_tokens}")

    def environment(self) -> dict[str, str]:
        return {"OPENAI_API_KEY": self.api_key} if self.api_key else {}


def check_engine(resource: str, engine: str, known: tuple[str, ...], model: str, base_url: Optional[str]) -> None:
    """Unknown engine, a model path that does not exist, or a vLLM without vllm installed: fail naming the field."""
    if engine not in known:
        raise misconfigured(resource, "engine", f"unknown engine {engine!r}; use one of {list(known)}")
    looks_like_path = model.startswith(("/", "./", "../", "~"))
    if looks_like_path and not Path(model).expanduser().exists():
        raise misconfigured(resource, "model", f"no such model directory: {model}")
    if engine == "openai" and not base_url and not os.environ.get("OPENAI_BASE_URL"):
        raise misconfigured(resource, "base_url", "required for engine 'openai' (or set OPENAI_BASE_URL)")
    if engine == "openai" and not model:  # else the stage's default, a local folder, was the name asked for
        raise misconfigured(resource, "model", "required for engine 'openai': the name the server serves")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise misconfigured(resource, "engine", "'vllm' is not installed here: use the GPU image "
                            "(pip install -e '.[gpu]') or engine 'transformers'")


class QualityGatesResource(dg.ConfigurableResource):
    """Thresholds of the asset checks; a failing blocking check stops the data flowing downstream."""

    max_reject_ratio: float = Field(default=0.2, description="Share of a stage's input it may reject.")
    max_download_failure_ratio: float = Field(
        default=0.5, description="Share of a URL list ingest may lose to dead links (download_failed); the "
                                 "other rejects count against max_reject_ratio over the rows that downloaded.")
    max_balance_reject_ratio: float = Field(
        default=0.6, description="Share balance may reject: captions that match no metadata entry are a curation "
                                 "outcome, not broken data, so the limit is looser.")
    balance_slack: float = Field(default=0.1, description="Entries may keep up to (1 + slack) times the pairs their "
                                                           "keep probabilities promise, plus 4 standard deviations.")
    min_rewrite_share: float = Field(default=0.5, description="Share of the rows chosen for rewriting "
                                                              "(--rewrite_row_fraction) that must carry a valid rewrite.")
    min_caption_share: float = Field(default=0.5, description="Share of rows that must carry a synthetic caption.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Shares in [0, 1] and a slack >= 0, checked at the run's first step: a gate given as a percent
        (min_rewrite_share=50) failed good data after the GPU stage, and max_reject_ratio=20 passed any."""
        for name in ("max_reject_ratio", "max_download_failure_ratio", "max_balance_reject_ratio", "min_rewrite_share",
                     "min_caption_share"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise misconfigured("QualityGatesResource", name, f"a share in [0, 1], got {value}")
        if not (math.isfinite(self.balance_slack) and self.balance_slack >= 0):
            raise misconfigured("QualityGatesResource", "balance_slack", f"must be >= 0, got {self.balance_slack}")
