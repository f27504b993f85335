from chemfl.data_prep.formatting import IGNORE_INDEX, render_answer, render_prompt, tokenize_examples
from tests.tiny import tiny_tokenizer

RECORD = {"input": "What is the formula of <SMILES> CCO </SMILES> ?", "output": "<MOLFORMULA> C2H6O </MOLFORMULA>"}


def test_prompt_is_the_chat_up_to_the_assistant_turn():
    tokenizer = tiny_tokenizer()
    prompt = render_prompt(tokenizer, RECORD["input"], system_prompt="You are a chemistry assistant.")
    assert prompt.startswith("<|im_start|>system\nYou are a chemistry assistant.<|im_end|>\n")
    assert prompt.endswith(RECORD["input"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_labels_mask_the_prompt_and_keep_the_answer_and_end_of_turn():
    tokenizer = tiny_tokenizer()
    [example], report = tokenize_examples(tokenizer, [RECORD], max_length=512)
    prompt, answer = render_answer(tokenizer, RECORD["input"], RECORD["output"])
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    learned = example["labels"][n_prompt:]
    assert learned == example["input_ids"][n_prompt:]
    assert tokenizer.decode(learned) == answer == RECORD["output"] + "<|im_end|>\n"
    assert report.examples == 1 and report.truncated == 0 and report.dropped == 0
    assert report.answer_tokens == len(learned)
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_truncation_is_counted_and_prompt_only_examples_are_dropped():
    tokenizer = tiny_tokenizer()
    [full], _ = tokenize_examples(tokenizer, [RECORD], max_length=512)
    n_answer = sum(label != IGNORE_INDEX for label in full["labels"])
    n_prompt = len(full["input_ids"]) - n_answer
    short = {**RECORD, "input": "hi"}
    examples, report = tokenize_examples(tokenizer, [RECORD, short], max_length=n_prompt + 2)
    assert report.truncated >= 1
    cut = examples[0]
    assert len(cut["input_ids"]) == n_prompt + 2
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2
    examples, report = tokenize_examples(tokenizer, [RECORD, short], max_length=n_prompt)
    assert report.dropped == 1 and report.dropped_indices == [0]
    assert report.examples == len(examples) == 1
    assert all(len(e["input_ids"]) <= n_prompt for e in examples)


def test_lazy_examples_tokenize_on_first_use_and_match_the_eager_path():
    from chemfl.data_prep.formatting import LazyExamples

    tokenizer = tiny_tokenizer()
    records = [RECORD, {**RECORD, "output": "<MOLFORMULA> CH4 </MOLFORMULA>"}, {**RECORD, "input": "x " * 300}]
    lazy = LazyExamples(tokenizer, records, max_length=64)
    assert lazy.report.examples == 0  # nothing tokenized yet
    assert lazy[1] == tokenize_examples(tokenizer, [records[1]], 64)[0][0]
    assert lazy.report.examples == 1
    assert lazy[2] is None and lazy.report.dropped == 1 and lazy.report.dropped_indices == [2]
    lazy[1]
    assert lazy.report.examples == 1  # cached, counted once
    eager, report = tokenize_examples(tokenizer, records, 64)
    assert eager == [lazy[0], lazy[1]] and report.dropped == 1


def test_example_stream_skips_dropped_examples_and_fails_when_none_is_usable():
    import pytest

    from chemfl.errors import ChemFLError
    from chemfl.llm.training import example_stream

    stream = example_stream([None, {"id": 1}, None, {"id": 2}], seed=0)
    drawn = [next(stream)["id"] for _ in range(6)]
    assert sorted(drawn[:2]) == [1, 2] and sorted(drawn[2:4]) == [1, 2]
    with pytest.raises(ChemFLError, match="train.max-length"):
        next(example_stream([None, None], seed=0))
