"""ROUGE: Korean, multi-reference conventions, the score and lead3 commands."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from core.task.metrics import DefaultTokenizer, UnicodeWordTokenizer, resolve_tokenizer, rouge
from summarization.cli import lead3, score
from summarization.config import SAMPLES
from summarization.data import read_jsonl

EN, KO = SAMPLES["en"], SAMPLES["ko"]


def write_jsonl(path, rows):
    """Write rows as JSON lines; returns the path."""
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_korean_scores_zero_with_rouge_scores_default_tokenizer_and_correctly_with_ours():
    prediction = "두 사람은 토요일에 북한산에 가기로 한다."
    reference = "두 사람은 토요일 아침에 북한산 등산을 가기로 한다."
    default = rouge([prediction], [[reference]], tokenizer="default")
    plain = rouge_scorer.RougeScorer(["rouge1"]).score(reference, prediction)["rouge1"].fmeasure
    assert default["rouge1"] == plain == 0.0, "rouge_score's own tokenizer deletes Hangul"
    auto = rouge([prediction], [[reference]], tokenizer="auto")
    assert auto["tokenizer"].startswith("unicode-words")
    # words: pred {두, 사람은, 토요일에, 북한산에, 가기로, 한다}
    #        ref  {두, 사람은, 토요일, 아침에, 북한산, 등산을, 가기로, 한다}
    # overlap 4 -> P = 4/6, R = 4/8, F1 = 4/7
    assert auto["rouge1"] == pytest.approx(4 / 7)
    assert 0 < auto["rouge2"] < auto["rouge1"] and auto["rougeL"] == pytest.approx(4 / 7)


def test_auto_tokenizer_choice_and_lang_names():
    assert resolve_tokenizer("auto", ["plain English text"]) == "default"
    assert resolve_tokenizer("auto", ["English", "그리고 한국어"]) == "unicode"
    assert resolve_tokenizer("auto", ["café"]) == "unicode"
    assert resolve_tokenizer("auto", ["curly quotes don’t count — nor dashes"]) == "default"
    assert (
        resolve_tokenizer("ko", []) == "unicode"
        and resolve_tokenizer("en", ["한국어"]) == "default"
    )


def test_unicode_tokenizer_equals_rouge_scores_on_english_dialogsum():
    rows = read_jsonl(EN / "dev.jsonl") + read_jsonl(EN / "test.jsonl")
    texts = [r["dialogue"] for r in rows] + [ref for r in rows for ref in r["references"]]
    texts = [t for t in texts if t.isascii()]
    for stem in (False, True):
        ours, theirs = UnicodeWordTokenizer(stem), DefaultTokenizer(stem)
        assert all(ours.tokenize(t) == theirs.tokenize(t) for t in texts)


def test_multi_reference_mean_and_max_against_hand_computed_values():
    prediction = "the cat sat on the mat"
    references = ["the cat sat on the mat", "a dog ran"]
    mean = rouge([prediction], [references], multi_reference="mean", use_stemmer=False)
    best = rouge([prediction], [references], multi_reference="max", use_stemmer=False)
    assert best["rouge1"] == 1.0 and mean["rouge1"] == pytest.approx(0.5)
    assert mean["multi_reference"].startswith("mean") and best["multi_reference"].startswith("max")
    assert mean["references_per_sample"] == 2
    # max equals rouge_score's own multi-reference scoring
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = read_jsonl(EN / "test.jsonl")[:10]
    preds = [r["dialogue"].split("\n")[0] for r in rows]
    ours = rouge(preds, [r["references"] for r in rows], multi_reference="max")
    for kind in ("rouge1", "rouge2", "rougeL"):
        theirs = sum(
            scorer.score_multi(r["references"], p)[kind].fmeasure for r, p in zip(rows, preds)
        ) / len(rows)
        assert ours[kind] == pytest.approx(theirs)
    # a single reference: both conventions agree
    single = [[r["references"][0]] for r in rows]
    assert (
        rouge(preds, single, multi_reference="mean")["rougeL"]
        == rouge(preds, single, multi_reference="max")["rougeL"]
    )


def test_rougelsum_splits_sentences():
    two = rouge(["Tom is here. Ann left."], [["Ann left. Tom is here."]], use_stemmer=False)
    assert two["rougeLsum"] == pytest.approx(1.0) and two["rougeL"] < 1.0


def test_score_command_prints_one_json_object(tmp_path, capsys):
    refs = read_jsonl(EN / "test.jsonl")[:5]
    preds = write_jsonl(
        tmp_path / "p.jsonl",
        [{"fname": r["fname"], "summary": r["references"][0]} for r in reversed(refs)],
    )
    assert (
        score(["--predictions", str(preds), "--references", str(EN / "test.jsonl")]) == 2
    )  # 45 ids missing
    assert "45 reference id(s) have no prediction" in capsys.readouterr().err
    ref_file = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"fname": r["fname"], **{f"summary{i + 1}": s for i, s in enumerate(r["references"])}}
            for r in refs
        ],
    )
    assert (
        score(
            ["--predictions", str(preds), "--references", str(ref_file), "--multi-reference", "max"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["rouge1"] == result["rougeL"] == 1.0 and result["samples"] == 5
    assert set(result) >= {
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "tokenizer",
        "multi_reference",
        "stemmer",
    }
    assert score(["--predictions", str(preds), "--references", str(ref_file)]) == 0
    mean = json.loads(capsys.readouterr().out)
    assert 0 < mean["rouge1"] < 1 and mean["multi_reference"].startswith("mean")


def test_score_command_korean_and_bad_files(tmp_path, capsys):
    rows = read_jsonl(KO / "test.jsonl")
    preds = write_jsonl(
        tmp_path / "p.jsonl", [{"fname": r["fname"], "summary": r["references"][1]} for r in rows]
    )
    assert score(["--predictions", str(preds), "--references", str(KO / "test.jsonl")]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["tokenizer"].startswith("unicode-words") and 0.3 < auto["rouge1"] < 1
    assert (
        score(["--predictions", str(preds), "--references", str(KO / "test.jsonl"), "--lang", "en"])
        == 0
    )
    english = json.loads(capsys.readouterr().out)
    assert (
        english["tokenizer"].startswith("rouge_score-default")
        and english["rouge1"] < auto["rouge1"]
    )
    extra = write_jsonl(
        tmp_path / "extra.jsonl",
        [
            *map(json.loads, preds.read_text(encoding="utf-8").splitlines()),
            {"fname": "nope", "summary": "x"},
        ],
    )
    assert score(["--predictions", str(extra), "--references", str(KO / "test.jsonl")]) == 2
    assert "1 prediction id(s) are not in --references (e.g. nope)" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text(
        '{"fname": "a", "summary": "x"}\n{"fname": "b", "summary": \n', encoding="utf-8"
    )
    assert (
        score(
            [
                "--predictions",
                str(tmp_path / "broken.jsonl"),
                "--references",
                str(KO / "test.jsonl"),
            ]
        )
        == 2
    )
    assert (
        f"{tmp_path / 'broken.jsonl'}:2:27: not valid JSON (Expecting value)"
        in capsys.readouterr().err
    )


def test_lead3_baseline_matches_score_on_the_same_predictions(tmp_path, capsys):
    out = tmp_path / "lead3.jsonl"
    assert lead3(["--data", str(EN / "test.jsonl"), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["system"] == "lead-3" and printed["samples"] == 50
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert (
        first["fname"] == "test_0"
        and first["summary"].count("\n") == 2
        and first["summary"].startswith("#Person1#: Ms. Dawson")
    )
    assert score(["--predictions", str(out), "--references", str(EN / "test.jsonl")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert all(scored[k] == printed[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert 0.2 < scored["rouge1"] < 0.35
