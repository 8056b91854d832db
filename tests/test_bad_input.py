"""Bad input through every task's real commands: exit code 2, one ``error:`` paragraph naming the
file and line or the key, no traceback, and every file that existed before the command
byte-for-byte unchanged after it (and nothing new written next to it).

The cases of one task run in one subprocess (``bad_input_driver.py``): each command function is
called as its console script calls it (``sys.exit(command(argv))``), so its return value is the
exit code the user sees, and an exception escaping it is the traceback the user would see. The
driver snapshots the test folder around every case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.testing.toy import child_env

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("bad_input_driver.py")

# (command, argv, fragment of the one-line message); {name} is a path prepared below.
COMMON_TRAIN = [
    (
        "train",
        ["-c", "tiny", "run.dir={user_dir}"],
        "holds files that are not a training run (notes.txt)",
    ),
    ("train", ["-c", "tiny", "run.dir={toy_run}"], "is a run of the toy task, not of {task}"),
    ("train", ["-c", "tiny", "run.dir={a_file}"], "is a file; a run folder is expected"),
    (
        "train",
        ["-c", "tiny", "trainer.accelerator=gpu"],
        "Config key 'trainer.accelerator' = gpu, but this machine has no CUDA GPU",
    ),
    (
        "train",
        ["-c", "tiny", "trainer.accelerator=cuda"],
        "Config key 'trainer.accelerator' = cuda, but this machine has no CUDA GPU",
    ),
    (
        "train",
        ["-c", "tiny", "trainer.devices=0"],
        "Config key 'trainer.devices' = 0: at least one device is needed",
    ),
]

CASES = {
    "summarization": COMMON_TRAIN
    + [
        (
            "evaluate",
            ["--model", "{s2s_model}", "--data", "{sum_data}", "--out", "{sum_data}"],
            "is the input file of --data",
        ),
        (
            "predict",
            ["--model", "{s2s_model}", "--data", "{sum_data}", "--out", "{sum_data}"],
            "is the input file of --data",
        ),
        (
            "score",
            ["--predictions", "{sum_data}", "--references", "{sum_refs}", "--out", "{sum_data}"],
            "is the input file of --predictions",
        ),
        ("lead3", ["--data", "{sum_data}", "--out", "{sum_data}"], "is the input file of --data"),
        (
            "evaluate",
            ["--model", "{s2s_model}", "--data", "{sum_data}", "--out", "{user_file}"],
            "already exists, and this command does not overwrite",
        ),
        (
            "evaluate",
            ["--model", "{s2s_model}", "--data", "{sum_data}", "--out", "{user_dir}"],
            "is a folder; give a file path",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_file={bad_utf8}"],
            "{bad_utf8}:2:29: not UTF-8 text (byte 0xb4) in data.train_file",
        ),
        (
            "predict",
            ["--model", "{s2s_model}", "--data", "{bad_utf8}"],
            "{bad_utf8}:2:29: not UTF-8 text (byte 0xb4) in --data",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_file={user_dir}"],
            "(data.train_file) is a folder, not a file",
        ),
        ("train", ["-c", "tiny", "data.train_file={empty}"], "(data.train_file) holds no rows"),
        (
            "train",
            ["-c", "tiny", "data.train_file={bad_json}"],
            "{bad_json}:2:27: not valid JSON (Expecting value)",
        ),
    ],
    "lora_llm": COMMON_TRAIN
    + [
        (
            "infer",
            ["--model", "{adapter}", "--data", "{lora_data}", "--out", "{lora_data}"],
            "is the input file of --data",
        ),
        (
            "evaluate",
            ["--model", "{adapter}", "--data", "{lora_data}", "--out", "{lora_data}"],
            "is the input file of --data",
        ),
        (
            "merge",
            ["--model", "{adapter}", "--out", "{user_dir}"],
            "already holds files this command did not write (notes.txt)",
        ),
        ("merge", ["--model", "{adapter}", "--out", "{a_file}"], "is a file; a folder is expected"),
        ("merge", ["--model", "{adapter}", "--out", "{adapter}"], "holds the input of --model"),
        (
            "prepare",
            ["-c", "tiny", "--out", "{user_dir}"],
            "already holds files this command did not write (notes.txt)",
        ),
        ("prepare", ["-c", "tiny", "--out", "{a_file}"], "is a file; a folder is expected"),
        (
            "train",
            ["-c", "tiny", "data.train_files=[{bad_utf8}]"],
            "{bad_utf8}:2:29: not UTF-8 text (byte 0xb4) in data.train_files",
        ),
        (
            "infer",
            ["--model", "{adapter}", "--data", "{bad_utf8}"],
            "{bad_utf8}:2:29: not UTF-8 text (byte 0xb4) in --data",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_files=[{user_dir}]"],
            "is a folder with neither a dataset",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_files=[{empty}]"],
            "(data.train_files) holds no records",
        ),
    ],
    "qwen_vl": COMMON_TRAIN
    + [
        (
            "evaluate",
            ["--model", "{vl_model}", "--data", "{vl_data}", "--out", "{vl_data}"],
            "is the input file of --data",
        ),
        (
            "infer",
            ["--model", "{vl_model}", "--data", "{vl_questions}", "--out", "{vl_questions}"],
            "is the input file of --data",
        ),
        (
            "make-data",
            ["--out", "{user_dir}", "--n", "2"],
            "already holds files this command did not write (notes.txt)",
        ),
        ("make-data", ["--out", "{a_file}", "--n", "2"], "is a file; a folder is expected"),
        (
            "make-data",
            ["--out", "{drawn}", "--n", "2"],
            "already holds files this command did not write",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_file={bad_utf8}"],
            "{bad_utf8}:2:29: not UTF-8 text (byte 0xb4) in data.train_file",
        ),
        (
            "infer",
            ["--model", "{vl_model}", "--data", "{bad_utf8}"],
            "{bad_utf8}:2:29: not UTF-8 text (byte 0xb4) in --data",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_file={user_dir}"],
            "(data.train_file) is a folder, not a file",
        ),
        (
            "train",
            ["-c", "tiny", "data.train_file={vl_data}", "data.val_file={empty}"],
            "(data.val_file) holds no records",
        ),
        ("train", ["-c", "tiny", "data.train_file={empty}"], "(data.train_file) holds no records"),
    ],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's files the bad commands meet: data, a folder of notes, a finished run of another
    task."""
    root = tmp_path_factory.mktemp("user")
    paths: dict[str, Path] = {"root": root}
    paths["user_dir"] = root / "my_folder"
    paths["user_dir"].mkdir()
    (paths["user_dir"] / "notes.txt").write_text("my notes\n", encoding="utf-8")
    paths["user_file"] = root / "results.jsonl"
    paths["user_file"].write_text('{"mine": 1}\n', encoding="utf-8")
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("just a file\n", encoding="utf-8")
    paths["empty"] = root / "empty.jsonl"
    paths["empty"].write_text("\n\n", encoding="utf-8")
    paths["bad_utf8"] = root / "cp949.jsonl"
    line = (
        '{"fname": "a", "dialogue": "대화", "summary": "요약", "instruction": "x", "output": "y"}\n'
    )
    paths["bad_utf8"].write_bytes(
        b'{"fname": "z", "dialogue": "hi", "summary": "hi"}\n' + line.encode("cp949")
    )
    paths["bad_json"] = root / "broken.jsonl"
    paths["bad_json"].write_text(
        '{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "summary": }\n',
        encoding="utf-8",
    )
    paths["sum_data"] = root / "dialogues.jsonl"
    paths["sum_data"].write_text(
        '{"fname": "d1", "dialogue": "#Person1#: hi", "summary": "a greeting"}\n', encoding="utf-8"
    )
    paths["sum_refs"] = root / "references.jsonl"
    paths["sum_refs"].write_text('{"fname": "d1", "summary": "a greeting"}\n', encoding="utf-8")
    paths["lora_data"] = root / "prompts.jsonl"
    paths["lora_data"].write_text('{"instruction": "Say hi.", "output": "Hi."}\n', encoding="utf-8")
    # Model folders as save_pretrained writes them (the commands stop before loading weights).
    from transformers import BartConfig, BartForConditionalGeneration

    paths["s2s_model"] = root / "bart"
    BartForConditionalGeneration(
        BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=32,
        )
    ).save_pretrained(paths["s2s_model"])
    paths["adapter"] = root / "adapter"
    paths["adapter"].mkdir()
    (paths["adapter"] / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "tiny"}', encoding="utf-8"
    )
    paths["vl_model"] = root / "vl"
    paths["vl_model"].mkdir()
    (paths["vl_model"] / "config.json").write_text('{"model_type": "qwen2_5_vl"}', encoding="utf-8")
    from qwen_vl.synth import SynthSettings, write_dataset

    paths["drawn"] = root / "counting"
    write_dataset(paths["drawn"], SynthSettings(n_train=4, n_dev=2, seed=1))
    paths["vl_data"] = paths["drawn"] / "train.jsonl"
    paths["vl_questions"] = root / "questions.jsonl"
    paths["vl_questions"].write_text(
        '{"id": "q1", "prompt": "How many circles?", "images": []}\n', encoding="utf-8"
    )
    # A finished run of another task (core's toy task, 2 steps).
    from core.config.loader import load_config
    from core.engine.trainer import Trainer
    from core.testing.toy import ToyConfig, ToyTask

    cfg = load_config(
        ToyConfig,
        overrides=[
            f"run.root={root / 'runs'}",
            "trainer.max_steps=2",
            "trainer.accelerator=cpu",
            "logger.progress_bar=false",
            "logger.plot=false",
        ],
    )
    paths["toy_run"] = Trainer(cfg, ToyTask(cfg), argv=["pytest"]).fit().run_dir
    return paths


