"""Hub models and datasets onto this machine before anything trains: listed, checked against
the free disk, fetched with progress, resumed after an interruption.

    check(repo_id, "model" | "dataset", what="--model")    -> DownloadPlan  (nothing is fetched)
    ensure(repo_id, "model" | "dataset", what, progress)   -> the local snapshot folder (minutes)

Only what the user names is fetched (`--model org/name`, `--data org/name`), into the
Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`), in huggingface_hub's own layout, so
transformers, datasets and `hf cache` see the same files.

What is fetched:

- a model: the top-level safetensors weights (the shards `model.safetensors.index.json` names
  when there is one, `model.safetensors` when there is one, else every top-level
  `*.safetensors`: Mistral's repositories also hold a `consolidated.safetensors` copy of the
  same weights), the `*.json` files, tokenizer files (`tokenizer.model`, `*.txt` vocabularies,
  `*.tiktoken`, `*.jinja` chat templates) and, with `--trust-remote-code`, the model's `*.py`.
  Never the pickles (`*.bin`, `*.pth`, `*.pt`), GGUF, ONNX or anything in a subfolder
  (`original/`, `onnx/`): transformers does not load them from the repository's root. A
  repository whose only weights are pickles is refused in one line, as a local folder is.
- a dataset: its data files (`.parquet`, `.jsonl`, `.json`, `.csv`). When some file's path
  names the train split (the words `datasets` itself looks for), only those files; else all of
  them. `datasets` then loads the train split from the local folder (localtune.data), finding
  the split by the same file names. The card (README.md) is not fetched: its YAML may name
  test files that are not downloaded, which `datasets` would then look for.

How:

- The listing (`HfApi.model_info` / `dataset_info` with `files_metadata=True`) gives each
  file's size and the commit; files already in the cache at that commit are skipped, and the
  bytes still to fetch are checked against `shutil.disk_usage` of the cache before any
  transfer (one line: how much is needed, how much is free, how to point HF_HOME elsewhere).
- Each file is fetched by huggingface_hub's `http_get` into `blobs/<etag>.incomplete` in the
  cache, a name that outlives the process: a run killed, stopped or cut off half-way resumes
  from that file's end with an HTTP Range request the next time. (huggingface_hub >= 1.x
  writes process-unique partial files and deletes them on failure, so its own
  `hf_hub_download` resumes only within one call: a short network blip, not a closed laptop.)
  The finished blob is renamed into place and `hf_hub_download` links it into the snapshot,
  as it would its own download. The library's lock (`WeakFileLock`, per blob) keeps two
  processes from appending to one partial file. hf_xet, when installed, is not used for
  these transfers: plain HTTP is what can be resumed from a partial file.
- Progress goes to a callback as a `DownloadProgress` (bytes done and in all, speed, ETA, the
  file under way), at most once every `every_s` seconds and once more at the end.
- Offline (`HF_HUB_OFFLINE=1`) nothing is fetched: a complete snapshot in the cache is used,
  and without one the error says so. With the network down, the same: the cached snapshot if
  there is a complete one, else one line on how to work offline.

Every failure a person can act on is one `UserError` line (`hub_error`): gated (accept the
licence, log in), missing or private (check the name, log in), no network (check it, or work
offline), not enough disk (free space, or move HF_HOME).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from localtune.errors import UserError
from localtune.progress import human_bytes

MODEL_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.tiktoken", "*.jinja")
"""Top-level model files training needs (weights, config, tokenizer, chat template)."""
REMOTE_CODE_PATTERNS = ("*.py",)
"""Added with --trust-remote-code: the model's own modelling code."""
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")
DATASET_METADATA = ("dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json")
"""JSON files of a dataset repository that describe it rather than hold rows."""
TRAIN_SPLIT = re.compile(r"(^|[-._ 0-9/])(train|training)([-._ 0-9/]|$)")
"""A path that names the train split, as `datasets` recognises one (its SPLIT_KEYWORDS)."""
EVERY_S = 1.0
"""Default seconds between progress reports (the worker's `download` events)."""


