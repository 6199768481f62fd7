"""Chat prompts as one left-padded batch; the ids that end a turn."""

import pytest

from ecospa_deploy.chat import encode_chat, end_of_turn_ids, pad_id
from ecospa_deploy.errors import EcospaError
from ecospa_deploy.testing import tiny_chat_tokenizer, tiny_tokenizer


def test_prompts_are_left_padded_chat_turns():
    tok = tiny_chat_tokenizer()
    batch = encode_chat(tok, ["Hi?", "What is the question?"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].all() and not mask[0, 0] and mask[0, -1]       # the short row is padded left
    assert (ids[0][mask[0] == 0] == pad_id(tok)).all()
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0][mask[0] == 1].tolist() == tok(rendered, add_special_tokens=False)["input_ids"]


def test_a_turn_ends_at_eos_and_at_im_end_when_the_vocabulary_has_it():
    tok = tiny_tokenizer()
    assert end_of_turn_ids(tok) == [tok.eos_token_id]
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_tokenizer_without_a_chat_template_is_a_clear_error():
    with pytest.raises(EcospaError, match="no chat template"):
        encode_chat(tiny_tokenizer(), ["Hi?"])
