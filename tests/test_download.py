"""Hub models and datasets downloaded with progress (localtune.download), against a stand-in for
the Hugging Face hub on 127.0.0.1, never the real one.

The stand-in (`StandInHub`, an http.server in a thread) answers the requests huggingface_hub
makes on these paths: `/api/models/{repo}` and `/api/datasets/{repo}` (the listing with sizes
and the commit), HEAD and GET `/{repo}/resolve/{revision}/{file}` and
`/datasets/{repo}/resolve/...` (X-Repo-Commit, ETag, Content-Length, Range), and errors with
the X-Error-Code that huggingface_hub turns into GatedRepoError / RepositoryNotFoundError. It
serves the built-in model's real files (538 MB of float32 safetensors), a tiny model with the
built-in tokenizer for the worker run, and a small dataset. It can cut a transfer after N bytes
once, or stall there until the client is killed, and throttle its speed.

Every test points huggingface_hub at the stand-in (its constants, read at import, and HF_ENDPOINT
for subprocesses) and at a Hugging Face cache in a tmp folder; a look-up of any host other than
the loopback address fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path

import pytest

from localtune.errors import UserError
from tests.helpers import one_line_error, run

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: what a client writes at a time
MODEL = "stand-in/smollm2"
TINY = "stand-in/tiny-chat"
DATASET = "stand-in/demo-data"
GATED = "stand-in/gated"


class StandInHub:
    """A Hugging Face hub on 127.0.0.1 that serves local files (see the module docstring)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, Path]] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, Range header) of every request."""
        self.cut_after: dict[str, int] = {}
        """file name -> bytes after which the next GET of it is cut (once)."""
        self.stall_after: dict[str, int] = {}
        """file name -> bytes after which the next GET of it stalls until `release` is set (once)."""
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.bytes_per_s: float | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def fail(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                hub.requests.append((self.command, path, self.headers.get("Range")))
                m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if m:
                    return self.listing("dataset" if m[1] == "datasets" else "model", m[2], body)
                m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self.file("dataset" if m[1] else "model", m[2], m[4], body)
                self.fail(404, "RepoNotFound")

            def repo(self, repo_type: str, repo_id: str) -> dict[str, Path] | None:
                if repo_id in hub.gated:
                    self.fail(401, "GatedRepo")
                    return None
                files = hub.repos.get((repo_type, repo_id))
                if files is None:
                    self.fail(401, "RepoNotFound")  # the hub answers a missing or private repo alike
                return files

            def listing(self, repo_type: str, repo_id: str, body: bool) -> None:
                files = self.repo(repo_type, repo_id)
                if files is None:
                    return
                data = json.dumps({"id": repo_id, "sha": COMMIT, "siblings": [
                    {"rfilename": name, "size": p.stat().st_size, "blobId": etag(repo_id, name)[:40]}
                    for name, p in files.items()]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def file(self, repo_type: str, repo_id: str, name: str, body: bool) -> None:
                files = self.repo(repo_type, repo_id)
                if files is None:
                    return
                if name not in files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = files[name]
                size = path.stat().st_size
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag(repo_id, name)}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(size - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.end_headers()
                if not body:
                    return
                cut = hub.cut_after.pop(name, None) if not start else None
                stall = hub.stall_after.pop(name, None) if not start else None
                sent, t0 = start, time.monotonic()
                with open(path, "rb") as f:
                    f.seek(start)
                    while sent < size:
                        limit = cut if cut is not None else stall
                        block = f.read(min(1 << 20, size - sent, (limit - sent) if limit is not None else size))
                        try:
                            self.wfile.write(block)
                        except OSError:
                            return  # the client went away
                        sent += len(block)
                        if hub.bytes_per_s:
                            time.sleep(max(0.0, (sent - start) / hub.bytes_per_s - (time.monotonic() - t0)))
                        if sent == cut:
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if sent == stall:
                            self.wfile.flush()
                            hub.stalled.set()
                            hub.release.wait(60)
                            self.close_connection = True
                            return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def ranges(self, name: str) -> list[str]:
        return [r for (m, p, r) in self.requests if m == "GET" and p.endswith("/" + name) and r]

    def gets(self, name: str) -> int:
        return sum(1 for (m, p, _) in self.requests if m == "GET" and p.endswith("/" + name))

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def etag(repo_id: str, name: str) -> str:
    return hashlib.sha256(f"{repo_id}/{name}".encode()).hexdigest()


def model_repo(folder: Path, extra: Path) -> dict[str, Path]:
    """A model folder's files as a hub repository, with files training must not fetch beside them."""
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.name != "localtune-source.json"}
    files["pytorch_model.bin"] = extra / "pytorch_model.bin"
    files["onnx/model.onnx"] = extra / "model.onnx"
    return files


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builtin_model_dir: Path):
    """The stand-in, serving the built-in model, a tiny one and a dataset; huggingface_hub
    pointed at it and at a tmp cache; other hosts refused."""
    from huggingface_hub import constants

    from localtune.demo import demo_dataset_path

    server = StandInHub()
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "pytorch_model.bin").write_bytes(b"a pickle" * 100)
    (extra / "model.onnx").write_bytes(b"onnx" * 100)
    rows = demo_dataset_path().read_text(encoding="utf-8").splitlines()
    (extra / "train.jsonl").write_text("\n".join(rows[:30]) + "\n", encoding="utf-8")
    (extra / "test.jsonl").write_text("\n".join(rows[30:40]) + "\n", encoding="utf-8")
    server.repos[("model", MODEL)] = model_repo(builtin_model_dir, extra)
    server.repos[("dataset", DATASET)] = {"data/train-00000-of-00001.jsonl": extra / "train.jsonl",
                                          "data/test-00000-of-00001.jsonl": extra / "test.jsonl"}
    server.gated.add(GATED)

    hf_home = tmp_path / "hf"
    cache = hf_home / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for k, v in {"HF_ENDPOINT": server.url, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(cache),
                 "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(k, v)

    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            looked_up.append(str(host))
            raise socket.gaierror(f"test: no network beyond the stand-in hub ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    yield server
    server.close()
    assert not looked_up, f"a test tried to reach {looked_up}"


def cache_files(kind: str = "models", repo: str = MODEL) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"{kind}--{repo.replace('/', '--')}"


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


# ---------------------------------------------------------------- the module


def test_model_downloads_with_progress_then_loads(hub: StandInHub, builtin_model_dir: Path) -> None:
    """The built-in model's files come down with monotone progress ending at the total; the
    pickle and the ONNX file stay on the hub; the folder loads; offline, the cache answers."""
    from huggingface_hub import constants
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from localtune.download import check, ensure

    plan = check(MODEL)
    weights = (builtin_model_dir / "model.safetensors").stat().st_size
    assert {f.name for f in plan.files} == {"config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    reports = []
    folder = ensure(MODEL, progress=reports.append, every_s=0)
    assert folder == plan.folder
    done = [r.bytes_done for r in reports]
    assert done == sorted(done) and len(reports) >= weights // CHUNK
    assert reports[-1].bytes_done == reports[-1].bytes_total == sum(f.size for f in plan.files)
    assert reports[-1].eta_s == 0 and reports[-1].bytes_per_s > 0
    for f in plan.files:
        assert same_bytes(folder / f.name, builtin_model_dir / f.name), f.name
    assert hub.gets("pytorch_model.bin") == hub.gets("model.onnx") == 0
    assert hub.gets("model.safetensors") == 1
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert len(AutoTokenizer.from_pretrained(folder)) == 49152
    with safe_open(folder / "model.safetensors", "pt") as st:
        assert "model.embed_tokens.weight" in st.keys()

    hub.requests.clear()
    assert ensure(MODEL, progress=reports.append) == folder  # all cached: the listing only
    assert [p for (_, p, _) in hub.requests] == [f"/api/models/{MODEL}"]
    constants.HF_HUB_OFFLINE = True
    assert ensure(MODEL) == folder and len(hub.requests) == 1


def test_transfer_cut_half_way_resumes_with_a_range_request(hub: StandInHub, builtin_model_dir: Path) -> None:
    """The server closes the connection half-way once; huggingface_hub's http_get asks for the
    rest from there (Range: bytes=N-), and the file is whole."""
    from localtune.download import ensure

    size = (builtin_model_dir / "model.safetensors").stat().st_size
    n = size // 2 // CHUNK * CHUNK
    hub.cut_after["model.safetensors"] = n
    folder = ensure(MODEL)
    assert hub.ranges("model.safetensors") == [f"bytes={n}-"]
    assert same_bytes(folder / "model.safetensors", builtin_model_dir / "model.safetensors")


def test_killed_download_resumes_in_the_next_run(hub: StandInHub, builtin_model_dir: Path) -> None:
    """A download killed half-way (the process gone, as with a closed laptop or kill -9) leaves
    its partial file; the next run fetches only the rest, and the file is whole."""
    from localtune.download import check, ensure

    size = (builtin_model_dir / "model.safetensors").stat().st_size
    n = size // 2 // CHUNK * CHUNK
    hub.stall_after["model.safetensors"] = n
    proc = subprocess.Popen([sys.executable, "-c", f"from localtune.download import ensure; ensure({MODEL!r})"],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert hub.stalled.wait(60), "the first download never reached the stall"
        partial = cache_files() / "blobs" / f"{etag(MODEL, 'model.safetensors')}.incomplete"
        deadline = time.time() + 30
        while not (partial.is_file() and partial.stat().st_size == n) and time.time() < deadline:
            time.sleep(0.05)
        assert partial.stat().st_size == n
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        hub.release.set()
    plan = check(MODEL)
    assert plan.partial_bytes == n and plan.bytes_to_fetch == sum(f.size for f in plan.missing) - n
    reports = []
    folder = ensure(MODEL, progress=reports.append, every_s=0)
    assert hub.ranges("model.safetensors") == [f"bytes={n}-"]
    assert same_bytes(folder / "model.safetensors", builtin_model_dir / "model.safetensors")
    assert not partial.exists()
    assert reports[-1].bytes_done == reports[-1].bytes_total


def test_not_enough_disk_is_one_line_and_nothing_is_fetched(hub: StandInHub, monkeypatch, capsys) -> None:
    """`localtune train` checks the free space against the files still to fetch before writing a
    run: one line saying how much is needed and free, and where to go instead."""
    from localtune import download
    from localtune.paths import home

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**8, 10**8))
    rc, out, err = run(capsys, "train", "--model", MODEL, "--headless")
    line = one_line_error(err)
    assert rc == 1
    assert "--model stand-in/smollm2: needs 538." in line and "only 100.0 MB is free" in line
    assert "set HF_HOME to a folder on a larger disk" in line
    assert not (home() / "runs").exists() or not any((home() / "runs").iterdir())
    assert hub.gets("model.safetensors") == 0
    assert not list(cache_files().rglob("*.safetensors")) and not list(cache_files().rglob("*.incomplete"))


@pytest.mark.parametrize("repo, expected", [
    (GATED, "--model stand-in/gated: the model is gated; accept its licence on its hub page and log in with "
            "`hf auth login`"),
    ("stand-in/nothing", "--model stand-in/nothing: no such model on the Hugging Face hub, or it is private "
                         "(then log in with `hf auth login`); check the name"),
])
def test_gated_and_missing_are_one_line(hub: StandInHub, capsys, repo: str, expected: str) -> None:
    from localtune.download import check

    rc, out, err = run(capsys, "train", "--model", repo, "--headless")
    assert rc == 1 and one_line_error(err) == f"localtune: error: {expected}"
    with pytest.raises(UserError) as e:  # the module says the same where the listing fails
        check(repo)
    assert str(e.value) == expected


def test_no_network_is_one_line(hub: StandInHub, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    from localtune.download import check

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    expected = (f"--model {MODEL}: cannot reach the Hugging Face hub ({closed}); check the network, or set "
                "HF_HUB_OFFLINE=1 and use a cached or local model")
    rc, out, err = run(capsys, "train", "--model", MODEL, "--headless")
    assert rc == 1 and one_line_error(err) == f"localtune: error: {expected}"
    with pytest.raises(UserError) as e:
        check(MODEL)
    assert str(e.value) == expected


def test_offline_and_not_cached_is_one_line(hub: StandInHub) -> None:
    from huggingface_hub import constants

    from localtune.download import ensure

    constants.HF_HUB_OFFLINE = True
    with pytest.raises(UserError, match=r"^--data stand-in/demo-data: not \(completely\) in the local Hugging Face "
                                        r"cache and HF_HUB_OFFLINE is set; download it once while online"):
        ensure(DATASET, "dataset", what="--data")
    assert hub.requests == []


def test_hub_dataset_downloads_its_train_files_then_loads(hub: StandInHub) -> None:
    """`--data org/name`: the train split's files come from the stand-in (the test split's do
    not), and the rows are read from the cache."""
    from localtune.data import fetch_hub_dataset, load_data

    reports = []
    fetch_hub_dataset(DATASET, reports.append)
    assert reports[-1].bytes_done == reports[-1].bytes_total == (hub.repos[("dataset", DATASET)]
                                                               ["data/train-00000-of-00001.jsonl"].stat().st_size)
    loaded = load_data(DATASET)
    assert len(loaded.examples) == 30
    assert hub.gets("train-00000-of-00001.jsonl") == 1 and hub.gets("test-00000-of-00001.jsonl") == 0


def test_the_new_run_screen_shows_a_hub_datasets_download(hub: StandInHub) -> None:
    """Typed into the New run screen's data field, a hub dataset's files come in with a progress
    line in place of the data summary (held half-way by the stand-in to read it), then its rows
    are checked as a file's are."""
    import asyncio

    from tests.test_tui_new_run import drive, settle_all, shown

    # huggingface_hub writes what it receives CHUNK bytes at a time: a file of more than one
    # chunk (the 30 rows over and over), held after the first, shows a share of it
    name, big = "data/train-00000-of-00001.jsonl", "stand-in/big-data"
    rows = hub.repos[("dataset", DATASET)][name].read_text(encoding="utf-8")
    copies = CHUNK * 6 // 5 // len(rows.encode()) + 1
    path = hub.repos[("dataset", DATASET)][name].parent / "big-train.jsonl"
    path.write_text(rows * copies, encoding="utf-8")
    hub.repos[("dataset", big)] = {name: path}
    size = path.stat().st_size
    hub.stall_after[name] = CHUNK

    async def test(app, pilot) -> None:
        field = app.screen.query_one("#data-input")
        field.focus()
        field.value = big
        await pilot.press("enter")
        assert await asyncio.to_thread(hub.stalled.wait, 30), "the download never reached the stall"
        for _ in range(100):
            await pilot.pause(0.05)
            if shown(app, "#data-summary").startswith("downloading"):
                break
        line = shown(app, "#data-summary")
        assert line.startswith(f"downloading {big}") and f"{100 * CHUNK / size:3.0f}%" in line, line
        assert "train-00000-of-00001.jsonl" in line
        hub.release.set()
        await settle_all(pilot)
        assert f"Rows {30 * copies}: {30 * copies} valid" in shown(app, "#data-summary")
        assert hub.ranges(name) == [f"bytes={CHUNK}-"]  # the rest, not the whole file again

    drive(test)


# ---------------------------------------------------------------- the worker and the views


def hub_run(hub: StandInHub, tmp_path: Path, run_id: str):
    """A run of the stand-in hub's TINY model on its dataset's rows (2 steps, as `localtune
    train` writes it), and the worker's command line and environment for it."""
    from localtune.models import resolve_model
    from localtune.plan import make_plan
    from localtune.runs import create_run
    from tests.conftest import TINY_RUN_KNOBS
    from tests.test_worker import _cpu_hardware

    data = tmp_path / "train.jsonl"
    data.write_text(hub.repos[("dataset", DATASET)]["data/train-00000-of-00001.jsonl"].read_text(encoding="utf-8"))
    plan = make_plan(_cpu_hardware(), resolve_model(TINY), profile="cpu", pinned={**TINY_RUN_KNOBS, "max_steps": 2})
    run_dir = create_run({"run": {"model": TINY, "data": str(data)}, "knobs": plan.knobs.to_dict()},
                         plan.to_dict(), run_id)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return run_dir, [sys.executable, "-m", "localtune.worker", str(run_dir.path)], env


def test_worker_downloads_with_events_and_headless_shows_them(hub: StandInHub, tiny_chat_model_dir: Path,
                                                              tmp_path: Path) -> None:
    """A run of a hub model: the worker downloads it before training, writing `download` events
    (about once a second, the last at the total, exactly the documented fields), then trains;
    the headless view prints the download's lines."""
    from localtune.events import EVENT_FIELDS, read_events
    from localtune.headless import follow, live_view
    from localtune.progress import RunProgress

    hub.repos[("model", TINY)] = {p.name: p for p in tiny_chat_model_dir.iterdir() if p.is_file()}
    hub.bytes_per_s = 6e6  # ~2.5 s for the tiny model's 13 MB: more than one progress event
    run_dir, cmd, env = hub_run(hub, tmp_path, "hub-run")
    with open(run_dir.log_path, "ab") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert rc == 0, run_dir.log_path.read_text()[-3000:]
    events = read_events(run_dir.events_path)
    downloads = [e for e in events if e["kind"] == "download"]
    assert len(downloads) >= 2
    for e in downloads:
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS["download"]), e
        assert e["repo"] == TINY
    assert [e["bytes_done"] for e in downloads] == sorted(e["bytes_done"] for e in downloads)
    # resolve_model fetched config.json and the tokenizer's files to plan the run; the worker the rest
    planned = ("config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja")
    total = sum(p.stat().st_size for name, p in hub.repos[("model", TINY)].items() if name not in planned)
    assert downloads[-1]["bytes_done"] == downloads[-1]["bytes_total"] == total
    assert all(b["t"] - a["t"] >= 0.9 for a, b in zip(downloads, downloads[1:-1])), "about once a second"
    kinds = [e["kind"] for e in events]
    assert kinds.index("started") > kinds.index("download") and kinds[-1] == "finished"

    out = StringIO()
    follow(run_dir, out=out, worker_alive=lambda: False)
    text = out.getvalue()
    assert f"downloading {TINY}: {total / 1e6:.1f} MB to fetch" in text
    assert f"downloaded {TINY}: {total / 1e6:.1f} MB" in text

    # on a terminal: a bar, and the bytes, speed and ETA under it
    from rich.console import Console

    p = RunProgress()
    p.apply(downloads[0])
    console = Console(file=StringIO(), width=100, force_terminal=True, color_system=None)
    console.print(live_view(p))
    shown = console.file.getvalue()
    assert "━" in shown and f"downloading {TINY}" in shown and "/s" in shown and "eta" in shown


def test_stop_while_downloading_keeps_the_partial_file_and_resume_finishes(hub: StandInHub, tiny_chat_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """`localtune stop` (SIGTERM) during the model's download: the worker ends within about a
    second as `stopped` at step 0, the partial file stays in the cache, and the next start
    resumes the transfer with a Range request and trains to the end."""
    import signal
    import time

    from localtune.events import read_events

    # huggingface_hub writes 10 MiB at a time and a stop is seen at a progress report: a model of
    # ~50 MB (hidden 256, the real tokenizer) at 20 MB/s gives a stop time to land half-way
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide-tiny"
    wide.mkdir()
    for f in tiny_chat_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, wide / f.name)
    tok = AutoTokenizer.from_pretrained(wide)
    config = LlamaConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=len(tok), tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(wide, safe_serialization=True)
    hub.repos[("model", TINY)] = {p.name: p for p in wide.iterdir() if p.is_file()}
    hub.bytes_per_s = 20e6
    run_dir, cmd, env = hub_run(hub, tmp_path, "hub-stop")
    with open(run_dir.log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not [e for e in read_events(run_dir.events_path) if e["kind"] == "download" and e["bytes_done"] > 0]:
        assert proc.poll() is None and time.monotonic() < deadline, run_dir.log_path.read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert proc.wait(timeout=60) == 0, run_dir.log_path.read_text()[-3000:]
    assert time.monotonic() - stopped_at < 5
    status = run_dir.read_status()
    assert status["state"] == "stopped" and status["step"] == 0 and status["pid"] is None
    assert [e for e in read_events(run_dir.events_path) if e["kind"] == "stopped"][-1]["checkpoint"] is None
    partial = list(cache_files(repo=TINY).glob("blobs/*.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    kept = partial[0].stat().st_size
    name = [n for n in hub.repos[("model", TINY)] if n.endswith(".safetensors")][0]

    hub.bytes_per_s = None
    with open(run_dir.log_path, "ab") as log:
        assert subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300).returncode == 0
    assert run_dir.read_status()["state"] == "completed", run_dir.log_path.read_text()[-3000:]
    assert hub.ranges(name) == [f"bytes={kept}-"]
    assert not list(cache_files(repo=TINY).glob("blobs/*.incomplete"))
