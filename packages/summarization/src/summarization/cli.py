"""Commands of the summarization package: ``train``, ``evaluate`` and ``predict`` (= ``infer``)
are core's, from :data:`SPEC`; ``score`` (ROUGE of two files) and ``lead3`` (the Lead-3 baseline)
are its own. ``python -m summarization.cli COMMAND ...`` runs any of them (no arguments: a
self-check). Mistakes a user can fix exit with code 2 and a one-paragraph message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.commands.infer import InferSpec
from core.commands.spec import EvaluateSpec, TaskSpec
from core.commands.train import add_out_arguments, config_for_model
from core.errors import UserError, user_errors_exit_2
from core.run.outputs import guard_file, write_jsonl, write_text
from core.task.truncation import Truncation, add_option
from summarization.config import DEFAULT_PRESET, PRESETS_DIR, SummarizationConfig

DESCRIPTION = (
    "Fine-tune a seq2seq model (BART, T5, ...) on DialogSum dialogue summarization and "
    "score it with ROUGE."
)


def _seq2seq(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes an encoder-decoder model (BART, T5, ...)."""
    return bool(config.get("is_encoder_decoder"))


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """``evaluate``'s own flags: ``--limit`` and ``--max-input-tokens``."""
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    add_option(parser, "data.max_source_length, at most the model's positions")


def _check_evaluate(args: argparse.Namespace) -> None:
    """Refuse ``--limit`` below 1."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give at least 1 row.")


# -- predict ---------------------------------------------------------------------------------


def _check_predict(args: argparse.Namespace) -> None:
    """Refuse an empty ``--prompt`` and ``--batch-size`` below 1."""
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty; give the dialogue to summarise.")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: use at least 1.")


def read_dialogues(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows (``fname``, ``dialogue``) of ``--data``, or the one of ``--prompt``; ``UserError``
    for an unreadable file or a row without a dialogue (file and line named)."""
    from summarization.data import check_row, read_rows

    if args.data is not None:
        return read_rows(args.data, "--data", need_references=False)
    row = {"fname": "text", "dialogue": args.prompt}
    return [check_row(row, "--prompt", need_references=False)]


class Summarizer:
    """A trained model with the config it was trained with (``predict``'s ``args``: ``-c`` and
    overrides apply), summarising dialogues; those cut to ``data.max_source_length`` are counted
    in :attr:`cut`."""

    def __init__(self, args: argparse.Namespace) -> None:
        from core.commands.model_io import inference_device

        cfg = config_for_model(
            args.model, args.config, args.overrides, SPEC.config_cls, PRESETS_DIR, DEFAULT_PRESET
        )
        self.task = SPEC.make_task(cfg)
        model = self.task.load_trained(args.model, args, None)
        origin = self.task.source_limit(args.max_input_tokens)
        self.cut = Truncation(cfg.data.max_source_length, origin, "dialogues")
        self.batch_size = args.batch_size
        self.model = model.to(inference_device(args.device)).eval()

    def __call__(self, rows: list[dict[str, Any]]) -> list[str]:
        """The summary of every row's dialogue, in the rows' order (similar lengths batched
        together)."""
        import torch

        cfg, tokenizer = self.task.cfg, self.task.tokenizer
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["dialogue"]))
        summaries: dict[int, str] = {}
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts = [cfg.model.source_prefix + rows[i]["dialogue"] for i in chunk]
                # whole, to count what is cut (verbose=False: the note says it once)
                for ids in tokenizer(texts, verbose=False)["input_ids"]:
                    self.cut.count(len(ids))
                enc = tokenizer(
                    texts,
                    max_length=cfg.data.max_source_length,
                    truncation=True,
                    padding=True,
                    return_tensors="pt",
                ).to(self.model.device)
                generated = self.task.generate(self.model, enc["input_ids"], enc["attention_mask"])
                summaries.update(zip(chunk, generated, strict=True))
        return [summaries[i] for i in range(len(rows))]


# -- score and the Lead-3 baseline -----------------------------------------------------------


def _add_metric_options(parser: argparse.ArgumentParser) -> None:
    """``--lang``, ``--multi-reference`` and ``--no-stemmer``."""
    parser.add_argument(
        "--lang",
        choices=["auto", "en", "ko"],
        default="auto",
        help="ROUGE tokenizer: en = rouge_score's default, ko = unicode words (keeps Hangul), "
        "auto = ko when the texts hold non-ASCII letters",
    )
    parser.add_argument(
        "--multi-reference",
        choices=["mean", "max"],
        default="mean",
        help="several references per row: mean of the F1s (default) or the best one",
    )
    parser.add_argument(
        "--no-stemmer", action="store_true", help="no Porter stemming of English words"
    )


