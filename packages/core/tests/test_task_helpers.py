"""The small helpers that new-task's templates build on: the word-level tokenizer of a task's own
texts, records of required text fields, padded batches and greedy continuations, and the block
classes FSDP wraps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core.errors import UserError
from core.nn.models import block_classes
from core.task.base import IGNORE_INDEX
from core.task.textbatch import continuations, pad_batch
from core.task.textrecords import read_text_records
from core.task.wordlevel import word_tokenizer

ROLES = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def test_the_word_tokenizer_knows_the_words_of_its_texts_and_round_trips(tmp_path: Path) -> None:
    made = word_tokenizer(["Wake me up at 6", "play jazz, please"], ROLES, "<s> $A </s>")
    assert len(made) == 4 + 9  # the specials, then wake me up at 6 play jazz please and ","
    ids = made("play JAZZ loudly")["input_ids"]
    assert ids[0] == made.bos_token_id and ids[-1] == made.eos_token_id
    assert ids[1:-1] == [made.convert_tokens_to_ids(w) for w in ("play", "jazz", "<unk>")]
    assert made.decode(ids[:-2], skip_special_tokens=True) == "play jazz"
    made.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("wake me up")["input_ids"] == made("wake me up")["input_ids"]
    assert (again.pad_token_id, again.unk_token_id) == (0, 1)
    with pytest.raises(ValueError, match="pad_token"):
        word_tokenizer(["a"], {"unk_token": "<unk>"})


def test_text_records_need_every_field_as_a_non_empty_string(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"source": "a b", "target": "c", "other": 1}\n{"source": "d", "target": "e"}\n'
    )
    records = read_text_records(good, "data.train_file", ["source", "target"])
    assert [r.fields for r in records] == [
        {"source": "a b", "target": "c"},
        {"source": "d", "target": "e"},
    ]
    assert records[1].where.endswith("good.jsonl:2")
    for bad_line in ('{"source": "x", "target": ""}', '{"source": "x"}', '["x", "y"]'):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"source": "a", "target": "b"}\n' + bad_line + "\n")
        with pytest.raises(UserError, match=r"bad\.jsonl:2.*'target'|bad\.jsonl:2"):
            read_text_records(bad, "data.train_file", ["source", "target"])


def test_pad_batch_pads_inputs_and_labels_to_their_own_longest() -> None:
    batch = pad_batch(
        [
            {"index": 7, "input_ids": [4, 5], "labels": [6, 7, 8]},
            {"index": 2, "input_ids": [4, 5, 6, 7], "labels": [9]},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[4, 5, 0, 0], [4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[6, 7, 8], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["index"].tolist() == [7, 2]


def test_continuations_of_left_padded_prompts_match_one_prompt_at_a_time() -> None:
    tokenizer = word_tokenizer(["a b c d e f"], ROLES, "<s> $A")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts = [tokenizer("a b c d")["input_ids"], tokenizer("e")["input_ids"]]
    together = continuations(model, tokenizer, prompts, 4)
    alone = [continuations(model, tokenizer, [p], 4)[0] for p in prompts]
    assert len(together) == 2 and together == alone, (together, alone)
    # one prompt a call (longest first), greedy without do_sample: the same texts, in order
    assert continuations(model, tokenizer, prompts, 4, batch_size=1, temperature=0.1) == together
    sampled = continuations(model, tokenizer, prompts, 4, 1, do_sample=True, top_k=2)
    assert len(sampled) == 2 and all(isinstance(t, str) for t in sampled), sampled


def test_block_classes_are_the_layers_a_model_names_as_unsplittable() -> None:
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    assert {c.__name__ for c in block_classes(LlamaForCausalLM(config))} == {"LlamaDecoderLayer"}
    assert block_classes(torch.nn.Linear(2, 2)) == set()
