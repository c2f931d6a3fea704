"""SFT and reward-model trainers on tiny random models: they learn, log, checkpoint and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from remesh.checkpoint import load_hf, save_hf
from remesh.config import load_config
from remesh.train.configs import RMConfig, SFTConfig
from remesh.train.metrics import read_metrics
from remesh.train.optim import lr_multiplier, warmup_outlasts_run
from remesh.train.rm import RMTask, bradley_terry_loss, train_rm
from remesh.train.sft import train_sft
from tests.models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder (with tokenizer) and small SFT / preference files."""
    root = tmp_path_factory.mktemp("train")
    tok = tiny_tokenizer(root / "tok")
    save_hf(tiny_model("llama", vocab_size=len(tok), n_layers=2), root / "model", tok)
    animals = ["cat", "dog", "bird", "fish", "horse", "mouse", "frog", "bear"]
    with open(root / "sft.jsonl", "w") as f:
        for i in range(48):
            a = animals[i % len(animals)]
            f.write(json.dumps({"prompt": f"Name an animal number {i}.", "response": f"The {a} is nice."}) + "\n")
    with open(root / "prefs.jsonl", "w") as f:
        for i in range(48):
            a = animals[i % len(animals)]
            f.write(json.dumps({"prompt": f"Describe the {a}.", "chosen": f"The {a} is good good good.",
                                "rejected": f"The {a} is bad bad bad."}) + "\n")
    return root


def _overrides(ws: Path, out: str, *extra: str) -> list[str]:
    return [f"model.path={ws / 'model'}", f"trainer.output_dir={ws / out}", "trainer.progress=false",
            "trainer.tensorboard=true", *extra]


def test_sft_learns_and_writes_outputs(workspace):
    """Loss falls on a memorisable set; metrics, TensorBoard events and a loadable HF model are written."""
    cfg = load_config(SFTConfig, None, _overrides(
        workspace, "sft", f"data.train={workspace / 'sft.jsonl'}", "trainer.max_steps=20", "trainer.epochs=5", "trainer.batch_size=8",
        "trainer.micro_batch_tokens=128", "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.eval_every=10"))
    result = train_sft(cfg)
    rows = [r for r in read_metrics(result.metrics_file) if "train/loss" in r]
    assert len(rows) == 20
    assert rows[-1]["train/loss"] < 0.6 * rows[0]["train/loss"]
    assert all(r["perf/tokens_per_s"] > 0 for r in rows)
    assert result.eval_metrics["eval/loss"] < rows[0]["train/loss"]
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))
    reloaded = load_hf(result.final_model)
    assert reloaded.args.n_layers == 2 and (result.final_model / "tokenizer.json").exists()


def test_every_eval_is_logged_and_none_without_an_eval_set(workspace):
    """eval_every=3 with log_every=4: the evals at steps 3 and 6 (the final one) are logged along
    with steps 4 and 6. With no held-out rows (eval_fraction=0) no eval metric is logged at all,
    rather than the loss of an empty set."""
    logged = {}
    for fraction in (0.25, 0.0):
        cfg = load_config(SFTConfig, None, _overrides(
            workspace, f"sft_eval_{fraction}", f"data.train={workspace / 'sft.jsonl'}",
            f"data.eval_fraction={fraction}",
            "trainer.max_steps=6", "trainer.batch_size=4", "trainer.micro_batch_tokens=128", "trainer.log_every=4",
            "trainer.eval_every=3", "trainer.tensorboard=false"))
        logged[fraction] = {}
        for row in read_metrics(train_sft(cfg).metrics_file):  # the final eval is a row of its own
            logged[fraction].setdefault(row["step"], set()).update(row)
    assert sorted(logged[0.25]) == [3, 4, 6] and sorted(logged[0.0]) == [4, 6]
    assert all("eval/loss" in logged[0.25][step] for step in (3, 6)) and "eval/loss" not in logged[0.25][4]
    assert not any(k.startswith("eval/") for keys in logged[0.0].values() for k in keys)


