"""Fetch a source's transformer files from the Hugging Face hub, through huggingface_hub and its cache.

Only the transformer's own files are fetched (a FLUX pipeline repo also holds text encoders, a VAE and a
24 GB single-file copy of the transformer). Tokens, the cache folder and offline mode come from where
huggingface_hub always takes them (`hf auth login`, HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from huggingface_hub import constants, hf_hub_download, snapshot_download
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

try:  # huggingface_hub >= 2 talks through httpx2, 1.x through httpx; a proxy error reaches the caller as it is
    from httpx2 import HTTPError as TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import HTTPError as TransportError
try:
    from huggingface_hub.errors import DisabledRepoError, IncompleteSnapshotError
except ImportError:  # pragma: no cover - older huggingface_hub
    DisabledRepoError = IncompleteSnapshotError = type("_Never", (Exception,), {})

TRANSFORMER_SUBFOLDER = "transformer"


def fetch(name: str, repo: str, revision: str | None, subfolder: str | None) -> tuple[Path, dict[str, str]]:
    """The local folder holding `repo`'s transformer files, and the provenance (repo, revision, commit)."""
    where = f"source '{name}': hub repo '{repo}'" + (f" at revision '{revision}'" if revision else "")
    with _hub_errors(where, repo, revision, lambda: _download_hint(repo, revision, subfolder)):
        if subfolder is None:
            subfolder = _find_subfolder(repo, revision)
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        snapshot = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"],
            )
        )
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        raise SourceError(f"{where} has no folder '{subfolder}'")
    origin = {"repo": repo, "revision": revision or "main", "commit": snapshot.name}
    if subfolder:
        origin["subfolder"] = subfolder
    return folder, origin


def fetch_file(what: str, repo: str, file: str, revision: str | None) -> tuple[Path, dict[str, str]]:
    """One file of a hub repo (a LoRA), fetched into the cache; its local path and provenance. `what` names
    it for messages ("lora 'style'")."""
    where = f"{what}: hub repo '{repo}'" + (f" at revision '{revision}'" if revision else "")
    hint = f"hf download {repo} {file}" + (f" --revision {revision}" if revision else "")
    with _hub_errors(where, repo, revision, lambda: hint, file):
        path = Path(hf_hub_download(repo, file, revision=revision))
    snapshot = path.parents[file.strip("/").count("/")]  # the cache's snapshots/<commit>/ folder
    return path, {"repo": repo, "file": file, "revision": revision or "main", "commit": snapshot.name}


@contextmanager
def _hub_errors(where: str, repo: str, revision: str | None, hint, file: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions -> one SourceError line that says what to do."""
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
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        offline = constants.HF_HUB_OFFLINE
        raise SourceError(
            f"{where} is not in the local cache ({constants.HF_HUB_CACHE})"
            + (" and HF_HUB_OFFLINE is set: unset it to download" if offline else " and the hub cannot be reached: check the network and run again")
            + f", download it first (`{hint()}`), set HF_HUB_CACHE (or HF_HOME) to the cache that holds it, "
            "or point it at a local path"
        ) from None
    except EntryNotFoundError:  # after LocalEntryNotFoundError, which is one
        raise SourceError(f"{where} has no file '{file}'") from None
    except HFValidationError as e:
        raise SourceError(f"{where}: {e}") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceError(f"{where}: the hub answered with an error: {e}") from None
    except TransportError as e:
        raise SourceError(f"{where}: cannot reach the hub ({type(e).__name__}: {e}): check the network or proxy settings, or set HF_HUB_OFFLINE=1 to use the local cache only") from None


def _download_hint(repo: str, revision: str | None, subfolder: str | None) -> str:
    folder = TRANSFORMER_SUBFOLDER if subfolder is None else subfolder.strip("/")
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "") + (f" --include '{folder}/*'" if folder else "")


def _find_subfolder(repo: str, revision: str | None) -> str:
    """'transformer' for a pipeline repo, '' for a repo that holds only the transformer."""
    for subfolder in (TRANSFORMER_SUBFOLDER, ""):
        try:
            hf_hub_download(repo, "config.json", subfolder=subfolder or None, revision=revision)
            return subfolder
        except LocalEntryNotFoundError:
            if constants.HF_HUB_OFFLINE:
                continue  # offline, a file that is not cached may still exist: try the other place
            raise
        except EntryNotFoundError:
            continue
    if constants.HF_HUB_OFFLINE:
        raise LocalEntryNotFoundError(f"{repo}: no config.json cached")
    raise SourceError(
        f"hub repo '{repo}' has neither {TRANSFORMER_SUBFOLDER}/config.json nor config.json: is it a diffusers FLUX repo? "
        "Name the folder with a mapping spec: {repo: ..., subfolder: ...}"
    )
