from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest

from remesh.config import ConfigError, config_to_dict, dump_config, load_config, load_yaml


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    kind: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, ...] = (0.9, 0.95)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class DataConfig:
    path: str  # required
    max_prompt_len: int = 512
    shuffle: bool = True
    splits: list[str] = field(default_factory=lambda: ["train"])
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardConfig:
    model: str = "rm"
    scale: float = 1.0


@dataclass
class Config:
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    # A non-class default: partial YAML for `critic` must keep lr=5e-6.
    critic: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, kind="sgd"))
    reward: Optional[RewardConfig] = None
    seed: int | None = 0
    tags: list[int] = field(default_factory=list)
    extra: Any = None


@dataclass
class Sub:
    a: int
    b: int = 0


@dataclass
class Required:
    sub: Optional[Sub] = None
    pair: tuple[int, str] = (1, "x")


def write(tmp_path, text, name="sft.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def error(cls, path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "data:\n  path: /d.jsonl\noptim:\n  lr: 3.0e-4\n")


def test_nested_load(tmp_path):
    path = write(tmp_path, """
data:
  path: /d.jsonl
  splits: [train, val]
  weights: {a: 1, b: 0.5}
optim: {lr: 1e-5, betas: [0.8, 0.9]}
critic: {weight_decay: 0.1}
extra: {anything: [1, 2]}
""")
    cfg = load_config(Config, path)
    assert cfg.data == DataConfig(path="/d.jsonl", splits=["train", "val"], weights={"a": 1.0, "b": 0.5})
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.critic == OptimConfig(lr=5e-6, kind="sgd", weight_decay=0.1)
    assert cfg.reward is None and cfg.seed == 0
    assert cfg.extra == {"anything": [1, 2]}


def test_empty_file_and_no_file(tmp_path):
    cfg = load_config(Config, write(tmp_path, ""), ["data.path=x"])
    assert cfg.data.path == "x"
    assert load_config(Config, None, ["data.path=x"]) == cfg


def test_overrides(base):
    cfg = load_config(Config, base, [
        "optim.lr=1e-5", "optim.weight_decay=1",  # int accepted for float
        "data.max_prompt_len=256", "data.shuffle=false", "data.splits=[a, b]",
        "optim.kind=sgd", "seed=null", "tags=[1,2]", "reward.scale=2.5",
    ])
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 1.0 and cfg.optim.kind == "sgd"
    assert cfg.data.max_prompt_len == 256 and cfg.data.shuffle is False and cfg.data.splits == ["a", "b"]
    assert cfg.seed is None and cfg.tags == [1, 2]
    assert cfg.reward == RewardConfig(scale=2.5)  # created with defaults, then set


def test_override_replaces_null_section_and_later_wins(tmp_path):
    path = write(tmp_path, "data: {path: p}\nreward: null\n")
    cfg = load_config(Config, path, ["reward.model=big", "seed=1", "seed=2"])
    assert cfg.reward == RewardConfig(model="big") and cfg.seed == 2


def test_override_supplies_required_key(tmp_path):
    assert load_config(Config, write(tmp_path, "optim: {lr: 0.1}\n"), ["data.path=p"]).data.path == "p"


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, "data: {path: p}\noptim:\n  lrr: 0.1\n")
    assert error(Config, path) == f"{path}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    msg = error(Config, write(tmp_path, "data: {path: p}\n"), ["optim.lrr=1"])
    assert msg == "override 'optim.lrr=1': unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    msg = error(Config, None, ["data.path=p", "dataa.path=q"])
    assert "unknown key 'dataa'" in msg and "did you mean 'data'?" in msg


def test_unknown_key_lists_section_keys(base):
    msg = error(Config, base, ["optim.zzzzz=1"])
    assert msg.startswith("override 'optim.zzzzz=1': unknown key 'optim.zzzzz'")
    assert "valid keys in 'optim': lr, weight_decay, kind, betas" in msg
    assert "valid keys at top level: data, optim" in error(Config, base, ["qqqqqqq=1"])


def test_wrong_types(tmp_path, base):
    path = write(tmp_path, "data: {path: p}\noptim: {lr: abc}\n", "types.yaml")
    assert error(Config, path) == f"{path}: optim.lr: expected float, got str 'abc'"
    cases = {
        "data.max_prompt_len=1.5": "data.max_prompt_len: expected int, got float 1.5",
        "data.max_prompt_len=1e3": "data.max_prompt_len: expected int, got str '1e3'",
        "data.shuffle=1": "data.shuffle: expected bool, got int 1",
        "data.path=null": "data.path: expected str, got null",
        "optim.lr=nan": "optim.lr: expected float, got str 'nan'",
        "optim.lr=true": "optim.lr: expected float, got bool True",
        "tags=[1, x]": "tags[1]: expected int, got str 'x'",
        "data.weights={1: 2}": "data.weights: expected dict[str, float] (a mapping with string keys)",
        "optim=3": "optim: expected a mapping for OptimConfig, got int 3",
        "seed=abc": "seed: expected int, got str 'abc'",
        "optim.betas=[0.9, x]": "optim.betas[1]: expected float, got str 'x'",
    }
    for override, expected in cases.items():
        msg = error(Config, base, [override])
        assert msg.startswith(f"override '{override}': {expected}"), msg


