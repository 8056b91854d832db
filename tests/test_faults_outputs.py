"""Faults outside training, through every task's real commands: outputs that would reach too far,
full and read-only disks under evaluate and merge, read-only caches, and messages that name
another task's config or model.

As in ``test_bad_input.py``, the cases run in one subprocess (``bad_input_driver.run_many``) that
calls each command function as its console script does, and hashes every watched folder around
every case: a refused command changes no file and creates none. Disk-full cases use a small
tmpfs, read-only cases a read-only bind mount (both need root; the tests skip where mounting
fails) of a real ``tiny`` summarization run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.testing.toy import child_env

pytestmark = [pytest.mark.slow, pytest.mark.faults]

HERE = Path(__file__).parent
REPO = HERE.parent
DRIVER = [
    sys.executable,
    "-c",
    f"import sys; sys.path.insert(0, {str(HERE)!r}); import bad_input_driver as d; d.run_many()",
]
QUICK = [
    "trainer.accelerator=cpu",
    "logger.progress_bar=false",
    "logger.plot=false",
    "trainer.max_steps=2",
    "trainer.val_every_n_steps=1000",
    "trainer.batch_size=4",
    "data.max_train_samples=16",
    "data.max_val_samples=4",
    "generation.max_new_tokens=4",
]


def _mount(args: list[str]) -> str | None:
    """Run ``mount ARGS``; the reason it failed, or None."""
    if os.geteuid() != 0:
        return "mounts need root"
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount {' '.join(args)}: {done.stderr.strip()}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``view`` (a read-only bind mount); skips where it cannot."""
    view.mkdir(parents=True, exist_ok=True)
    reason = _mount(["--bind", str(source), str(view)])
    if reason is None:
        reason = _mount(["-o", "remount,bind,ro", str(view)])
        if reason is not None:
            _umount(view)
    if reason is not None:
        pytest.skip(f"no read-only bind mount here: {reason}")
    try:
        yield view
    finally:
        _umount(view)


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``path``; skips where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    reason = _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if reason is not None:
        pytest.skip(f"no tmpfs here: {reason}")
    try:
        yield path
    finally:
        _umount(path)