def score_rows(
    predictions: dict[str, list[str]],
    references: dict[str, list[str]],
    args: argparse.Namespace,
    pred_key: str,
    ref_key: str,
) -> dict[str, Any]:
    """ROUGE of predictions matched to references by ``fname``; ``UserError`` for ids in one file
    and not the other (``pred_key`` / ``ref_key`` name them)."""
    from core.task.metrics import rouge

    missing = [f for f in references if f not in predictions]
    extra = [f for f in predictions if f not in references]
    parts = [
        f"{len(ids)} {what} (e.g. {', '.join(ids[:5])})"
        for ids, what in (
            (missing, f"reference id(s) have no prediction in {pred_key}"),
            (extra, f"prediction id(s) are not in {ref_key}"),
        )
        if ids
    ]
    if parts:
        raise UserError(
            "Predictions and references must cover the same fname ids: " + "; ".join(parts) + "."
        )
    ids = list(references)
    return rouge(
        [predictions[f][0] for f in ids],
        [references[f] for f in ids],
        tokenizer=args.lang,
        use_stemmer=not args.no_stemmer,
        multi_reference=args.multi_reference,
    )


@user_errors_exit_2
def score(argv: Sequence[str] | None = None) -> int:
    """``score --predictions FILE --references FILE``: print ROUGE as one JSON object. Exit code
    0; 2 for bad files or ids that do not match."""
    parser = argparse.ArgumentParser(
        prog="summarization-score",
        description="ROUGE-1/2/L/Lsum F1 (fractions in [0, 1]) of predictions against references, "
        "matched by fname.",
        epilog=(
            "predictions: JSONL rows {fname, summary}. references: rows {fname, summary} or "
            "{fname, summary1, summary2, ...}\n(a DialogSum file works as it is). Every id must be "
            "in both files. Prints one JSON object with rouge1, rouge2,\nrougeL, rougeLsum, the "
            "tokenizer, stemmer and multi-reference convention.\n\nexample:\n  summarization-score "
            "--predictions runs/001_.../eval/test.jsonl --references "
            "../shared/data/dialogsum/dialogsum.test.jsonl"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--predictions", type=Path, required=True, help="JSONL with {fname, summary}"
    )
    parser.add_argument(
        "--references",
        type=Path,
        required=True,
        help="JSONL with {fname, summary} or {fname, summary1..N}",
    )
    add_out_arguments(parser, "also write the JSON object to this file")
    _add_metric_options(parser)
    args = parser.parse_args(argv)
    from summarization.data import read_scoring_file

    if args.out is not None:
        inputs = [(args.predictions, "--predictions"), (args.references, "--references")]
        guard_file(args.out, "--out", inputs, args.overwrite)
    predictions = read_scoring_file(args.predictions, "--predictions", references=False)
    references = read_scoring_file(args.references, "--references", references=True)
    result = {
        **score_rows(predictions, references, args, "--predictions", "--references"),
        "predictions": str(args.predictions),
        "references": str(args.references),
    }
    text = json.dumps(result, ensure_ascii=False)
    if args.out is not None:
        write_text(args.out, text + "\n")
    print(text)
    return 0


@user_errors_exit_2
def lead3(argv: Sequence[str] | None = None) -> int:
    """``lead3 --input FILE``: the Lead-3 baseline (first three utterances as the summary);
    writes ``{fname, summary}`` rows and, when the input has references, prints their ROUGE.
    Exit code 0; 2 for a bad input file."""
    parser = argparse.ArgumentParser(
        prog="summarization-lead3",
        description="Lead-N baseline: the first N utterances of each dialogue (speaker tags kept, "
        "one per line) as its summary.",
        epilog="example:\n  summarization-lead3 --data "
        "../shared/data/dialogsum/dialogsum.test.jsonl --out lead3.test.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        "--input",
        dest="data",
        type=Path,
        required=True,
        help="DialogSum-style JSONL (dialogue; references optional)",
    )
    add_out_arguments(parser, "write {fname, summary} rows here")
    parser.add_argument("-n", type=int, default=3, help="utterances to keep (default 3)")
    _add_metric_options(parser)
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError(f"-n {args.n}: keep at least one utterance.")
    if args.out is not None:
        guard_file(args.out, "--out", [(args.data, "--data")], args.overwrite)
    from summarization.data import lead_n, read_jsonl

    rows = read_jsonl(args.data, "--data", need_references=False)
    predictions = {r["fname"]: [lead_n(r["dialogue"], args.n)] for r in rows}
    if args.out is not None:
        write_jsonl(args.out, [{"fname": f, "summary": p[0]} for f, p in predictions.items()])
        print(f"wrote {len(rows)} Lead-{args.n} summaries to {args.out}", file=sys.stderr)
    if all(r["references"] for r in rows):
        references = {r["fname"]: r["references"] for r in rows}
        result = {
            "system": f"lead-{args.n}",
            **score_rows(predictions, references, args, "lead", str(args.data)),
            "references": str(args.data),
        }
        print(json.dumps(result, ensure_ascii=False))
    elif args.out is None:
        for f, p in predictions.items():
            print(json.dumps({"fname": f, "summary": p[0]}, ensure_ascii=False))
    return 0


SPEC = TaskSpec(
    name="summarization",
    config_cls=SummarizationConfig,
    presets=PRESETS_DIR,
    default_preset=DEFAULT_PRESET,
    task="summarization.task:SummarizationTask",
    estimator="summarization.memory:estimate",
    render="summarization.memory:render",
    description=DESCRIPTION,
    evaluate=EvaluateSpec(
        description="Generate summaries with a trained model and score them with ROUGE (several "
        "processes: trainer.devices=N).",
        epilog=(
            "The config comes from -c, else from the config.yaml of the run that wrote --model, "
            "else the default preset;\ngeneration.* / metric.* / trainer.* overrides apply. Prints "
            "the scores (rouge1/2/L/Lsum F1 in [0,1], loss,\ntokenizer, multi-reference "
            "convention) as one JSON line. The summaries ({fname, summary, references}) go to\n"
            "--out, or, for a run's final/, to <run>/eval/<split>.jsonl with the scores in "
            "<run>/eval/<split>.scores.json.\n\nexamples:\n  evaluate --model "
            "runs/001_20261122_101500/final --split test\n  evaluate --model runs/001_.../final "
            "--data my_dialogues.jsonl --out my_summaries.jsonl generation.num_beams=4"
        ),
        model_help="a folder written by save_pretrained (a run's final/)",
        data_help="a JSONL file of dialogues with references (fname, dialogue, summary or "
        "summary1..N)",
        split_help="dev or test: the split of the config's data (default: dev)",
        out_help="write the generated summaries here (JSONL)",
        splits={"dev": "dev", "validation": "dev", "test": "test"},
        split_error="use dev or test, or --data FILE for a file of your own.",
        fits=_seq2seq,
        arguments=_evaluate_arguments,
        check=_check_evaluate,
        raw_epilog=True,
    ),
    infer=InferSpec(
        prog="summarization-predict",
        description="Summarise dialogues with a trained model (also: infer).",
        epilog=(
            "--data rows need 'dialogue' (and optionally 'fname'); the output has one {fname, "
            "summary} row per input,\nto --out or stdout. --prompt prints the summary of one "
            "dialogue (turns separated by newlines).\n\nexamples:\n  summarization-predict --model "
            "runs/001_.../final --data dialogues.jsonl --out summaries.jsonl\n  "
            "summarization-predict --model runs/001_.../final --prompt $'#Person1#: "
            "Hi!\\n#Person2#: Hello.' generation.num_beams=4"
        ),
        raw_epilog=True,
        model_help="a folder written by save_pretrained (a run's final/)",
        data_help="JSONL file with a 'dialogue' per row",
        prompt_help="one dialogue as text",
        out_help="JSONL output file (default: stdout)",
        missing="Give --data FILE.jsonl (dialogues) or --prompt TEXT (one dialogue).",
        read=read_dialogues,
        load=Summarizer,
        row=lambda row, summary: {"fname": row["fname"], "summary": summary},
        single="summary",
        what="summaries",
        limit_help="data.max_source_length, at most the model's positions",
        batch_size=8,
        batch_what="dialogues",
        device_default=None,
        check=_check_predict,
        fits=_seq2seq,
    ),
)
"""The summarization task, declared once: core gives it ``train``, ``evaluate`` and ``infer``."""

train = SPEC.train
evaluate = SPEC.evaluate_command
predict = SPEC.infer_command


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "infer": predict,
    "score": score,
    "lead3": lead3,
}
"""Commands found by core's launcher through the ``core.tasks`` entry point (``infer`` =
``predict``); the package's own scripts carry its name (``summarization-predict``, ...)."""


if __name__ == "__main__":  # self-check: every command's --help, Lead-3 + score on the sample
    import contextlib
    import io
    import tempfile

    from core.commands.spec import main
    from summarization.config import SAMPLES

    def _lead3_and_score() -> None:
        test, dev = SAMPLES["en"] / "test.jsonl", SAMPLES["en"] / "dev.jsonl"
        with tempfile.TemporaryDirectory() as tmp:
            lead, printed = Path(tmp) / "lead3.jsonl", io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()):
                assert lead3(["--data", str(test), "--out", str(lead)]) == 0
            with contextlib.redirect_stdout(printed):
                assert score(["--predictions", str(lead), "--references", str(test)]) == 0
            result = json.loads(printed.getvalue())
            print(
                f"lead-3 on the shipped test sample: rouge1={result['rouge1']:.4f} "
                f"rougeL={result['rougeL']:.4f} ({result['multi_reference'][:4]})"
            )
            assert score(["--predictions", str(lead), "--references", str(dev)]) == 2  # other ids

    main(COMMANDS, "summarization.cli", _lead3_and_score)