def test_reward_model_learns_pairwise_preference(workspace):
    """Pairwise accuracy reaches 1.0 on preferences decided by one word; the model saves as SequenceClassification."""
    cfg = load_config(RMConfig, None, _overrides(
        workspace, "rm", f"data.train={workspace / 'prefs.jsonl'}", "trainer.max_steps=15", "trainer.epochs=5", "trainer.batch_size=8",
        "optim.lr=3e-3", "trainer.eval_every=0", "data.eval_fraction=0.25"))
    result = train_rm(cfg)
    assert result.eval_metrics["eval/accuracy"] == 1.0
    assert result.eval_metrics["eval/loss"] < 0.3
    config = json.loads((result.final_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1  # num_labels=1


def test_bradley_terry_hand_computed():
    """-log sigmoid(r_c - r_r): margin 0 -> log 2; margin 2 -> log(1 + e^-2)."""
    loss = bradley_terry_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(loss, torch.tensor([0.693147, 0.126928]), atol=1e-6)


def test_rm_pairs_share_a_micro_batch(workspace):
    """A pair is one packing item, so the token budget never splits chosen from rejected."""
    task = RMTask(load_config(RMConfig, None, []))

    class Ex:
        chosen_ids, rejected_ids = [1] * 30, [2] * 20

    assert task.length(Ex()) == 50 and task.units([Ex(), Ex()]) == 2


def test_lr_schedule_hand_computed():
    """Warmup 2 then cosine to min_lr_ratio over the remaining 4 steps."""
    from remesh.train.configs import OptimConfig

    cfg = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    got = [lr_multiplier(s, 6, cfg) for s in range(6)]
    want = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + 0.7071068), 0.55, 0.1 + 0.9 * 0.5 * (1 - 0.7071068)]
    assert got == pytest.approx(want, abs=1e-6)
    linear = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_multiplier(s, 4, linear) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # a warmup longer than the run: the peak is never reached, which a run says once
    assert warmup_outlasts_run(cfg, 2, "optim") is None
    assert warmup_outlasts_run(OptimConfig(lr=1.0, warmup_steps=8), 2, "optim") == (
        "remesh: warning: optim.warmup_steps=8 is more than the run's 2 optimizer steps: the learning rate never "
        "reaches optim.lr (at most 0.25 of it)")


def _sft_cmd(ws: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "remesh", "sft", str(REPO / "configs" / "sft_demo.yaml"),
            *_overrides(ws, out, f"data.train={ws / 'sft.jsonl'}", "trainer.max_steps=30", "trainer.epochs=5", "trainer.batch_size=6",
                        "trainer.micro_batch_tokens=96", "optim.lr=1e-3", "trainer.eval_every=0",
                        "trainer.tensorboard=false", "data.max_prompt_len=64", "data.max_len=128", *extra)]


def _losses(path: Path) -> dict[int, float]:
    """The last logged train loss of every step (a resumed run re-logs the steps after its checkpoint)."""
    return {r["step"]: r["train/loss"] for r in read_metrics(path) if "train/loss" in r}