@pytest.mark.parametrize("task", sorted(CASES))
def test_bad_input_exits_2_with_one_paragraph_and_leaves_every_file_unchanged(
    task, files, tmp_path
):
    cases = []
    for command, argv, fragment in CASES[task]:
        fill = {k: str(v) for k, v in files.items()} | {"task": task}
        cases.append(
            {
                "command": command,
                "argv": [a.format(**fill) for a in argv]
                + ([f"run.root={tmp_path / 'runs'}"] if command == "train" else []),
                "fragment": fragment.format(**fill),
            }
        )
    env = child_env(
        QWEN_VL_CACHE=str(tmp_path / "cache"), HF_DATASETS_CACHE=str(tmp_path / "cache")
    )
    done = subprocess.run(
        [sys.executable, str(DRIVER), task, str(files["root"])],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(
        next(line for line in done.stdout.splitlines() if line.startswith("RESULTS ")).removeprefix(
            "RESULTS "
        )
    )
    problems = []
    for case, result in zip(cases, results, strict=True):
        last = result["stderr"].strip().splitlines()[-1] if result["stderr"].strip() else ""
        what = f"{case['command']} {' '.join(case['argv'])}"
        if result["code"] != 2:
            problems.append(f"{what}: exit code {result['code']}\n{result['stderr'][-1500:]}")
        elif "Traceback" in result["stderr"]:
            problems.append(f"{what}: traceback\n{result['stderr'][-1500:]}")
        elif not last.startswith("error: ") or case["fragment"] not in last:
            problems.append(f"{what}: message {last!r} lacks {case['fragment']!r}")
        if result["changed"] or result["created"]:
            problems.append(f"{what}: changed {result['changed']}, created {result['created']}")
    assert not problems, "\n\n".join(problems)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), (
        "no run folder for bad input"
    )
