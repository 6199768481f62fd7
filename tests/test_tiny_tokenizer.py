"""The test tokenizer is the same in every call and process, so token-level expectations hold.

A CI run once failed because two trainings in one process gave different vocabularies: the
byte-level alphabet came from a hash set in a new order each call.
"""

from ecospa_deploy.testing import tiny_tokenizer


def test_two_trainings_give_one_vocabulary():
    first, second = tiny_tokenizer(), tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "the cat sat on the mat"
    assert first(text)["input_ids"] == second(text)["input_ids"]
    assert first.decode(first("To be, or not")["input_ids"]) == "To be, or not"