def test_killed_run_resumes_bitwise(workspace):
    """SIGKILL a run after a checkpoint, resume with trainer.resume=latest: every later loss equals
    the uninterrupted run's bit for bit (CPU, fp32)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(_sft_cmd(workspace, "full"), check=True, env=env, timeout=240, capture_output=True)
    full = _losses(workspace / "full" / "metrics.jsonl")
    assert len(full) == 30

    proc = subprocess.Popen(_sft_cmd(workspace, "killed", "trainer.save_every=1", "trainer.keep_checkpoints=3"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = workspace / "killed" / "checkpoints"
    deadline = time.time() + 180
    while not (ckpts / "step_000004" / "trainer_state" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its 4th checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = max(_losses(workspace / "killed" / "metrics.jsonl"))
    assert killed_at < 30, "the run finished before it was killed"

    subprocess.run(_sft_cmd(workspace, "killed", "trainer.resume=latest", "trainer.save_every=1"), check=True,
                   env=env, timeout=240, capture_output=True)
    resumed = read_metrics(workspace / "killed" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "train/loss" in r] == list(range(1, 31))  # no step twice
    assert _losses(workspace / "killed" / "metrics.jsonl") == full  # exact float equality, every step


def test_a_resumed_runs_metrics_drop_the_killed_runs_later_steps(tmp_path):
    """A run killed after step 4 with its checkpoint at step 2: the resumed run logs steps 3 and 4
    again. TensorBoard shows each step once, with the resumed run's value, as metrics.jsonl does;
    and the rows kept are on disk before the resumed run logs any (it may be killed early too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from remesh.train.metrics import MetricsLogger

    killed = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 5):
        killed.log(step, {"loss": float(step)})
    killed.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True, resume_step=2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_fresh_run_neither_mixes_with_nor_silently_replaces_an_earlier_one(workspace, capsys):
    """A second fresh run into a folder holding a run is refused before any work, and the earlier
    run is left as it was: before, its step checkpoints outnumbered the new run's, so
    keep_checkpoints pruned each new one as it was written and resume=latest picked the old run.
    trainer.overwrite=true replaces it, at the run's first write: a run that fails its checks
    first removes nothing. The folder then holds the new run's outputs alone."""
    from remesh.cli import main

    out = workspace / "reused"

    def run(steps: int, *extra: str) -> int:
        return main(["sft", str(REPO / "configs/sft_demo.yaml"), *_overrides(
            workspace, "reused", f"data.train={workspace / 'sft.jsonl'}", f"trainer.max_steps={steps}",
            "trainer.epochs=5", "trainer.batch_size=8", "trainer.micro_batch_tokens=128", "trainer.eval_every=0",
            "trainer.save_every=2", "trainer.keep_checkpoints=2", "trainer.tensorboard=false", *extra)])

    def files() -> dict:
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    assert run(8) == 0
    before = files()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000004", "step_000006"]
    capsys.readouterr()

    assert run(4) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"remesh: error: trainer.output_dir: {out} holds an earlier run (metrics.jsonl, 2 step checkpoints, "
                   f"final/): continue it (trainer.resume=latest), write elsewhere (another trainer.output_dir) or "
                   f"replace it (trainer.overwrite=true)"), err
    assert run(4, "trainer.overwrite=true", f"data.train={workspace / 'absent.jsonl'}") == 2
    assert "absent.jsonl" in capsys.readouterr().err
    assert files() == before
    # an example longer than a micro-batch: found once the data loads, before the first write
    assert run(4, "trainer.overwrite=true", "trainer.micro_batch_tokens=8") == 2
    assert "trainer.micro_batch_tokens: 8 cannot hold the longest example (" in capsys.readouterr().err
    assert files() == before

    assert run(4, "trainer.overwrite=true") == 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000002"]
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 4

    # a run without step checkpoints cannot be continued: the error does not suggest it
    shutil.rmtree(out / "checkpoints")
    assert run(4) == 2
    assert capsys.readouterr().err.strip().endswith(
        "holds an earlier run (metrics.jsonl, final/): write elsewhere (another trainer.output_dir) or replace it "
        "(trainer.overwrite=true)")
    # resuming from another folder's checkpoint into this one would mix two runs as well
    assert run(4, f"trainer.resume={workspace / 'elsewhere' / 'checkpoints' / 'step_000004'}") == 2
    assert f"{out} holds another run (metrics.jsonl, final/): write elsewhere" in capsys.readouterr().err
    # continuing this folder's run and removing it contradict each other
    assert run(4, "trainer.resume=latest", "trainer.overwrite=true") == 2
    err = capsys.readouterr().err
    assert "trainer.overwrite=true would remove the run that trainer.resume=latest continues: set one of them" in err
    (workspace / "a_file").write_text("not a folder")
    assert main(["sft", str(REPO / "configs/sft_demo.yaml"), f"trainer.output_dir={workspace / 'a_file'}"]) == 2
    assert f"trainer.output_dir: {workspace / 'a_file'} is a file, not a folder" in capsys.readouterr().err