def drive(cases: list[dict], watched: list[Path], env: dict[str, str]) -> list[dict]:
    """Run ``cases`` in one driver process; their results in order."""
    done = subprocess.run(
        DRIVER,
        input=json.dumps({"watched": [str(w) for w in watched], "cases": cases}),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def check(cases: list[dict], results: list[dict]) -> list[str]:
    """Problems: a wrong exit code, a traceback, a message without its fragment, a changed or new
    file where the case allows none."""
    problems = []
    for case, result in zip(cases, results, strict=True):
        what = f"{case['task']} {case['command']} {' '.join(case['argv'])}"
        last = last_line(result["stderr"])
        if result["code"] != case["code"]:
            problems.append(f"{what}: exit code {result['code']}\n{result['stderr'][-2000:]}")
        elif "Traceback" in result["stderr"]:
            problems.append(f"{what}: traceback\n{result['stderr'][-2000:]}")
        elif any(f not in last for f in case["fragments"]):
            problems.append(f"{what}: message {last!r} lacks {case['fragments']!r}")
        if not case.get("may_write") and (result["changed"] or result["created"]):
            problems.append(f"{what}: changed {result['changed']}, created {result['created']}")
    return problems


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's folder: a finished ``tiny`` summarization run, a copy of its model outside any
    run, a data file, a LoRA adapter on the tiny Llama base; caches in their own folder."""
    root = tmp_path_factory.mktemp("user")
    cache = tmp_path_factory.mktemp("cache")
    paths = {"root": root, "cache": cache}
    from summarization.cli import train
    from summarization.config import SAMPLES

    code = train(
        ["-c", "tiny", f"run.root={root / 'runs'}", f"data.cache_dir={cache / 'tokens'}", *QUICK]
    )
    assert code == 0
    (run,) = [p for p in (root / "runs").iterdir() if not p.name.startswith(".")]
    paths["run"] = run
    paths["ckpt"] = next((run / "checkpoints").glob("step-*"))
    paths["bart"] = root / "bart"
    shutil.copytree(run / "final", paths["bart"])
    paths["dialogues"] = root / "dialogues.jsonl"
    shutil.copyfile(SAMPLES["en"] / "dev.jsonl", paths["dialogues"])
    paths["user_file"] = root / "results.jsonl"
    paths["user_file"].write_text('{"mine": 1}\n', encoding="utf-8")

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from lora_llm.config import ModelConfig, TinyModelConfig
    from lora_llm.model import build_tiny_base, load_tokenizer

    base = build_tiny_base(
        TinyModelConfig(), load_tokenizer(ModelConfig(name="tiny")), root / "lora" / "base"
    )
    get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])
    ).save_pretrained(root / "lora" / "final")
    paths["adapter"] = root / "lora" / "final"
    paths["base_bytes"] = (base / "model.safetensors").stat().st_size
    return paths


def test_outputs_never_reach_an_input_or_a_model_run_or_checkpoint_folder_and_other_tasks_are_named(
    world, tmp_path
):
    w = {k: str(v) for k, v in world.items()}
    lora_preset = REPO / "packages/lora_llm/src/lora_llm/presets/tiny.yaml"
    sum_preset = REPO / "packages/summarization/src/summarization/presets/tiny.yaml"
    data = ["--data", w["dialogues"]]
    cases = [
        # --overwrite never replaces an input: the split's own data file.
        (
            "summarization",
            "evaluate",
            ["--model", w["bart"], "--split", "dev", "--out", w["dialogues"], "--overwrite"]
            + [f"data.val_file={w['dialogues']}"],
            2,
            [f"'{w['dialogues']}' is the input file of --split dev"],
        ),
        # ... nor anything inside a model, run or checkpoint folder.
        (
            "summarization",
            "evaluate",
            ["--model", w["bart"], *data, "--out", f"{w['bart']}/config.json", "--overwrite"],
            2,
            [f"lies inside the model folder '{w['bart']}'", f"e.g. {w['root']}/config.json"],
        ),
        (
            "summarization",
            "evaluate",
            ["--model", f"{w['run']}/final", *data, "--out", f"{w['run']}/final/x.jsonl"],
            2,
            [f"lies inside the model folder '{w['run']}/final'"],
        ),
        (
            "summarization",
            "evaluate",
            ["--model", w["bart"], *data, "--out", f"{w['ckpt']}/x.jsonl", "--overwrite"],
            2,
            [f"lies inside the checkpoint folder '{w['ckpt']}'"],
        ),
        (
            "summarization",
            "predict",
            ["--model", w["bart"], *data, "--out", f"{w['run']}/summary.json", "--overwrite"],
            2,
            [f"lies inside the run folder '{w['run']}'"],
        ),
        (
            "lora_llm",
            "merge",
            ["--model", w["adapter"], "--out", f"{w['bart']}/merged"],
            2,
            [f"lies inside the model folder '{w['bart']}'"],
        ),
        # Another task's config or model is named as such.
        (
            "summarization",
            "train",
            ["-c", str(lora_preset), f"run.root={tmp_path / 'runs'}"],
            2,
            ["this config is for lora_llm", "`uv run --package lora_llm train -c"],
        ),
        (
            "summarization",
            "train",
            ["-c", "gpt2", f"run.root={tmp_path / 'runs'}"],
            2,
            ["this config is for lora_llm ('gpt2' is a preset of lora_llm)"],
        ),
        (
            "lora_llm",
            "train",
            ["-c", str(sum_preset), f"run.root={tmp_path / 'runs'}"],
            2,
            ["this config is for summarization", "uv run --package summarization"],
        ),
        (
            "lora_llm",
            "evaluate",
            ["--model", f"{w['run']}/final"],
            2,
            [f"was trained by the summarization task (run '{w['run']}'", "--package summarization"],
        ),
        (
            "lora_llm",
            "infer",
            ["--model", f"{w['run']}/final", "--prompt", "hello"],
            2,
            [f"was trained by the summarization task (run '{w['run']}'", "--package summarization"],
        ),
        (
            "qwen_vl",
            "evaluate",
            ["--model", w["run"]],
            2,
            ["was trained by the summarization task", "uv run --package summarization evaluate"],
        ),
        (
            "lora_llm",
            "evaluate",
            ["--model", w["bart"]],
            2,
            ["has no adapter_config.json (it holds a bart model (BartForConditionalGeneration))"],
        ),
        (
            "qwen_vl",
            "evaluate",
            ["--model", w["bart"]],
            2,
            ["holds a bart model (BartForConditionalGeneration), which the qwen_vl task cannot"],
        ),
    ]
    cases = [
        {"task": t, "command": c, "argv": a, "code": code, "fragments": f}
        for t, c, a, code, f in cases
    ]
    env = child_env(
        QWEN_VL_CACHE=str(world["cache"] / "qwen_vl"),
        HF_DATASETS_CACHE=str(world["cache"] / "datasets"),
    )
    problems = check(cases, drive(cases, [world["root"]], env))
    assert not problems, "\n\n".join(problems)
    assert not (tmp_path / "runs").exists()


def test_merge_on_a_full_disk_leaves_no_half_made_folder_and_names_the_space(world, tmp_path):
    # Room for the weights' estimate with its margin but not for the tokenizer after them: the
    # check before writing passes, the write itself fills the disk.
    tight = (int(world["base_bytes"] * 1.05) // 4096 + 4) * 4096
    with small_disk(tmp_path / "tiny", 64 * 1024) as tiny, small_disk(tmp_path / "tight", tight):
        cases = [
            {
                "task": "lora_llm",
                "command": "merge",
                "argv": ["--model", str(world["adapter"]), "--out", str(out), "--device", "cpu"],
                "code": 1,
                "fragments": fragments,
            }
            for out, fragments in (
                (
                    tiny / "merged",
                    [f"Not enough space to write the merged model to '{tiny}/merged'", "needed"],
                ),
                (
                    tmp_path / "tight" / "merged",
                    ["Could not write the merged model", "the disk is full", "needed"],
                ),
            )
        ]
        results = drive(cases, [world["root"], tiny, tmp_path / "tight"], child_env())
        problems = check(cases, results)
        assert not problems, "\n\n".join(problems)
        assert not any(tiny.iterdir()) and not any((tmp_path / "tight").iterdir()), (
            "a half-made merged folder was left behind"
        )


def test_evaluate_of_a_read_only_run_prints_its_scores_and_full_or_read_only_outputs_exit_1(
    world, tmp_path
):
    run_name = world["run"].name
    with (
        read_only_view(world["root"] / "runs", tmp_path / "archive") as archive,
        small_disk(tmp_path / "full", 16 * 1024) as full,
    ):
        with contextlib.suppress(OSError), open(full / "filler", "wb") as handle:
            while True:  # until the disk is full
                handle.write(b"x" * 1024)
                handle.flush()
        model = ["--model", f"{archive}/{run_name}/final", "--split", "dev", "--limit", "2"]
        cases = [
            {
                "task": "summarization",
                "command": "evaluate",
                "argv": [*model, "data.cache_dir=null"],
                "code": 0,
                "fragments": [
                    "note: the scores above were not saved in the run",
                    f"'{archive}/{run_name}/eval'",
                    "read-only",
                ],
            },
            {
                "task": "summarization",
                "command": "evaluate",
                "argv": [*model, "--out", f"{archive}/x.jsonl"],
                "code": 1,
                "fragments": [f"'{archive}/x.jsonl'", "the file system is read-only"],
            },
            {
                "task": "summarization",
                "command": "evaluate",
                "argv": [*model, "--out", f"{full}/x.jsonl"],
                "code": 1,
                "fragments": [f"'{full}/x.jsonl'", "the disk is full", "needed"],
            },
        ]
        before = sorted(p.name for p in full.iterdir())
        # A read-only HOME, hence a read-only default datasets cache: it falls back with a note.
        (tmp_path / "tmp").mkdir()
        env = child_env(HOME=str(archive), TMPDIR=str(tmp_path / "tmp"))
        for key in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "QWEN_VL_CACHE"):
            env.pop(key, None)
        results = drive(cases, [archive, full], env)
        problems = check(cases, results)
        assert not problems, "\n\n".join(problems)
        scores = json.loads(results[0]["stdout"].strip().splitlines()[-1])
        assert "rougeL" in scores and scores["samples"] == 2
        assert "the tokenised-data cache" in results[0]["stderr"]
        assert "HF_DATASETS_CACHE" in results[0]["stderr"]
        assert f"using '{tmp_path / 'tmp'}/finetune-cache-" in results[0]["stderr"]
        assert json.loads(results[2]["stdout"].strip().splitlines()[-1])["samples"] == 2
        assert sorted(p.name for p in full.iterdir()) == before, "a partial output was left"


def test_a_read_only_qwen_vl_cache_falls_back_and_says_which_variable_to_set(
    tmp_path, monkeypatch, caplog
):
    from qwen_vl.synth import SynthSettings, builtin_data

    (tmp_path / "cache").mkdir()
    with read_only_view(tmp_path / "cache", tmp_path / "ro") as ro:
        monkeypatch.setenv("QWEN_VL_CACHE", str(ro))
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
        path = builtin_data("dev", SynthSettings(n_train=2, n_dev=2, seed=5))
        assert path.is_file() and str(path).startswith(str(tmp_path / "tmp"))
        assert not any(ro.iterdir())
    assert "QWEN_VL_CACHE" in caplog.text and str(ro) in caplog.text


def test_a_sweep_value_spelled_twice_is_refused(tmp_path, capsys):
    from core.sweep import sweep_command
    from core.testing.toy import train as toy_train

    for axis, spellings in (
        ("optim.lr=1e-3,3e-4,0.001", "'1e-3' and '0.001' are both 0.001"),
        ("trainer.batch_size=8,08", "'8' and '08' are both 8"),
    ):
        code = sweep_command(
            [f"run.root={tmp_path / 'runs'}", "trainer.accelerator=cpu", axis],
            task="toy",
            train=toy_train,
            train_cmd=["unused"],
        )
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert f"Sweep axis '{axis}' gives one value twice: {spellings}" in err, err
        assert not (tmp_path / "runs").exists()


def test_make_data_on_a_full_disk_exits_1_and_leaves_no_half_made_folder(tmp_path, capsys):
    """qwen-vl-make-data draws hundreds of images: a disk that fills on the way ends in one
    paragraph naming the folder and no half-made data set (the folder was the command's own)."""
    from qwen_vl.cli import make_data

    with small_disk(tmp_path / "small", 96 * 1024) as small:
        code = make_data(["--out", str(small / "counting"), "--n", "400"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err and "the disk is full" in err
        assert f"'{small / 'counting'}" in err
        assert not any(small.iterdir()), "a half-made data set was left behind"
