"""``peftlab push``: an adapter (or a merged model) to the Hugging Face Hub, with its model card.

What goes up is a folder that loads both ways:

* a ``peftlab train`` run: the adapter's files at the repository's top level (so plain
  ``PeftModel.from_pretrained(base, "org/name")`` works), ``peftlab.json`` with ``adapter_dir: "."`` and
  ``metrics.json`` beside them (so ``--adapter org/name`` keeps its task, labels and options in peftlab),
  and the card (``modelcard``) naming the repository in its loading code;
* a plain peft adapter folder: as it is, with a card when it has none;
* a ``peftlab merge`` output: the transformers checkpoint with its card; the merge report goes up without
  this machine's paths.

Only safetensors weights and configs are uploaded (the folder passes :func:`peftlab.adapter_check.check_adapter`
first). Offline (``HF_HUB_OFFLINE=1``, or the Hub cannot be reached within a few seconds) the command stops
in one sentence before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from peftlab.errors import PeftlabError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
REACH_TIMEOUT_S = 5.0
TRUE = {"1", "on", "yes", "true"}
UPLOADED = ("*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja")  # configs, weights, card, tokenizer


def endpoint() -> str:
    """The Hub endpoint huggingface_hub talks to ($HF_ENDPOINT, else its default)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: Any, flag: str = "--repo") -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise PeftlabError(f"{flag} {repo_id!r} is not a Hub repository id: write it as ORG/NAME (letters, digits, "
                           "'-', '_' and '.'), e.g. my-org/lora-sst2.")
    return repo_id


def check_reachable(action: str = "push") -> None:
    """Refuse in one sentence, within seconds, when the Hub cannot be used: offline mode, or no connection."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        raise PeftlabError(f"Cannot {action} to the Hugging Face Hub: HF_HUB_OFFLINE is set (offline mode); unset it "
                           "on a machine with network access and log in with `hf auth login` (or set HF_TOKEN).")
    url = urlparse(endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__ if not isinstance(error, socket.timeout) else "timed out"
        raise PeftlabError(f"Cannot {action} to the Hugging Face Hub: {url.netloc} cannot be reached ({reason}); "
                           "check the network (or $HF_ENDPOINT) and try again.") from None


def push(adapter: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         commit_message: str | None = None, quiet: bool = False) -> str:
    """Upload ``adapter`` (a run folder, a peft adapter folder or a merge output) with its card to ``repo_id``;
    the repository's URL. Creates the repository (``private`` if asked) when it does not exist."""
    from peftlab.adapter_check import check_adapter

    check_repo_id(repo_id)
    source = Path(os.path.expanduser(str(adapter)))
    checked = check_adapter(source)  # refuses pickles, incomplete weights, a manifest pointing outside, ...
    check_reachable()
    with tempfile.TemporaryDirectory(prefix="peftlab-push-") as staging:
        folder = stage(checked, Path(staging) / "upload", repo_id)
        url = upload(folder, repo_id, private=private, token=token,
                     commit_message=commit_message or f"Upload {checked.manifest.method} "
                                                      f"{'merged model' if checked.merged else 'adapter weights'} with peftlab")
    if not quiet:
        print(f"Pushed '{source}' to {url}", flush=True)
    return url


def stage(checked, target: Path, repo_id: str) -> Path:
    """The folder that is uploaded (links or copies of the files; see the module's docstring)."""
    from peftlab import modelcard
    from peftlab.artifacts import MANIFEST, write_json

    target.mkdir(parents=True)
    _link_tree(checked.adapter_dir, target)
    if checked.merged:
        from peftlab.merge import REPORT_NAME

        report = json.loads((checked.folder / REPORT_NAME).read_text())
        local = {"source_adapter", "adapter_dir"}
        write_json(target / REPORT_NAME, {k: (Path(v).name if k in local and v else v) for k, v in report.items()})
        (target / modelcard.CARD).unlink(missing_ok=True)
        modelcard.write_merged_card(target, report, repo_id=repo_id)
        return target
    if checked.from_run:
        manifest = json.loads((checked.folder / MANIFEST).read_text())
        manifest["adapter_dir"] = "."
        (target / MANIFEST).unlink(missing_ok=True)
        write_json(target / MANIFEST, manifest)
        if (checked.folder / modelcard.METRICS).is_file():
            (target / modelcard.METRICS).unlink(missing_ok=True)
            shutil.copy2(checked.folder / modelcard.METRICS, target / modelcard.METRICS)
        (target / modelcard.CARD).unlink(missing_ok=True)
        modelcard.write_card(target, repo_id=repo_id, target=target / modelcard.CARD)
    elif not _has_own_card(target / modelcard.CARD):
        (target / modelcard.CARD).unlink(missing_ok=True)
        card = modelcard.card_for(checked.manifest, None, repo_id=repo_id)
        (target / modelcard.CARD).write_text(str(card))
    return target


def _has_own_card(path: Path) -> bool:
    """A README.md that is more than peft's empty template (which says "More Information Needed")."""
    return path.is_file() and "More Information Needed" not in path.read_text(errors="replace")


def _link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_dir() or not any(path.match(pattern) for pattern in UPLOADED):
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)  # no copy of a large checkpoint
        except OSError:
            shutil.copy2(path, destination)


def upload(folder: Path, repo_id: str, *, private: bool, token: str | None, commit_message: str) -> str:
    """``create_repo`` + ``upload_folder``; every Hub failure becomes one sentence."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(endpoint=endpoint(), token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except LocalTokenNotFoundError:
        raise PeftlabError("Cannot push to the Hugging Face Hub: not logged in; run `hf auth login` or set HF_TOKEN "
                           "to a token with write access.") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = {401: "the token is missing or invalid: run `hf auth login` or set HF_TOKEN",
                403: f"this token may not write to '{repo_id}': use a token with write access to that organisation",
                }.get(status, str(error).splitlines()[0][:200])
        raise PeftlabError(f"The Hub refused the push to '{repo_id}' ({hint}).") from None
    except OSError as error:
        raise PeftlabError(f"Cannot push to the Hugging Face Hub: {str(error).splitlines()[0][:200]}; check the "
                           "network and try again.") from None
    return str(getattr(url, "url", url) or f"{endpoint()}/{repo_id}")


# ---- loading back by repo id ------------------------------------------------------------------------------

def download(repo_id: str) -> Path:
    """The repository's configs and safetensors as plain files in peftlab's cache (``local_dir``: the Hub cache's
    symlinks into its blob store would lead out of the folder, which the adapter check refuses)."""
    from huggingface_hub import snapshot_download

    from peftlab.models import cache_dir

    target = cache_dir() / "hub-adapters" / repo_id.replace("/", "--")
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], local_dir=str(target)))


def local_or_hub(value: str | os.PathLike, where: str = "--adapter") -> str:
    """``value`` itself when it is a local folder (or not a Hub id); else the Hub repository ``org/name`` fetched
    with :func:`download`, one sentence when it cannot be. Where a command takes an adapter folder, this makes a
    repository id work too."""
    text = str(value)
    if os.path.isdir(os.path.expanduser(text)) or not REPO_ID.match(text):
        return text
    try:
        return str(download(text))
    except Exception as error:  # noqa: BLE001 - offline, missing, private: say which and what to do
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise PeftlabError(f"{where}: no such folder, and the Hub repository '{text}' could not be fetched "
                           f"({reason}); check the name, the network (HF_HUB_OFFLINE) and HF_TOKEN for a private "
                           "repository.") from None


__all__ = ["push", "stage", "upload", "check_repo_id", "check_reachable", "endpoint", "download", "local_or_hub"]