def test_only_true_and_false_are_booleans(tmp_path, base):
    """YAML 1.2's booleans, not PyYAML's 1.1 on/off/yes/no: `spec: off` (speculation) stays a string."""
    path = write(tmp_path, "data: {path: off}\nextra: [yes, no, on, True, false]\n", "bools.yaml")
    cfg = load_config(Config, path, ["reward.model=off"])
    assert (cfg.data.path, cfg.reward.model, cfg.extra) == ("off", "off", ["yes", "no", "on", True, False])
    assert error(Config, base, ["data.shuffle=yes"]) == \
        "override 'data.shuffle=yes': data.shuffle: expected bool, got str 'yes'"


def test_pyyaml_itself_keeps_yaml_1_1():
    """load_yaml's booleans are its own loader's: PyYAML's (which other libraries use) is untouched."""
    import yaml

    from remesh.config import load_yaml

    assert yaml.safe_load("a: off") == {"a": False} and load_yaml("a: off") == {"a": "off"}


def test_run_configs_check_ranges_at_load_time(tmp_path):
    """Values the run would only trip over after loading models and writing its output folder
    (or accept, as a negative step count) fail when the config loads, naming section and field."""
    from remesh.rl.config import RLConfig
    from remesh.train.configs import SFTConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    grpo, sft = str(configs / "grpo.yaml"), str(configs / "sft_demo.yaml")

    def rl_error(*overrides):
        return error(RLConfig, grpo, overrides)

    assert rl_error("rollout.top_p=1.5") == "override 'rollout.top_p=1.5': rollout: top_p must be in (0, 1], got 1.5"
    assert rl_error("rollout.temperature=-1").endswith("rollout: temperature must be > 0 and finite unless greedy, got -1.0")
    assert rl_error("trainer.iterations=-2").endswith("trainer: iterations must be >= 1, got -2")
    # .inf and .nan pass every range check (nan >= 0 is False, but so is nan < 0): refused as numbers
    assert rl_error("actor_optim.lr=.inf").endswith("actor_optim.lr: expected a finite number, got float inf")
    assert rl_error("kl.coef=.nan").endswith("kl.coef: expected a finite number, got float nan")
    assert rl_error("trainer.prompts_per_iter=0").endswith("trainer: prompts_per_iter must be >= 1, got 0")
    assert rl_error("trainer.nproc=0").endswith("trainer: nproc must be >= 1, got 0")
    assert rl_error("kl.coef=-0.1").endswith("kl: coef must be >= 0, got -0.1")
    assert rl_error("trainer.micro_batch_tokens=100", "rollout.max_new_tokens=40").endswith(
        "trainer.micro_batch_tokens: 100 cannot hold a sequence of data.max_prompt_len + rollout.max_new_tokens = "
        f"{load_config(RLConfig, grpo).data.max_prompt_len + 40} tokens: raise it to at least "
        f"{load_config(RLConfig, grpo).data.max_prompt_len + 40}")
    assert rl_error("plan=colocated", "rollout.draft_model=self:3").endswith(
        "rollout.draft_model: the model drafter runs in one-process runs only, not under a plan (plan: colocated); "
        "drop it, or the plan")
    assert rl_error("rollout.spec=ngram:3", "rollout.draft_model=self:3").endswith(
        "rollout: a draft model is used by speculation 'auto' or 'model:K', not 'ngram:3' "
        "(drop the draft model, or change the speculation)")
    assert load_config(RLConfig, grpo, ["rollout.spec=off"]).rollout.spec == "off"
    assert rl_error("rollout.spec=ngarm:3").endswith("rollout: speculation 'ngarm:3': unknown drafter 'ngarm' "
                                                     "(known: ngram, history, model)")
    assert rl_error("rollout.spec=model:3").endswith("rollout: speculation 'model:3' needs a draft model")
    # a one-field error blames whatever set that field, not the section's last override
    assert rl_error("trainer.iterations=0", "trainer.device=cpu").startswith("override 'trainer.iterations=0':")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("kind: rl\nreward: {terms: [{name: length_penalty}]}\nrollout: {top_p: 1.5}\n")
    msg = error(RLConfig, str(bad_file), ["rollout.max_new_tokens=32"])
    assert msg.startswith(f"{bad_file}: rollout: top_p must be in (0, 1]"), msg
    assert error(SFTConfig, sft, ["trainer.log_every=0"]).endswith(
        "trainer: log_every must be >= 1, got 0")
    assert error(SFTConfig, sft, ["trainer.max_steps=-3"]).endswith(
        "trainer: max_steps must be >= 1, got -3")
    assert error(SFTConfig, sft, ["data.max_len=-5"]).endswith("data: max_len must be >= 1, got -5")


