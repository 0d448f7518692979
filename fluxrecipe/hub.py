"""Fetch a source's transformer files from the Hugging Face hub, through huggingface_hub and its cache.

Only the transformer's own files are fetched (a FLUX pipeline repo also holds text encoders, a VAE and a
24 GB single-file copy of the transformer). Tokens, the cache folder and offline mode come from where
huggingface_hub always takes them (`hf auth login`, HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants, get_session, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import SourceError
from .formats.safetensors import Header, header_length, parse_header

try:  # huggingface_hub >= 2 talks through httpx2, 1.x through httpx; a proxy error reaches the caller as it is
    from httpx2 import HTTPError as TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import HTTPError as TransportError
try:
    from huggingface_hub.errors import DisabledRepoError, IncompleteSnapshotError
except ImportError:  # pragma: no cover - older huggingface_hub
    DisabledRepoError = IncompleteSnapshotError = type("_Never", (Exception,), {})

TRANSFORMER_SUBFOLDER = "transformer"
REMOTE_HEADER_PROBE = 64 << 10  # bytes read first from a file left on the hub: its length and (mostly) its header


def fetch(name: str, repo: str, revision: str | None, subfolder: str | None, download: bool = True) -> tuple[Path, dict[str, str], dict[Path, Header]]:
    """The local folder holding `repo`'s transformer files, the provenance (repo, revision, commit), and the
    headers of weight files left on the hub. `download=False` (a dry run, a sweep's dry-run pre-flight)
    fetches the small JSON files only and reads each weight file's header with two range requests, so that
    planning FLUX.1 costs kilobytes, not 24 GB; its files are named where the download would put them."""
    where = f"source '{name}': hub repo '{repo}'" + (f" at revision '{revision}'" if revision else "")
    with hub_access(where, repo, lambda: _download_hint(repo, revision, subfolder), "point the source at a local folder") as local_only:
        if subfolder is None:
            subfolder = _find_subfolder(repo, revision, local_only)
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        weights = download or local_only
        snapshot = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"] if weights else [f"{prefix}*.json"],
                local_files_only=local_only,
            )
        )
        remote = {} if weights else _remote_headers(repo, snapshot, prefix)
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        raise SourceError(f"{where} has no folder '{subfolder}'")
    origin = {"repo": repo, "revision": revision or "main", "commit": snapshot.name}
    if subfolder:
        origin["subfolder"] = subfolder
    return folder, origin, remote


def _remote_headers(repo: str, snapshot: Path, prefix: str) -> dict[Path, Header]:
    """The header of every weight file in the folder `prefix` of the snapshot that is not cached yet, read
    from the hub without downloading the file; keyed by the path the download would give it."""
    files = HfApi().list_repo_files(repo, revision=snapshot.name)
    weights = [f for f in files if f.startswith(prefix) and f.endswith(".safetensors") and "/" not in f[len(prefix):]]
    return {snapshot / f: _remote_header(repo, snapshot.name, f, snapshot / f) for f in weights if not (snapshot / f).is_file()}


def _remote_header(repo: str, commit: str, file: str, path: Path) -> Header:
    """One file's header through HTTP range requests: its first 64 KiB (a FLUX.1 shard's header is about 40 KB),
    then the rest of the header if it is longer. A server that ignores the range is refused, not read."""
    url = hf_hub_url(repo, file, revision=commit)
    prefix, size = _read_range(url, 0, REMOTE_HEADER_PROBE, path)
    length = header_length(str(path), prefix, size)
    raw = prefix[8 : 8 + length]
    if len(raw) < length:
        raw += _read_range(url, 8 + len(raw), 8 + length, path)[0]
    if len(raw) != length:
        raise SourceError(f"{path}: the hub sent {len(raw)} bytes of a {length}-byte header")
    return parse_header(str(path), raw, size)


def _read_range(url: str, begin: int, end: int, path: Path) -> tuple[bytes, int]:
    """Bytes [begin, end) of a file on the hub (fewer at its end) and the file's whole size."""
    headers = {**build_hf_headers(), "range": f"bytes={begin}-{end - 1}"}
    with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        hf_raise_for_status(response)
        total = response.headers.get("content-range", "").rpartition("/")[2]
        if response.status_code != 206 or not total.isdigit():
            raise SourceError(f"{path}: the hub did not answer a byte-range request (HTTP {response.status_code}), so its header cannot be read without downloading it: run without dry_run")
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > end - begin:
                raise SourceError(f"{path}: the hub sent more bytes than asked for (a range of {end - begin})")
    return bytes(data), int(total)


def fetch_file(what: str, repo: str, file: str, revision: str | None, hint: str | None = None, local: str = "give it as a local path") -> tuple[Path, dict[str, str]]:
    """One file of a hub repo (a LoRA, a pipeline's config), fetched into the cache: its local path and
    provenance. `what` names it in messages ("lora 'style'"); `hint` is the download command to suggest
    (default: this file's), `local` how to do without the hub."""
    where = f"{what}: hub repo '{repo}'" + (f" at revision '{revision}'" if revision else "")
    hint = hint or f"hf download {repo} {file}" + (f" --revision {revision}" if revision else "")
    with hub_access(where, repo, lambda: hint, local, file) as local_only:
        path = Path(hf_hub_download(repo, file, revision=revision, local_files_only=local_only))
    snapshot = path.parents[file.strip("/").count("/")]  # the cache's snapshots/<commit>/ folder
    return path, {"repo": repo, "file": file, "revision": revision or "main", "commit": snapshot.name}


