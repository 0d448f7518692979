"""Hub sources, offline: a huggingface_hub cache laid out by hand, and the hub's failures made to happen.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: in-process tests set its constants,
the one CLI test sets the environment of a fresh process (and checks that a token never reaches the output).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_recipe
from fluxrecipe.errors import SourceError
from fluxrecipe.families import flux1

REPO = "org/flux-mini"
OLD = "1" * 40  # commit of tag v1.0: schnell-like
NEW = "2" * 40  # commit of main: krea-like
SECRET = "hf_secret-value-9c1d"


def lay_out_cache(cache: Path, repo: str, commits: dict[str, Path], refs: dict[str, str]) -> Path:
    """The layout huggingface_hub writes: blobs named by content hash, snapshots/COMMIT/transformer/... as
    links to them, refs/NAME holding a commit."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    for commit, model in commits.items():
        for file in sorted(p for p in model.rglob("*") if p.is_file()):
            data = file.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = root / "snapshots" / commit / "transformer" / file.relative_to(model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory, schnell, krea) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    lay_out_cache(cache, REPO, {OLD: schnell, NEW: krea}, {"main": NEW, "v1.0": OLD})
    return cache


@pytest.fixture
def offline(monkeypatch, cache) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def open_hub(text: str | None = None, download: bool = True, **spec):
    from fluxrecipe.recipe import SourceSpec
    from fluxrecipe.sources import open_source

    return open_source(SourceSpec(name="a", text=text, **spec), download)


# --- resolution from the cache -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, spec, commit, revision",
    [
        (REPO, {}, NEW, "main"),
        (f"{REPO}@v1.0", {}, OLD, "v1.0"),
        (f"{REPO}@{OLD}", {}, OLD, OLD),
        (None, {"repo": REPO, "revision": "v1.0"}, OLD, "v1.0"),
        (None, {"repo": REPO, "subfolder": "transformer"}, NEW, "main"),
    ],
    ids=["main", "tag", "commit", "mapping", "subfolder"],
)
def test_hub_source_resolves_from_the_cache(offline, text, spec, commit, revision):
    checkpoint = open_hub(text, **spec)
    assert Path(checkpoint.folder) == offline / f"models--org--flux-mini/snapshots/{commit}/transformer"
    assert checkpoint.origin == {"repo": REPO, "revision": revision, "commit": commit, "subfolder": "transformer"}
    guidance = any("guidance" in k for k in checkpoint.tensors)
    assert guidance == (commit == NEW)  # the tag's files, not main's


def test_uncached_repo(offline):
    with pytest.raises(SourceError) as e:
        open_hub("org/absent")
    msg = str(e.value)
    assert "source 'a': hub repo 'org/absent' is not in the local cache" in msg and str(offline) in msg
    assert "HF_HUB_OFFLINE is set: unset it" in msg and "`hf download org/absent --include 'transformer/*'`" in msg and "HF_HUB_CACHE" in msg


def test_uncached_revision(offline):
    with pytest.raises(SourceError) as e:
        open_hub(f"{REPO}@v9")
    assert f"hub repo '{REPO}' at revision 'v9' is not in the local cache" in str(e.value)
    assert f"`hf download {REPO} --revision v9 --include 'transformer/*'`" in str(e.value)


# --- failures of the hub itself (the real exception classes, raised where huggingface_hub raises them) -----


def httpx():
    try:
        import httpx2 as module
    except ImportError:  # huggingface_hub 1.x
        import httpx as module
    return module


def http_error(cls, status: int, text: str):
    request = httpx().Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(f"{status} Client Error. {text}", response=httpx().Response(status, request=request))


def hub_raises(monkeypatch, error: Exception, offline: bool = False) -> str:
    """Every huggingface_hub call of fluxrecipe raises `error`; returns fluxrecipe's message."""
    from huggingface_hub import constants

    from fluxrecipe import hub

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))])  # the hub's name resolves
    monkeypatch.setattr(hub, "hf_hub_download", fail)
    monkeypatch.setattr(hub, "snapshot_download", fail)
    with pytest.raises(SourceError) as e:
        open_hub(REPO)
    return str(e.value)