def test_a_resume_from_the_folders_own_checkpoints_is_its_own_run(tmp_path):
    """Resuming from a checkpoint of output_dir continues its run, written as the path is or with
    links resolved (a checkpoints/ that is a symlink elsewhere), relative or absolute; a folder
    holding a run refuses a resume from elsewhere."""
    from remesh.config import ConfigError
    from remesh.train.state import STATE_DIR, claim_output_dir

    out, store = tmp_path / "out", tmp_path / "disk2"
    (store / "step_000002").mkdir(parents=True)
    out.mkdir()
    (out / "checkpoints").symlink_to(store)
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    own = out / "checkpoints" / "step_000002"
    for resume in (own, out, Path(os.path.relpath(own))):
        claim_output_dir(out, str(resume), overwrite=False)
    with pytest.raises(ConfigError, match="holds another run"):
        claim_output_dir(out, str(tmp_path / "other" / "step_000002"), overwrite=False)
    # from an older checkpoint of its own, while later ones are there: they would mix
    for step in (2, 4):
        (store / f"step_00000{step}" / STATE_DIR).mkdir(parents=True, exist_ok=True)
        (store / f"step_00000{step}" / STATE_DIR / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds later checkpoints of that run \(step_000004\), which the resumed"):
        claim_output_dir(out, str(own), overwrite=False)
    claim_output_dir(out, str(out / "checkpoints" / "step_000004"), overwrite=False)
    claim_output_dir(out, "latest", overwrite=False)


def test_cli_config_errors_are_one_line(workspace, tmp_path, capsys):
    """Unknown key, wrong type, missing model path or data file: exit code 2 and one line naming it."""
    from remesh.cli import main

    demo = str(REPO / "configs/sft_demo.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("kind: sft\nmodel:\n  path: a: b\n")
    cases = [
        (["sft", demo, "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["sft", demo, "optim.lr=fast"], "optim.lr: expected float"),
        (["sft", demo, f"model.path={tmp_path / 'nope'}"], "does not exist"),
        (["sft", demo, f"model.path={workspace / 'model'}", f"data.train={tmp_path / 'missing.jsonl'}"],
         "missing.jsonl"),
        (["train", str(tmp_path / "absent.yaml")], "no such config file"),
        # `train` reads the file for its kind first: the same message, with the line
        (["train", str(bad_yaml)], "bad.yaml:3: invalid YAML"),
        (["sft", demo, "trainer.log_every=0"], "trainer: log_every must be >= 1, got 0"),
        (["sft", demo, "trainer.device=nowhere"], "trainer.device: unknown device 'nowhere'"),
        # another kind's config under a kind's command: named, not its first key as unknown
        (["rl", demo], "sft_demo.yaml: a kind: sft config; run it with `remesh sft` (or `remesh train`), not `remesh rl`"),
        (["rm", str(REPO / "configs/grpo.yaml")], "a kind: rl config; run it with `remesh rl`"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0], (argv, lines)
    # and through the installed entry point
    r = subprocess.run([sys.executable, "-m", "remesh", *cases[0][0]], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and cases[0][1] in r.stderr


def test_sft_under_bf16_autocast(workspace):
    """trainer.mixed_precision=bf16 runs (CPU autocast here, CUDA on GPUs) and gives finite losses near fp32's."""
    common = [f"data.train={workspace / 'sft.jsonl'}", "trainer.max_steps=2", "trainer.batch_size=4",
              "trainer.eval_every=0", "data.eval_fraction=0"]
    fp32 = train_sft(load_config(SFTConfig, None, _overrides(workspace, "fp32", *common)))
    bf16 = train_sft(load_config(SFTConfig, None, _overrides(workspace, "bf16", *common,
                                                              "trainer.mixed_precision=bf16")))
    a = [r["train/loss"] for r in read_metrics(fp32.metrics_file)]
    b = [r["train/loss"] for r in read_metrics(bf16.metrics_file)]
    assert len(a) == len(b) == 2 and all(abs(x - y) < 0.05 * x for x, y in zip(a, b))