@contextmanager
def hub_access(where: str, repo: str, hint: Callable[[], str], local: str, file: str | None = None) -> Iterator[bool]:
    """Every call to the hub goes through here: huggingface_hub's messages logged once, its errors as one
    line (see _hub_errors), and the cache alone used at once when the hub cannot be reached (yields True
    then: pass it on as `local_files_only`)."""
    _log_once()
    with _hub_errors(where, repo, hint, local, file):
        yield not _reachable()


@contextmanager
def _hub_errors(where: str, repo: str, hint: Callable[[], str], local: str, file: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions -> one SourceError line that says what to do (`hint`: the download
    command; `local`: how to do without the hub)."""
    try:
        yield
    except GatedRepoError:
        raise SourceError(
            f"{where} is gated: accept its licence at https://huggingface.co/{repo} while logged in, then log in here "
            "(`hf auth login`) or set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{where} was not found (or is private): check the name at https://huggingface.co/{repo}; "
            "if it is private, log in (`hf auth login`) or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{where}: no such revision (a branch, tag or commit of the repo)") from None
    except DisabledRepoError:
        raise SourceError(f"{where} has been disabled by its owner or the hub and cannot be downloaded") from None
    except IncompleteSnapshotError as e:
        raise SourceError(f"{where}: the cached copy is incomplete ({e}); run again with a network connection to complete it, or `{hint()}`") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        status = _http_status(e)
        if status is not None:  # the hub was reached and answered with an error, and nothing is cached
            raise SourceError(
                f"{where}: the hub answered HTTP {status}" + (" (a server error on its side: try again later)" if status >= 500 else "")
                + f", and the repo is not in the local cache ({constants.HF_HUB_CACHE})"
            ) from None
        offline = constants.HF_HUB_OFFLINE
        raise SourceError(
            f"{where} is not in the local cache ({constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE is set: unset it to download" if offline else " and the hub cannot be reached: check the network and run again")
            + f", download it first (`{hint()}`), set HF_HUB_CACHE (or HF_HOME) to the cache that holds it, or {local}"
        ) from None
    except EntryNotFoundError:  # after LocalEntryNotFoundError, which is one
        raise SourceError(f"{where} has no file '{file}'") from None
    except HFValidationError as e:
        raise SourceError(f"{where}: {e}") from None
    except HfHubHTTPError as e:
        raise SourceError(f"{where}: the hub answered with an error: {e}") from None
    except OSError as e:  # not the hub's doing: the cache's disk (full, read-only, ...)
        if e.filename is not None:
            raise  # named by the path, as every file error is (files.os_errors)
        raise SourceError(f"{where}: downloading into the hub cache ({constants.HF_HUB_CACHE}) failed: {e.strerror or e}") from None
    except TransportError as e:
        raise SourceError(f"{where}: cannot reach the hub ({type(e).__name__}: {e}): check the network or proxy settings, or set HF_HUB_OFFLINE=1 to use the local cache only") from None


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of the hub's answer behind a 'not found locally' error, if the hub answered at all."""
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None) if isinstance(cause, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def _download_hint(repo: str, revision: str | None, subfolder: str | None) -> str:
    folder = TRANSFORMER_SUBFOLDER if subfolder is None else subfolder.strip("/")
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "") + (f" --include '{folder}/*'" if folder else "")


def _reachable() -> bool:
    """Whether the hub could be asked at all: not offline, and its host name resolves. Without a network,
    huggingface_hub retries every request with backoff (about 25 s) before it falls back to the cache."""
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _log_once() -> None:
    """huggingface_hub's warnings (a retry, a fallback to the cache) through the run's logging only: its own
    console handler would print each of them a second time beside Hydra's."""
    for handler in list(logging.getLogger("huggingface_hub").handlers):
        if type(handler) is logging.StreamHandler:
            logging.getLogger("huggingface_hub").removeHandler(handler)


def _find_subfolder(repo: str, revision: str | None, local_only: bool) -> str:
    """'transformer' for a pipeline repo, '' for a repo that holds only the transformer."""
    for subfolder in (TRANSFORMER_SUBFOLDER, ""):
        try:
            hf_hub_download(repo, "config.json", subfolder=subfolder or None, revision=revision, local_files_only=local_only)
            return subfolder
        except LocalEntryNotFoundError:
            if local_only:
                continue  # a file that is not cached may still exist: try the other place
            raise
        except EntryNotFoundError:
            continue
    if local_only:
        raise LocalEntryNotFoundError(f"{repo}: no config.json cached")
    raise SourceError(
        f"hub repo '{repo}' has neither {TRANSFORMER_SUBFOLDER}/config.json nor config.json: is it a diffusers FLUX repo? "
        "Name the folder with a mapping spec: {repo: ..., subfolder: ...}"
    )