def test_gated_repo_without_a_token(monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    msg = hub_raises(monkeypatch, http_error(GatedRepoError, 403, "Cannot access gated repo"))
    assert f"hub repo '{REPO}' is gated" in msg and f"accept its licence at https://huggingface.co/{REPO}" in msg
    assert "`hf auth login`" in msg and "HF_TOKEN" in msg


def test_repo_not_found(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    msg = hub_raises(monkeypatch, http_error(RepositoryNotFoundError, 404, "Repository Not Found"))
    assert f"hub repo '{REPO}' was not found" in msg and "check the name" in msg and "`hf auth login`" in msg


def test_revision_not_found(monkeypatch):
    from huggingface_hub.errors import RevisionNotFoundError

    msg = hub_raises(monkeypatch, http_error(RevisionNotFoundError, 404, "Revision Not Found"))
    assert f"hub repo '{REPO}': no such revision" in msg


def test_no_network_and_nothing_cached(monkeypatch, cache):
    """Not offline by choice: the hub cannot be reached, and huggingface_hub finds nothing in the cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    msg = hub_raises(monkeypatch, LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub"))
    assert f"hub repo '{REPO}' is not in the local cache" in msg and "the hub cannot be reached: check the network" in msg
    assert f"`hf download {REPO} --include 'transformer/*'`" in msg


def test_a_server_error_is_not_called_unreachable(monkeypatch):
    """huggingface_hub reports a 500 as 'nothing cached', caused by the HTTP error: the hub was reached."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    error = LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")
    error.__cause__ = http_error(HfHubHTTPError, 500, "Internal Server Error")
    msg = hub_raises(monkeypatch, error)
    assert f"hub repo '{REPO}': the hub answered HTTP 500 (a server error on its side: try again later)" in msg
    assert "cannot be reached" not in msg


def test_a_full_disk_is_not_a_hub_error(monkeypatch):
    import errno

    msg = hub_raises(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert "downloading into the hub cache" in msg and "No space left on device" in msg and "the hub answered" not in msg


@pytest.fixture
def unreachable(monkeypatch, cache):
    """Not offline by choice, but no network: the hub's name does not resolve."""
    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_no_network_uses_the_cache_without_retrying(unreachable, caplog):
    """huggingface_hub would retry each request for about 25 s (printing each retry twice) before it falls
    back to the cache: without a resolvable hub, the cache is used at once, and no request is made."""
    checkpoint = open_hub(f"{REPO}@v1.0")
    assert checkpoint.origin["commit"] == OLD
    with pytest.raises(SourceError, match="is not in the local cache .* and the hub cannot be reached"):
        open_hub("org/absent")
    assert not any("Retrying" in r.getMessage() for r in caplog.records)


def test_proxy_error(monkeypatch):
    msg = hub_raises(monkeypatch, httpx().ProxyError("407 Proxy Authentication Required"))
    assert f"hub repo '{REPO}': cannot reach the hub (ProxyError" in msg and "proxy settings" in msg


# --- a real run: the environment huggingface_hub reads, provenance, and no token in the output -------------


def test_cli_merges_from_the_cache_and_keeps_no_token(tmp_path, cache, krea):
    folder = tmp_path / "recipes"
    write_recipe(folder, "hubmix", f"sources: {{a: '{REPO}@v1.0', b: '{krea}'}}\nbase: a\nrules: [{{match: '.*', op: 'lerp:0.5'}}]\n")
    run_dir = tmp_path / "run"  # no output=: the model goes to <run dir>/transformer, beside Hydra's .hydra/
    env = {
        "FLUXRECIPE_RECIPE_PATH": str(folder),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": SECRET,
        "FLUXRECIPE_CANARY": "canary-value-55e1",
    }
    done = run_cli(["recipe=hubmix", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    out = run_dir / "transformer"
    provenance = json.loads((out / "fluxrecipe.json").read_text())
    assert provenance["sources"]["a"] == {"spec": f"{REPO}@v1.0", "repo": REPO, "revision": "v1.0", "commit": OLD, "subfolder": "transformer"}
    pinned = yaml.safe_load((out / "recipe.yaml").read_text())["sources"]["a"]
    assert pinned == {"repo": REPO, "revision": OLD, "subfolder": "transformer"}  # replays the exact files
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 8  # the model, its side files, Hydra's .hydra/*.yaml and the log
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data and b"canary-value-55e1" not in data, f"{p} holds an environment value"
    assert SECRET not in done.stdout + done.stderr



# --- the preview pipeline: through the same hub access ----------------------------------------------------


def test_a_preview_pipeline_goes_through_the_hub_access_of_sources(unreachable, cache, pipeline_files, monkeypatch, caplog):
    """Its config files came through a second path to the hub, without the reachability check: without a
    network, huggingface_hub retried every request for ~25 s, printing each retry twice. Now: the cache at
    once, and a repo that is not there is one line that says what to do."""
    from conftest import TINY
    from fluxrecipe import hub
    from fluxrecipe.sweep import previews as preview

    root = cache / "models--org--tiny-pipeline"
    for file in sorted(p for p in pipeline_files.rglob("*") if p.is_file()):
        link = root / "snapshots" / NEW / file.relative_to(pipeline_files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_bytes(file.read_bytes())
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(NEW)
    asked = []
    real = hub.hf_hub_download
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: asked.append(k["local_files_only"]) or real(*a, **k))
    model = {"joint_attention_dim": TINY["joint_attention_dim"], "pooled_projection_dim": TINY["pooled_projection_dim"], "in_channels": TINY["in_channels"]}

    def settings(pipeline: str) -> preview.PreviewSettings:
        kind = flux1.FAMILY.preview({"guidance_embeds": False})
        return preview.PreviewSettings(pipeline, ("a cat",), (0,), 2, None, 32, 32, "none", flux1.FAMILY.class_name, kind)

    assert preview.pipeline_problems(settings("org/tiny-pipeline"), model, fetch=False) == []
    problems = preview.pipeline_problems(settings("org/absent"), model, fetch=False)
    assert asked and all(asked)  # every file from the cache alone
    assert len(problems) == 1 and problems[0].startswith("preview.pipeline=org/absent: hub repo 'org/absent' is not in the local cache")
    assert "the hub cannot be reached" in problems[0] and "or give a local pipeline folder" in problems[0]
    assert not any("Retrying" in r.getMessage() for r in caplog.records)


# --- a dry run reads the hub's headers, not its weights ------------------------------------------------------


class RangeHub:
    """The hub as fluxrecipe sees it online, faked in-process: JSON files go into a cache snapshot, the file
    listing answers, and weight files are served by byte range only (`ranges=False`: the whole file, as a
    server that ignores ranges). `served` counts the bytes sent per file."""

    def __init__(self, monkeypatch, cache: Path, model: Path, ranges: bool = True):
        from huggingface_hub import constants

        from fluxrecipe import hub

        self.cache, self.model, self.ranges = cache, model, ranges
        self.snapshot = cache / "models--org--flux-mini" / "snapshots" / NEW
        self.served: dict[str, int] = {}
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))])
        monkeypatch.setattr(hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(hub, "HfApi", lambda: self)
        monkeypatch.setattr(hub, "get_session", lambda: self)

    def hf_hub_download(self, repo, file, subfolder=None, revision=None, local_files_only=False):
        path = self.snapshot / (subfolder or "") / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((self.model / file).read_bytes())
        return str(path)

    def snapshot_download(self, repo, revision=None, allow_patterns=(), local_files_only=False):
        assert not local_files_only and allow_patterns == ["transformer/*.json"], allow_patterns  # no weights
        for file in self.model.glob("*.json"):
            self.hf_hub_download(repo, file.name, "transformer")
        return str(self.snapshot)

    def list_repo_files(self, repo, revision=None):
        assert revision == NEW
        return ["README.md", "transformer/config.json"] + [f"transformer/{p.name}" for p in sorted(self.model.glob("*.safetensors"))]

    @contextlib.contextmanager
    def stream(self, method, url, headers, follow_redirects, timeout):
        httpx = pytest.importorskip("httpx2") if importlib.util.find_spec("httpx2") else pytest.importorskip("httpx")
        name = url.rsplit("/", 1)[1]
        assert f"/resolve/{NEW}/transformer/{name}" in url
        data = (self.model / name).read_bytes()
        begin, end = (int(x) for x in headers["range"].removeprefix("bytes=").split("-"))
        body = data[begin : end + 1] if self.ranges else data
        self.served[name] = self.served.get(name, 0) + len(body)
        answer = {"content-range": f"bytes {begin}-{begin + len(body) - 1}/{len(data)}"} if self.ranges else {}
        yield httpx.Response(206 if self.ranges else 200, headers=answer, content=body, request=httpx.Request(method, url))


def without_files(checkpoint) -> dict:
    """A checkpoint's tensors with their pieces named by file name (a dry run names the cache's paths)."""
    return {k: (t.dtype, t.shape, [(Path(p.file).name, p.begin, p.nbytes) for p in t.pieces]) for k, t in checkpoint.tensors.items()}


@pytest.mark.parametrize("probe", [64 << 10, 16], ids=["header-in-probe", "header-past-probe"])
def test_a_dry_run_plans_a_hub_source_from_its_headers(tmp_path, monkeypatch, krea, probe):
    from fluxrecipe import api, hub
    from fluxrecipe.errors import UsageError
    from fluxrecipe.recipe import SourceSpec
    from fluxrecipe.sources import open_source

    monkeypatch.setattr(hub, "REMOTE_HEADER_PROBE", probe)
    fake = RangeHub(monkeypatch, tmp_path / "cache", krea)
    remote = open_hub(REPO, download=False)
    assert without_files(remote) == without_files(open_source(SourceSpec(name="a", path=str(krea))))
    assert not remote.downloaded and remote.origin == {"repo": REPO, "revision": "main", "commit": NEW, "subfolder": "transformer"}
    shards = sorted(p for p in krea.glob("*.safetensors"))
    assert sorted(fake.served) == [p.name for p in shards]
    for shard in shards:  # the length and the header: nothing of the data
        header_end = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
        assert fake.served[shard.name] == (min(probe, shard.stat().st_size) if probe > header_end else header_end)
    assert not any(fake.snapshot.rglob("*.safetensors"))

    recipe = api.load_recipe({"sources": {"a": REPO}, "base": "a", "rules": [{"match": ".*", "op": "take:a"}]}, name="conv")
    plan = api.plan(recipe, download=False)
    assert "(headers read on the hub; weights not downloaded)" in api.describe(plan)
    with pytest.raises(UsageError, match="without downloading source"):
        api.write(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_server_that_ignores_byte_ranges_is_not_read(tmp_path, monkeypatch, krea):
    fake = RangeHub(monkeypatch, tmp_path / "cache", krea, ranges=False)
    with pytest.raises(SourceError) as e:
        open_hub(REPO, download=False)
    assert "did not answer a byte-range request (HTTP 200)" in str(e.value) and "run without dry_run" in str(e.value)
    assert len(fake.served) == 1  # refused at the first file