def test_a_wandb_project_without_wandb_fails_at_load_time(monkeypatch):
    """Found at load time, not by the metrics logger after the run has removed an earlier run
    (trainer.overwrite) and started writing."""
    import importlib.util

    from remesh.rl.config import RLConfig
    from remesh.train.configs import SFTConfig

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    configs = Path(__file__).resolve().parents[1] / "configs"
    for cls, path in ((SFTConfig, "sft_demo.yaml"), (RLConfig, "grpo.yaml")):
        assert error(cls, str(configs / path), ["trainer.wandb_project=demo"]) == (
            "override 'trainer.wandb_project=demo': trainer: wandb_project is set but wandb is not installed: "
            "pip install wandb")


def test_literal_lists_choices(base):
    msg = error(Config, base, ["optim.kind=adam"])
    assert msg == "override 'optim.kind=adam': optim.kind: expected one of 'adamw', 'sgd', got str 'adam'"


def test_missing_required(tmp_path):
    path = write(tmp_path, "data: {max_prompt_len: 3}\n")
    assert error(Config, path) == f"{path}: missing required key 'data.path'"
    assert error(Config, None) == "<no config file>: missing required key 'data'"
    # An unrelated override is not blamed; one that created the section is.
    assert error(Config, path, ["data.shuffle=false"]).startswith(f"{path}: missing required key 'data.path'")
    assert error(Required, None, ["sub.b=1"]) == "override 'sub.b=1': missing required key 'sub.a'"


def test_post_init_error_names_section(tmp_path, base):
    path = write(tmp_path, "data: {path: p}\noptim: {lr: -1}\n", "neg.yaml")
    assert error(Config, path) == f"{path}: optim: lr must be positive, got -1.0"
    assert error(Config, base, ["critic.lr=0"]) == "override 'critic.lr=0': critic: lr must be positive, got 0.0"


def test_malformed_overrides(base):
    assert "expected 'dotted.key=value'" in error(Config, base, ["optim.lr"])
    assert error(Config, base, ["=3"]).startswith("override '=3':")
    assert error(Config, base, ["optim..lr=3"]).startswith("override 'optim..lr=3':")
    assert error(Config, base, ["tags=[1, 2"]).startswith("override 'tags=[1, 2': cannot parse value")


def test_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert error(Config, missing).startswith(f"{missing}: cannot read config file")
    bad = write(tmp_path, "data:\n  path: p\n bad: [\n", "bad.yaml")
    assert error(Config, bad).startswith(f"{bad}:3: invalid YAML")
    assert "top level must be a mapping" in error(Config, write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    twice = write(tmp_path, "data: {path: p}\noptim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "twice.yaml")
    assert error(Config, twice) == f"{twice}:4: invalid YAML (key 'lr' given twice)"
    assert load_yaml("base: &b {x: 1, y: 2}\nz: {<<: *b, x: 5}\n")["z"] == {"x": 5, "y": 2}  # merge keys still override
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data: {path: p}\n# caf\u00e9\n".encode("latin-1"))
    assert error(Config, str(latin1)) == f"{latin1}:2: not UTF-8 text (byte b'\\xe9')"


def test_multiline_post_init_message_is_one_line():
    @dataclass
    class Multi:
        x: int = 0

        def __post_init__(self):
            raise ValueError("first\nsecond")

    assert error(Multi, None) == "<no config file>: Multi: first second"


def test_round_trip(tmp_path, base):
    cfg = load_config(Config, base, ["reward.model=r", "optim.betas=[0.5, 0.6]", "extra={k: [1, 2]}",
                                      "data.weights={a: 0.25}"])
    d = config_to_dict(cfg)
    assert d["optim"]["betas"] == [0.5, 0.6] and d["reward"] == {"model": "r", "scale": 1.0}
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(Config, out) == cfg
    assert dataclasses.asdict(load_config(Config, out)) == dataclasses.asdict(cfg)


def test_fixed_tuple():
    assert load_config(Required, None, ["pair=[2, y]"]).pair == (2, "y")
    assert "expected tuple[int, str] of length 2" in error(Required, None, ["pair=[2]"])
    assert "pair[1]: expected str, got int 3" in error(Required, None, ["pair=[2, 3]"])