@dataclass
class DownloadProgress:
    """Where a download stands: what a progress bar shows."""

    repo: str
    file: str
    """The file under way (its path in the repository)."""
    bytes_done: int
    """Bytes of the files to fetch that are on disk (a resumed file's earlier part included)."""
    bytes_total: int
    """Bytes of the files to fetch (the ones not in the cache yet)."""
    bytes_per_s: float | None
    """Transfer speed since this download began; None before the first chunk."""
    eta_s: float | None

    def to_event(self) -> dict[str, Any]:
        """The fields of a `download` event (localtune.events)."""
        return {"repo": self.repo, "file": self.file, "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "bytes_per_s": None if self.bytes_per_s is None else round(self.bytes_per_s),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


Progress = Callable[[DownloadProgress], None]


@dataclass
class RemoteFile:
    name: str
    size: int


@dataclass
class DownloadPlan:
    """What `ensure` would fetch for one repository at one commit."""

    repo_id: str
    repo_type: str
    """'model' or 'dataset'."""
    what: str
    """How the user named it, for messages: '--model', '--data'."""
    commit: str
    files: list[RemoteFile]
    """Every file training needs."""
    missing: list[RemoteFile] = field(default_factory=list)
    """The ones not in the cache at this commit."""
    partial_bytes: int = 0
    """Bytes of the missing files already on disk from an interrupted download."""

    @property
    def bytes_to_fetch(self) -> int:
        return sum(f.size for f in self.missing) - self.partial_bytes

    @property
    def folder(self) -> Path:
        """The snapshot folder the files are (or will be) linked into."""
        return _storage(self.repo_id, self.repo_type) / "snapshots" / self.commit


# ---------------------------------------------------------------- errors, in one line each


def hub_error(what: str, repo_id: str, e: BaseException) -> UserError:
    """The one line a person reads for a failed hub request: gated, missing or private, no
    network; anything else names the error. `what` is how they named it: '--model', '--data'."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    kind = "dataset" if what == "--data" else "model"
    if isinstance(e, GatedRepoError):
        return UserError(f"{what} {repo_id}: the {kind} is gated; accept its licence on its hub page and log in "
                         "with `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return UserError(f"{what} {repo_id}: no such {kind} on the Hugging Face hub, or it is private (then log in "
                         "with `hf auth login`); check the name")
    if isinstance(e, OfflineModeIsEnabled):
        return not_cached_offline(what, repo_id)
    if _is_network_error(e) or isinstance(e, LocalEntryNotFoundError):
        return UserError(f"{what} {repo_id}: cannot reach the Hugging Face hub ({_endpoint()}); check the network, "
                         f"or set HF_HUB_OFFLINE=1 and use a cached or local {kind}")
    if isinstance(e, HfHubHTTPError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return UserError(f"{what} {repo_id}: the Hugging Face hub refused ({first})")
    return UserError(f"{what} {repo_id}: download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def not_cached_offline(what: str, repo_id: str) -> UserError:
    kind = "dataset" if what == "--data" else "model"
    return UserError(f"{what} {repo_id}: not (completely) in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                     f"download it once while online, or use a local {'file' if kind == 'dataset' else 'folder or .gguf file'}")


def _is_network_error(e: BaseException) -> bool:
    import httpx2

    return isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError))


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


# ---------------------------------------------------------------- which files


def _top_level(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    return [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns)]


def model_files(names: list[str], *, trust_remote_code: bool = False,
                index: dict[str, Any] | None = None) -> list[str]:
    """The files of a model repository that training needs (see the module docstring).
    `index`: model.safetensors.index.json, when the repository has one."""
    patterns = MODEL_PATTERNS + (REMOTE_CODE_PATTERNS if trust_remote_code else ())
    picked = _top_level(names, patterns)
    weights = [n for n in picked if n.endswith(".safetensors")]
    if index is not None:
        keep = set((index.get("weight_map") or {}).values())
    elif "model.safetensors" in weights:
        keep = {"model.safetensors"}
    else:
        keep = set(weights)
    return [n for n in picked if not n.endswith(".safetensors") or n in keep]


def dataset_files(names: list[str]) -> list[str]:
    """The files of a dataset repository that loading its train split needs."""
    data = [n for n in names if n.lower().endswith(DATA_SUFFIXES) and not n.startswith(".")
            and n.rsplit("/", 1)[-1] not in DATASET_METADATA]
    train = [n for n in data if TRAIN_SPLIT.search(n.lower())]
    return train or data


# ---------------------------------------------------------------- the cache


def _cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _storage(repo_id: str, repo_type: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return _cache_root() / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def _complete(folder: Path, repo_type: str) -> bool:
    """Whether a cached snapshot holds what training needs (when there is no listing to compare
    with: offline). A model: its weights (every shard its index names); a dataset: data files."""
    if not folder.is_dir():
        return False
    if repo_type == "dataset":
        return any(p.is_file() and p.name.lower().endswith(DATA_SUFFIXES) for p in folder.rglob("*"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError):
            return False
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return (folder / "config.json").is_file() and any(p.is_file() for p in folder.glob("*.safetensors"))


def cached_snapshot(repo_id: str, repo_type: str) -> Path | None:
    """The complete snapshot of the repository's main branch in the cache, or None."""
    storage = _storage(repo_id, repo_type)
    try:
        commit = (storage / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    folder = storage / "snapshots" / commit
    return folder if _complete(folder, repo_type) else None


def _free_bytes(folder: Path) -> int:
    """Free space of the disk that holds `folder` (the nearest existing parent: the cache may
    not exist yet)."""
    for p in (folder, *folder.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(Path.cwd()).free


# ---------------------------------------------------------------- planning


def check(repo_id: str, repo_type: str = "model", *, what: str = "--model",
          trust_remote_code: bool = False) -> DownloadPlan | Path:
    """List what `ensure` would fetch and check it fits on the disk; fetch nothing (but a
    sharded model's small index). Returns the plan, or the cached snapshot folder when the hub
    cannot be asked (offline, or the network down) and a complete copy is cached. Raises a
    one-line UserError for a gated, missing or private repository, no network with nothing
    cached, offline with nothing cached, no usable weights, or not enough disk."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError

    if constants.HF_HUB_OFFLINE:
        cached = cached_snapshot(repo_id, repo_type)
        if cached is None:
            raise not_cached_offline(what, repo_id)
        return cached
    api = HfApi()
    try:
        info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, files_metadata=True)
    except HFValidationError:
        raise UserError(f"{what} {repo_id!r}: not a valid Hugging Face id (expected owner/name)") from None
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line below (or the cache)
        cached = cached_snapshot(repo_id, repo_type) if _is_network_error(e) else None
        if cached is not None:
            return cached
        raise hub_error(what, repo_id, e) from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    if repo_type == "dataset":
        names = dataset_files(list(sizes))
        if not names:
            raise UserError(f"{what} {repo_id}: the dataset has no data files localtune reads "
                            f"({', '.join(DATA_SUFFIXES)}); a dataset built by a loading script is not supported")
    else:
        index = None
        if "model.safetensors.index.json" in sizes:
            index = json.loads(Path(_fetch_small(repo_id, "model.safetensors.index.json", info.sha, what)).read_text())
        names = model_files(list(sizes), trust_remote_code=trust_remote_code, index=index)
        if not any(n.endswith(".safetensors") for n in names):
            pickles = _top_level(list(sizes), PICKLE_PATTERNS)
            has = f" (it has only {pickles[0]}: a pickle, which can run code when loaded)" if pickles else ""
            raise UserError(f"{what} {repo_id}: the repository has no safetensors weights{has}; localtune loads "
                            "safetensors only: pick a repository that has them, or convert a copy you trust "
                            "into a local folder")
    plan = DownloadPlan(repo_id, repo_type, what, str(info.sha), [RemoteFile(n, sizes[n]) for n in names])
    _mark_missing(plan)
    _check_disk(plan)
    return plan


def _fetch_small(repo_id: str, filename: str, commit: str | None, what: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=commit)
    except Exception as e:  # noqa: BLE001
        raise hub_error(what, repo_id, e) from None


def _partial_path(storage: Path, etag: str) -> Path:
    return storage / "blobs" / f"{etag}.incomplete"


def _mark_missing(plan: DownloadPlan) -> None:
    """Which files are not in the snapshot yet, and how much an earlier, interrupted download
    of this repository left on disk (its `<etag>.incomplete` files)."""
    plan.missing = [f for f in plan.files if not (plan.folder / f.name).is_file()]
    blobs = _storage(plan.repo_id, plan.repo_type) / "blobs"
    ours = re.compile(r"^[0-9a-f]{40,64}\.incomplete$")  # not huggingface_hub's own <etag>.<id>.incomplete
    plan.partial_bytes = (sum(p.stat().st_size for p in blobs.iterdir() if ours.match(p.name))
                          if plan.missing and blobs.is_dir() else 0)


def _check_disk(plan: DownloadPlan) -> None:
    need = plan.bytes_to_fetch
    free = _free_bytes(_cache_root())
    if need > free:
        raise UserError(f"{plan.what} {plan.repo_id}: needs {human_bytes(need)} of disk in {_cache_root()} but only "
                        f"{human_bytes(free)} is free; free some space, or set HF_HOME to a folder on a larger disk")


# ---------------------------------------------------------------- fetching


class _Meter:
    """Counts the bytes written and reports them through `progress`, at most every `every_s`."""

    def __init__(self, plan: DownloadPlan, progress: Progress | None, every_s: float) -> None:
        self.plan, self.progress, self.every_s = plan, progress, every_s
        self.total = sum(f.size for f in plan.missing)
        self.done_before = 0  # bytes of the files finished before the current one
        self.file, self.file_bytes = "", 0
        self.moved = 0  # bytes transferred by this process: the speed's numerator
        self.start_t = time.monotonic()
        self.last_t: float | None = None

    def begin(self, name: str, already: int) -> None:
        """A file starts, `already` bytes of it on disk from an interrupted download."""
        self.file, self.file_bytes = name, already

    def at(self, file_bytes: int) -> None:
        self.moved = max(0, self.moved + file_bytes - self.file_bytes)
        self.file_bytes = file_bytes
        now = time.monotonic()
        if self.last_t is None or now - self.last_t >= self.every_s:
            self.report(now)

    def end_file(self, size: int) -> None:
        self.done_before += size
        self.file_bytes = 0

    def report(self, now: float | None = None) -> None:
        if self.progress is None:
            return
        now = time.monotonic() if now is None else now
        self.last_t = now
        done = min(self.total, self.done_before + self.file_bytes)
        elapsed = now - self.start_t
        speed = self.moved / elapsed if elapsed > 0 and self.moved > 0 else None
        eta = (self.total - done) / speed if speed else (0.0 if done >= self.total else None)
        self.progress(DownloadProgress(self.plan.repo_id, self.file, done, self.total, speed, eta))


class _CountingFile:
    """The partial file, telling the meter its size after each chunk http_get writes."""

    def __init__(self, f: Any, meter: _Meter) -> None:
        self._f, self._meter = f, meter

    def write(self, chunk: bytes) -> int:
        n = self._f.write(chunk)
        self._meter.at(self._f.tell())
        return n

    def __getattr__(self, name: str) -> Any:  # tell, seek, truncate (a server that ignores Range)
        return getattr(self._f, name)


def _fetch_file(plan: DownloadPlan, f: RemoteFile, meter: _Meter) -> None:
    """One file into the cache, resuming its partial blob (see the module docstring)."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import get_hf_file_metadata, http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(plan.repo_id, f.name, repo_type=plan.repo_type, revision=plan.commit)
    headers = build_hf_headers()
    meta = get_hf_file_metadata(url, headers=headers)
    if not meta.etag:
        raise UserError(f"{plan.what} {plan.repo_id}: the hub ({_endpoint()}) sent no ETag for {f.name}; "
                        "is HF_ENDPOINT a Hugging Face hub?")
    storage = _storage(plan.repo_id, plan.repo_type)
    blob = storage / "blobs" / meta.etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = _cache_root() / ".locks" / storage.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.is_file():
            partial = _partial_path(storage, meta.etag)
            location = meta.location or url
            if urlsplit(location).netloc != urlsplit(url).netloc:
                headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
            with open(partial, "ab") as out:
                meter.begin(f.name, out.tell())
                http_get(location, _CountingFile(out, meter), resume_size=out.tell(), headers=headers,
                         expected_size=meta.size, displayed_filename=f.name)
            os.replace(partial, blob)
    # the blob is in place: this links it into the snapshot (a HEAD request, no transfer)
    hf_hub_download(plan.repo_id, f.name, repo_type=plan.repo_type, revision=plan.commit)


class Stopped(Exception):
    """Raised by a progress callback to end a download early (a stop request): the partial file
    stays, and the next download resumes from it."""


def fetch(plan: DownloadPlan, progress: Progress | None = None, *, every_s: float = EVERY_S) -> Path:
    """Fetch the plan's missing files (minutes to hours for a large model); return the
    snapshot folder. `progress` gets a report at most every `every_s` seconds and one at the end."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # our own report says what happens; tqdm's bars on stderr would only add noise
    meter = _Meter(plan, progress, every_s)
    for f in plan.missing:
        meter.begin(f.name, 0)
        try:
            _fetch_file(plan, f, meter)
        except (UserError, Stopped):
            raise
        except OSError as e:
            if getattr(e, "errno", None) == 28:  # ENOSPC
                raise UserError(f"{plan.what} {plan.repo_id}: the disk filled up while downloading {f.name} into "
                                f"{_cache_root()}; free some space (the download resumes where it stopped), or set "
                                "HF_HOME to a folder on a larger disk") from None
            raise hub_error(plan.what, plan.repo_id, e) from None
        except Exception as e:  # noqa: BLE001 - network and hub errors: one line; the partial file stays
            raise hub_error(plan.what, plan.repo_id, e) from None
        meter.end_file(f.size)
    if plan.missing:
        meter.report()
    # the listing was of the main branch: record its commit as the cache's layout does (refs/main),
    # so that offline, or with the network down, this snapshot is found
    ref = _storage(plan.repo_id, plan.repo_type) / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(plan.commit, encoding="utf-8")
    return plan.folder


def ensure(repo_id: str, repo_type: str = "model", *, what: str = "--model", trust_remote_code: bool = False,
           progress: Progress | None = None, every_s: float = EVERY_S) -> Path:
    """The repository's snapshot folder with every file training needs, fetched first when
    some are missing (minutes to hours for a large model: see `fetch`)."""
    plan = check(repo_id, repo_type, what=what, trust_remote_code=trust_remote_code)
    if isinstance(plan, Path):
        return plan
    return fetch(plan, progress, every_s=every_s)
