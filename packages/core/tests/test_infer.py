"""core.commands.infer: the ``infer`` every task declares with an InferSpec, run through a real
command whose model reverses the words of a prompt (no weights: the plumbing is what is tested)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.commands.infer import (
    InferSpec,
    infer_parser,
    prompt_truncation,
    read_prompt_rows,
    trained_setting,
)
from core.errors import UserError


class Reverse:
    """Answers with the prompt's words reversed, cut to ``--max-input-tokens`` (default 3)."""

    def __init__(self, args: Any) -> None:
        self.cut = prompt_truncation(None, None, args.max_input_tokens, 0, 3, "the default")

    def __call__(self, records: list[str]) -> list[str]:
        return [" ".join(reversed(self.cut.apply(r.split()))) for r in records]


def read(args: Any) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    return [row["prompt"] for _, row, _ in read_prompt_rows(args.data, "prompt", "(and an id)")]


def spec(**changes: Any) -> InferSpec:
    settings: dict[str, Any] = dict(
        description="Reverse words.",
        epilog="",
        model_help="any folder",
        data_help="JSONL {prompt}",
        prompt_help="one prompt",
        out_help="JSONL",
        missing="Give --prompt TEXT or --data FILE.",
        read=read,
        load=Reverse,
        row=lambda record, text: {"prompt": record, "answer": text},
        single="answer",
        limit_help="3 words",
        check_model=False,
    )
    return InferSpec(**{**settings, **changes})


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"prompt": "a b", "id": "x"}\n{"prompt": "one two three four five"}\n', encoding="utf-8"
    )
    return path


def test_prompt_prints_the_answer_alone(tmp_path, capsys):
    assert spec().command("toy", ["--model", str(tmp_path), "--prompt", "left right"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "right left\n"
    assert captured.err == ""


def test_data_writes_rows_and_one_truncation_note(tmp_path, questions, capsys):
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(tmp_path), "--data", str(questions), "--out", str(out)]
    assert spec().command("toy", argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["answer"] for r in rows] == ["b a", "three two one"]
    err = capsys.readouterr().err
    assert err.count("Note: ") == 1
    assert "1 of 2 prompts were longer than 3 tokens (the default)" in err
    assert f"wrote 2 answers to {out}" in err


def test_data_without_out_prints_json_lines(tmp_path, questions, capsys):
    argv = ["--model", str(tmp_path), "--data", str(questions), "--max-input-tokens", "9"]
    assert spec().command("toy", argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["answer"] for line in lines] == ["b a", "five four three two one"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "Give --prompt TEXT or --data FILE."),
        (["--data", "{q}", "--out", "{q}"], "is the input file of --data"),
        (["--prompt", "x", "--max-input-tokens", "0"], "--max-input-tokens 0: give at least 1"),
        (["--prompt", "x", "stray"], "'stray' is not an option of infer"),
    ],
)
def test_mistakes_exit_2_with_one_message(tmp_path, questions, capsys, argv, message):
    argv = [a.replace("{q}", str(questions)) for a in argv]
    assert spec().command("toy", ["--model", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert questions.read_text(encoding="utf-8").startswith('{"prompt": "a b"')


def test_a_row_without_the_text_is_named_by_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: each row needs a non-empty text 'prompt'"):
        read_prompt_rows(data, "prompt", "(and an id)")


def test_ids_are_the_rows_id_else_the_line(questions):
    assert [qid for qid, _, _ in read_prompt_rows(questions, "prompt", "")] == ["x", "2"]


def test_sampling_flags_and_the_temperature_check(tmp_path, capsys):
    sampling = spec(sampling=True, max_new_tokens=16, batch_size=4, dtype=True)
    args = infer_parser(sampling).parse_args(["--model", "m", "--top-k", "5", "--greedy"])
    assert (args.top_k, args.greedy, args.max_new_tokens, args.batch_size, args.dtype) == (
        5,
        True,
        16,
        4,
        "auto",
    )
    argv = ["--model", str(tmp_path), "--prompt", "x", "--temperature", "0"]
    assert sampling.command("toy", argv) == 2
    assert "--temperature must be positive (or use --greedy)." in capsys.readouterr().err
    assert sampling.command("toy", [*argv, "--greedy"]) == 0


def test_the_interactive_loop_answers_each_line_with_its_own_note(tmp_path, monkeypatch, capsys):
    typed = io.StringIO("a b\nw x y z\n\nnever read\n")
    typed.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdin", typed)
    terminal = spec(terminal=str, terminal_label="words", banner=lambda args, a: "Type words.")
    assert terminal.command("toy", ["--model", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "words> b a\nwords> y x w\nwords> "  # the empty line quits
    assert captured.err.startswith("Type words.\n")
    assert captured.err.count("Note: 1 of 1 prompts were longer than 3 tokens") == 1


def test_no_interactive_mode_off_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a b\n"))
    assert spec(terminal=str).command("toy", ["--model", str(tmp_path)]) == 2
    assert "Give --prompt TEXT or --data FILE." in capsys.readouterr().err


def test_the_model_folder_is_checked_before_anything_loads(tmp_path, capsys):
    checked = spec(check_model=True, load=lambda args: pytest.fail("loaded"))
    assert checked.command("toy", ["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err


def test_prompt_truncation_takes_the_smallest_limit():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100))
    cut = prompt_truncation(model, None, None, reserve=10, trained=64, trained_key="data.x")
    assert (cut.limit, cut.origin, cut.what) == (64, "data.x", "prompts")
    assert prompt_truncation(model, None, None, reserve=10).limit == 90
    with pytest.raises(UserError, match="more than this model takes"):
        prompt_truncation(model, None, 91, reserve=10)


def test_trained_setting_of_a_folder_that_is_no_run(tmp_path):
    assert trained_setting(tmp_path, "data", "max_length") is None
