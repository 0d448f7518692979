"""Fetch a source's transformer files from the Hugging Face hub, through huggingface_hub and its cache.

Only the transformer's own files are fetched (a FLUX pipeline repo also holds text encoders, a VAE and a
24 GB single-file copy of the transformer). Tokens, the cache folder and offline mode come from where
huggingface_hub always takes them (`hf auth login`, HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE).
"""

from __future__ import annotations

from pathlib import Path

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

TRANSFORMER_SUBFOLDER = "transformer"


def fetch(name: str, repo: str, revision: str | None, subfolder: str | None) -> tuple[Path, dict[str, str]]:
    """The local folder holding `repo`'s transformer files, and the provenance (repo, revision, commit)."""
    where = f"source '{name}': hub repo '{repo}'" + (f" at revision '{revision}'" if revision else "")
    try:
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
    except GatedRepoError:
        raise SourceError(
            f"{where} is gated: accept its licence at https://huggingface.co/{repo} while logged in, then log in here "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(f"{where} was not found: check the name; if it is private, log in (`hf auth login`) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise SourceError(f"{where}: no such revision (a branch, tag or commit of the repo)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SourceError(
            f"{where} is not in the local cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "")
            + f": connect and run again, download it first (`hf download {repo} --include '{TRANSFORMER_SUBFOLDER}/*'`), "
            "set HF_HUB_CACHE to the cache that holds it, or point the source at a local folder"
        ) from None
    except HFValidationError as e:
        raise SourceError(f"{where}: {e}") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceError(f"{where}: the hub answered with an error: {e}") from None
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        raise SourceError(f"{where} has no folder '{subfolder}'")
    origin = {"repo": repo, "revision": revision or "main", "commit": snapshot.name}
    if subfolder:
        origin["subfolder"] = subfolder
    return folder, origin


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
