"""RL under an execution plan on gloo: PPO and ReMax on 4 CPU ranks give the one-process metrics
at a fixed seed; invalid plans are rejected before any process starts."""

from __future__ import annotations

import json
import math

import pytest

from remesh.rl.trainer import RLTrainer, train_rl
from remesh.train.metrics import read_metrics
from tests.test_rl import _config, _load, rl_workspace  # noqa: F401 (fixture)

# compared metrics and their tolerance: the plan sums gradients over dp and shards matmuls over
# tp, so floats differ in the last bits; sampled tokens are the same (per-sequence streams)
KEYS = ("reward/mean", "response/len_mean", "actor/loss", "actor/grad_norm", "kl/seq")
RTOL, ATOL = 1e-3, 1e-5

PLANS = {
    # generation as 2 replicas, training with tp=2 on the same ranks, ref / reward / critic elsewhere
    "ppo": "actor_gen=d2@0-1 actor_train=d1t2@0-1 ref_inf=d1@2 rew_inf=d1@3 critic_inf=d2@2-3 critic_train=d1t2@2-3",
    # sampled and greedy generation on disjoint meshes, concurrently (the sampled one tensor-parallel,
    # its peers agreeing on the adaptive drafting strategy); training across all four ranks
    "remax": "actor_gen=d1t2@0-1 actor_greedy=d2@2-3 ref_inf=d1t2@2-3 rew_inf=d4@0-3 actor_train=d2t2@0-3",
}
SECTIONS = {
    "ppo": {"algo": {"name": "ppo", "ppo_epochs": 1, "mini_batches": 2},
            "rollout": {"n_samples": 1, "migrate_every": 1}, "kl": {"coef": 0.05}},
    # the actor's Adam state sharded over its 2 data-parallel ranks (ZeRO-1)
    "remax": {"rollout": {"n_samples": 1}, "kl": {"coef": 0.05}, "actor_optim": {"zero": True}},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algo", ["ppo", "remax"])
def test_plan_gives_the_one_process_metrics(rl_workspace, algo, capfd):
    ws = rl_workspace
    base = _config(ws, algo, f"{algo}_one", **SECTIONS[algo])
    base["trainer"]["iterations"] = 2
    if algo == "ppo":  # prompts of 59, 26, 26 and 26 tokens: balanced by tokens, the long one alone
        prompts = ws / "uneven_prompts.jsonl"  # is one generation instance's share
        prompts.write_text("\n".join(json.dumps({"prompt": p})
                                     for p in ["Say something long about item one, in detail.", "A", "B", "C"]))
        base["data"]["train"] = str(prompts)
        base["trainer"]["prompts_per_iter"] = 4
    one = RLTrainer(_load(ws, base, f"{algo}_one")).fit()
    planned = _config(ws, algo, f"{algo}_plan", **SECTIONS[algo])
    planned["data"], planned["trainer"]["prompts_per_iter"] = base["data"], base["trainer"]["prompts_per_iter"]
    planned["trainer"].update(iterations=2, nproc=4)
    planned["plan"] = PLANS[algo]
    result = train_rl(_load(ws, planned, f"{algo}_plan"))
    a, b = read_metrics(one.metrics_file), read_metrics(result.metrics_file)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        # and the reward terms' means (remax's rew_inf=d4 scores in four shares, merged by their sizes)
        terms = tuple(k for k in ra if k.startswith("reward/") and k.endswith(":fraction_of_a"))
        assert len(terms) == 1 and abs(ra[terms[0]] - ra["reward/mean"]) < 1e-6  # one term, weight 1
        for k in KEYS + terms + {"ppo": ("critic/loss",), "remax": ("reward/greedy_mean",)}[algo]:
            assert abs(ra[k] - rb[k]) <= ATOL + RTOL * abs(ra[k]), (k, ra[k], rb[k])
    assert (result.final_model / "model.safetensors").exists() or (result.final_model / "config.json").exists()
    out = capfd.readouterr().out
    if algo == "ppo":  # the two generation instances exchanged samples, which changed no metric
        import re

        moved = re.search(r"actor_gen sample migration: \d+ rounds, (\d+) sequences moved", out)
        assert moved and int(moved.group(1)) >= 1  # loads 1 and 3 at the first exchange
    else:  # rank 0 keeps the Adam state of about half its parameters
        import re

        for call in ("actor_gen", "actor_greedy"):  # speculation metrics, merged over the ranks
            assert all(r[f"perf/{call}/tokens_per_seq_step"] >= 1 and 0 <= r[f"perf/{call}/spec_step_frac"] <= 1
                       for r in a + b)

        mine, total = re.search(r"actor optimizer: ZeRO-1 over dp=2, Adam state of ([\d,]+) of this rank's ([\d,]+)",
                                out).groups()
        assert 0.3 < int(mine.replace(",", "")) / int(total.replace(",", "")) < 0.7


@pytest.mark.timeout(300)
def test_a_critic_in_another_dtype_than_the_actor_moves_in_its_own(rl_workspace):
    """A bf16 actor beside an fp32 critic, whose inference and training layouts differ: the
    critic's shards move in fp32 buffers. Moved by the actor's spec, the critic came out of
    mixed dtypes and its inference failed."""
    cfg = _config(rl_workspace, "ppo", "dtypes", **SECTIONS["ppo"], actor={"dtype": "bfloat16"})
    cfg["critic"] = {"path": cfg["actor"]["path"], "dtype": "float32"}
    cfg["trainer"].update(iterations=1, nproc=4, prompts_per_iter=4)
    cfg["plan"] = PLANS["ppo"]
    rows = read_metrics(train_rl(_load(rl_workspace, cfg, "dtypes")).metrics_file)
    assert len(rows) == 1 and math.isfinite(rows[0]["critic/loss"]) and math.isfinite(rows[0]["actor/loss"])


@pytest.mark.timeout(600)
def test_pipeline_stages_give_the_one_process_metrics(rl_workspace):
    """PPO with pipeline stages in every kind of call: generation across two stages, inference
    and 1F1B training with pp x dp and pp x tp, a learned reward model (plus a rule term) with
    pp x tp, on a tied model (the head on the last stage shares the first stage's embedding:
    its gradient is summed over the two). Two samples per prompt: the stages pass on micro-batches
    whose responses share their prompt (rl/batch.py)."""
    import torch

    from remesh.checkpoint import load_tokenizer, save_hf
    from tests.models import tiny_model

    ws = rl_workspace
    tok = load_tokenizer(ws / "model")
    save_hf(tiny_model("qwen2", vocab_size=len(tok), n_layers=2, dim=64), ws / "tied_model", tok)
    rm = tiny_model("llama", seed=3, head="value", vocab_size=len(tok), n_layers=2, dim=64)
    with torch.no_grad():
        rm.score.weight.normal_()  # rewards that differ between samples
    save_hf(rm, ws / "reward_model", tok)
    runs = {}
    for name, nproc, plan in (("pp_one", 1, None),
                              ("pp_plan", 4, "actor_gen=d1p2@0-1 actor_train=d2p2@0-3 ref_inf=d1p2t2@0-3 "
                                             "rew_inf=d1p2t2@0-3 critic_inf=d1p2@2-3 critic_train=d1p2t2@0-3")):
        cfg = _config(ws, "ppo", name, **SECTIONS["ppo"])
        cfg["actor"]["path"] = str(ws / "tied_model")
        cfg["reward"]["model"] = str(ws / "reward_model")
        cfg["trainer"].update(iterations=2, nproc=nproc)
        cfg["rollout"]["n_samples"] = 2
        if plan:
            cfg["plan"] = plan
        runs[name] = read_metrics(train_rl(_load(ws, cfg, name)).metrics_file)
    for ra, rb in zip(runs["pp_one"], runs["pp_plan"]):
        assert ra["reward/std"] > 0.01  # the learned reward tells samples apart
        for k in KEYS + ("reward/std", "critic/loss", "critic/grad_norm", "logprob_mismatch/max", "perf/gen_tokens"):
            assert abs(ra[k] - rb[k]) <= ATOL + RTOL * abs(ra[k]), (k, ra[k], rb[k])


@pytest.mark.timeout(300)
def test_overwrite_keeps_the_earlier_run_until_every_rank_has_set_up(rl_workspace, tmp_path):
    """trainer.overwrite removes an earlier run at the first write, once every rank has set up:
    here the reward model's weights (truncated: the launcher's checks read only its config) fail
    to load on rank 1, the only reward rank, while rank 0 has set up and waits; nothing is removed."""
    from remesh.checkpoint import load_tokenizer, save_hf
    from remesh.runtime.launch import DistributedJobError
    from tests.models import tiny_model

    ws = rl_workspace
    tok = load_tokenizer(ws / "model")
    save_hf(tiny_model("llama", seed=3, head="value", vocab_size=len(tok), n_layers=2, dim=64), tmp_path / "rm", tok)
    weights = tmp_path / "rm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    held = tmp_path / "held"
    (held / "final").mkdir(parents=True)
    (held / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = _config(ws, "remax", "held", rollout={"n_samples": 1})
    cfg["reward"] = {"model": str(tmp_path / "rm")}
    cfg["trainer"].update(output_dir=str(held), overwrite=True, iterations=1, nproc=2)
    cfg["plan"] = "actor_gen=d1@0 actor_greedy=d1@1 rew_inf=d1@1 actor_train=d2@0-1"
    with pytest.raises(DistributedJobError, match="rank 1 raised"):
        train_rl(_load(ws, cfg, "held"))
    assert sorted(str(p.relative_to(held)) for p in held.rglob("*")) == ["final", "metrics.jsonl"]


RESUME_PLANS = {  # two ranks: tensor-parallel training with PPO's critic; ReMax with ZeRO-1 over dp=2
    "ppo": "actor_gen=d2@0-1 ref_inf=d1@0 rew_inf=d1@1 critic_inf=d2@0-1 actor_train=d1t2@0-1 critic_train=d1t2@0-1",
    "remax": "actor_gen=d1@0 actor_greedy=d1@1 ref_inf=d2@0-1 rew_inf=d2@0-1 actor_train=d2@0-1",
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("algo", ["ppo", "remax"])
def test_planned_run_resumes_from_its_checkpoint(rl_workspace, algo):
    """Resumed from its iteration-2 checkpoint, a planned run logs iterations 3 and 4 bit for bit
    as the run that went on (rollout.spec=off, as for one process); the checkpoint's actor is a
    whole HF model; another plan, or one process, is refused before any process starts."""
    from remesh.checkpoint import load_hf
    from tests.test_rl import _metrics_without_times

    ws = rl_workspace
    sections = {**SECTIONS[algo], "rollout": {**SECTIONS[algo]["rollout"], "spec": "off"},
                "kl": {"coef": 0.05, "target": 0.1, "horizon": 100}}
    if algo == "remax":
        sections["actor_optim"] = {"zero": True, "schedule": "cosine", "warmup_steps": 1}  # lr moves every step
    cfg = _config(ws, algo, f"{algo}_ckpt", **sections)
    cfg["trainer"].update(iterations=4, nproc=2, save_every=2)
    cfg["plan"] = RESUME_PLANS[algo]
    went_on = train_rl(_load(ws, cfg, f"{algo}_ckpt"))
    ckpt = ws / f"{algo}_ckpt" / "checkpoints" / "step_000002"
    assert load_hf(ckpt, head="lm").args.n_layers == 2
    assert (ckpt / "critic" / "config.json").exists() == (algo == "ppo")

    cfg["trainer"].update(output_dir=str(ws / f"{algo}_resumed"), resume=str(ckpt))
    cfg["plan"] = "search"  # takes the checkpoint's plan
    resumed = train_rl(_load(ws, cfg, f"{algo}_resumed"))
    a, b = _metrics_without_times(went_on.metrics_file), _metrics_without_times(resumed.metrics_file)
    assert sorted(b) == [3, 4]
    assert {k: a[k] for k in b} == b

    cfg["plan"] = RESUME_PLANS[algo].replace("actor_gen=d2@0-1", "actor_gen=d1@0").replace("actor_gen=d1@0 actor_greedy=d1@1",
                                                                                          "actor_gen=d1@1 actor_greedy=d1@0")
    cfg["trainer"]["output_dir"] = str(ws / f"{algo}_other_plan")  # (into the resumed run's folder: refused first)
    with pytest.raises(ValueError, match="was written under the plan .* not .*resume it under its plan"):
        train_rl(_load(ws, cfg, f"{algo}_other_plan"))
    cfg["plan"] = None
    with pytest.raises(ValueError, match="written under an execution plan on 2 ranks"):
        RLTrainer(_load(ws, cfg, f"{algo}_one_process"))


def test_invalid_plan_is_rejected_before_processes_start(rl_workspace):
    ws = rl_workspace
    cfg = _config(ws, "remax", "bad_plan", rollout={"n_samples": 1})
    cfg["trainer"]["nproc"] = 2
    cfg["plan"] = "actor_gen=d2@0-1 actor_greedy=d2@0-1 rew_inf=d2@0-2 actor_train=d2@0-1"
    with pytest.raises(ValueError, match="rew_inf: layout d2t1@0-2: d2 x t1 x p1 = 2 ranks, but the mesh has 3"):
        train_rl(_load(ws, cfg, "bad_plan"))


def test_a_plan_that_does_not_fit_a_gpu_is_rejected_before_processes_start(rl_workspace, monkeypatch):
    from types import SimpleNamespace

    import torch

    from remesh.rl import planned

    ws = rl_workspace
    cfg = _config(ws, "remax", "gpu_plan", rollout={"n_samples": 1})
    cfg["trainer"].update(nproc=2, device="cuda")
    cfg["plan"] = "colocated"
    monkeypatch.setattr(planned, "pick_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=100_000))
    with pytest.raises(ValueError, match=r"rank 0 needs .* GiB for parameters, gradients and optimizer state alone"):
        planned.check_plan(_load(ws, cfg, "gpu_plan"), 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**30))
    assert planned.check_plan(_load(ws, cfg, "gpu_plan"), 2).layouts["actor_train"].dp == 2


def _torchrun(ws, cfg: dict, name: str, timeout: float = 240):
    import os
    import subprocess
    import sys

    import yaml

    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "remesh.cli", "train",
                           str(path)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(300)
def test_torchrun_runs_a_planned_job(rl_workspace):
    """The multi-node path: torchrun starts the ranks, the job reads its world from torchrun;
    with `plan: search`, rank 0 searches and every rank runs its plan."""
    ws = rl_workspace
    cfg = _config(ws, "grpo", "torchrun")
    cfg["trainer"]["iterations"] = 2
    cfg["plan"] = "search"
    cfg["planner"] = {"steps": 200}
    run = _torchrun(ws, cfg, "torchrun")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("remesh: plan search") == 1
    searched = run.stdout.split("remesh: plan search")[1].split("): ", 1)[1].split(" (estimated")[0]
    assert f"plan on 2 ranks: {searched}" in run.stdout
    assert len(read_metrics(ws / "torchrun" / "metrics.jsonl")) == 2
    assert (ws / "torchrun" / "final" / "config.json").exists()


@pytest.mark.timeout(120)
def test_torchrun_search_error_reaches_every_rank(rl_workspace):
    """A search that fails on rank 0 fails the job at once on every rank, not after the other
    ranks time out waiting for a plan."""
    ws = rl_workspace
    cfg = _config(ws, "grpo", "torchrun_bad")
    cfg["plan"] = "search"
    cfg["planner"] = {"cluster": "nowhere.yaml"}
    run = _torchrun(ws, cfg, "torchrun_bad", timeout=100)
    assert run.returncode != 0
    assert run.stderr.count("no such file or shipped cluster") >= 2, run.stderr[-3000:]


@pytest.mark.timeout(300)
def test_plan_search_then_run(rl_workspace):
    """`plan: search` plans for this machine as trainer.nproc processes, then runs the plan, and
    leaves the search report and the timeline chart in the output folder (written with the run's
    other outputs, after trainer.overwrite has replaced an earlier run, which left them alone)."""
    ws = rl_workspace
    out = ws / "searched"
    (out / "checkpoints" / "step_000009").mkdir(parents=True)  # an earlier run's
    (out / "metrics.jsonl").write_text('{"step": 9}\n')
    cfg = _config(ws, "grpo", "searched")
    cfg["trainer"].update(iterations=1, nproc=2, overwrite=True)
    cfg["plan"] = "search"
    cfg["planner"] = {"steps": 300}
    result = train_rl(_load(ws, cfg, "searched"))
    assert [r["step"] for r in read_metrics(result.metrics_file)] == [1]
    assert not (out / "checkpoints").exists()
    assert (out / "plan_timeline.png").stat().st_size > 0
    report = (out / "plan_search.txt").read_text()
    assert "plan (one line):" in report and "colocated" in report
    assert (out / "plan.yaml").read_text() in report.replace("\n  ", "\n")


def test_plan_command_prints_a_plan_and_draws_its_timeline(rl_workspace, tmp_path, capsys, monkeypatch):
    import remesh.planner.profile as profile_module
    from remesh.cli import main

    # the local profile's drift check re-times a layer, whose time swings with the machine's
    # load (test_planner covers the check itself): here only that the command makes it
    checked = []
    monkeypatch.setattr(profile_module, "check_drift", lambda profile, device: checked.append(profile.name))
    ws = rl_workspace
    config = ws / "plan_cmd.yaml"
    import yaml

    # an RL config may leave `kind` out
    config.write_text(yaml.safe_dump({k: v for k, v in _config(ws, "ppo", "plan_cmd", **SECTIONS["ppo"]).items()
                                      if k != "kind"}))
    png = tmp_path / "timeline.png"
    assert main(["plan", str(config), "--cluster", "local:4", "--budget", "1", "--timeline", str(png)]) == 0
    out = capsys.readouterr().out
    assert "estimated iteration time" in out and "actor_gen=" in out and "split" in out
    assert png.stat().st_size > 0
    assert len(checked) == 1
    assert main(["plan", str(config), "--cluster", "nowhere.yaml"]) == 2
    assert "no such file or shipped cluster" in capsys.readouterr().err
    # without options, the search that plan=search runs: planner.cluster, else this machine as
    # trainer.nproc processes; planner.steps proposals, so the same plan each time
    plans = []
    for _ in range(2):
        assert main(["plan", str(config), "trainer.nproc=3", "planner.steps=40", "--timeline", str(png)]) == 0
        out = capsys.readouterr().out
        assert "node(s) x 3 devices" in out
        plans.append(out.split("plan (one line):\n")[1].splitlines()[0])
    assert plans[0] == plans[1] and "actor_gen=" in plans[0]
    # a planner.cluster of another size than trainer.nproc: plan=search needs torchrun's ranks
    assert main(["plan", str(config), "planner.cluster=h100-1x8", "planner.steps=20", "--timeline", str(png)]) == 0
    assert "plan=search runs on h100-1x8 only with 8 ranks (torchrun), not trainer.nproc=" in capsys.readouterr().err
    assert main(["plan", str(config), "planner.cluster=nowhere.yaml"]) == 2
    assert "remesh: error: planner.cluster: cluster 'nowhere.yaml': no such file" in capsys.readouterr().err
    # refused before the search, each in one line naming the option; an override may follow options;
    # a cluster too small for any plan
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("nodes: 1\ndevices_per_node: 2\ndevice_memory: 1000\nprofile: h100-datasheet\n")
    for argv, expected in [(["--budget", "0"], "--budget: must be positive"),
                           (["--cluster", str(tiny), "--budget", "1"], "no execution plan fits 2 devices of"),
                           (["--timeline", str(tmp_path / "t.txt")], "cannot draw a .txt file"),
                           (["--timeline", str(tmp_path)], "is a folder"),
                           (["--timeline", str(png / "t.png")], "timeline.png is a file, not a folder"),
                           (["--cluster", "local:0"], "local:N needs N >= 1"),
                           (["--cluster", "local:2", "trainer.iterations=0"], "iterations must be >= 1")]:
        assert main(["plan", str(config), *argv]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, lines)
    sft = tmp_path / "sft.yaml"
    sft.write_text("kind: sft\n")
    assert main(["plan", str(sft)]) == 2
    assert "remesh plan needs an RL config" in capsys.readouterr().err
    # a bad plan for a run: the plan's own message, one line, before any process starts
    assert main(["rl", str(config), "plan=actor_gen=zz"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "plan: actor_gen: layout 'zz'" in lines[0], lines


def test_planned_run_passes_its_timeouts_to_the_processes(rl_workspace, monkeypatch):
    """A rank may wait long for another mesh's generation: the run's collective timeout, not
    spawn's short default, bounds it; the job itself has no time limit unless one is set."""
    import remesh.rl.planned as planned

    seen = {}

    def fake_spawn(fn, world, args=(), **kw):
        seen.update(kw, world=world)
        return [None]

    monkeypatch.setattr(planned, "spawn", fake_spawn)
    cfg = _config(rl_workspace, "grpo", "timeouts")
    cfg["trainer"].update(nproc=2, collective_timeout_s=900)
    cfg["plan"] = "colocated"
    planned.train_planned(_load(rl_workspace, cfg, "timeouts"))
    assert seen == {"world": 2, "timeout_s": None, "collective_timeout_s": 900}
