"""Config: every shipped YAML loads; mistakes exit non-zero with one message naming the field."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import Config, ConfigError, int_at_least, ints_at_least, load_config, load_yaml_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "configs/ ships at least one YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "learner.main" in first, "every YAML starts with the command that runs it"
    cfg = load_yaml_config(path)
    assert isinstance(cfg, Config)
    assert cfg.config == path
    assert cfg.never_in_force() == [], "every schedule entry is reached"


def test_precedence_defaults_yaml_flags(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"rollout": {"k": 4, "steps": 6}, "learner": {"baseline": "rloo"}}))
    cfg = load_config(["--config", str(p), "--rollout.k=8"])
    assert cfg.rollout.k == 8  # flag beats YAML
    assert cfg.rollout.steps == 6  # YAML beats default
    assert cfg.learner.baseline == "rloo"
    assert cfg.rollout.num_workers == Config().rollout.num_workers  # default kept


def test_rewards_list_from_flag():
    cfg = load_config(['--rewards=[{"name": "toy", "weight": 2.0, "kwargs": {"floor": -5}}]'])
    assert cfg.rewards[0].weight == 2.0 and cfg.rewards[0].kwargs == {"floor": -5}


def test_a_list_or_mapping_flag_replaces_the_files_written_as_in_the_file_or_as_json():
    """A flag's mapping used to be merged key by key into the file's: ``--rollout.k_schedule={}``
    changed nothing and ``{5000: 32}`` kept the file's 3000 and 4000 too; YAML's flow style, as
    the config file is written, was refused as "error parsing value for field"."""
    toy = ["--config", str(REPO / "configs/toy.yaml")]
    assert load_yaml_config(REPO / "configs/toy.yaml").rollout.k_schedule == {3000: 8, 4000: 16}
    assert load_config([*toy, "--rollout.k_schedule={}"]).rollout.k_schedule == {}
    for argv, k in (
        (["--rollout.k_schedule={5000: 32}"], 2),
        (['--rollout.k_schedule={"5000": 32}'], 2),
        (["--rollout.k_schedule", "{5000: 32}"], 2),
        (["--rollout={k_schedule: {5000: 32}, k: 3}"], 3),
        (["--rollout.k_schedule={5000: 32}", "--rollout.k", "3"], 3),
    ):
        cfg = load_config([*toy, *argv])
        assert (cfg.rollout.k_schedule, cfg.rollout.k) == ({5000: 32}, k), argv
        assert (cfg.rollout.num_workers, cfg.rollout.contexts_per_iter) == (2, 16), "the rest of the section stays"
    cfg = load_config([*toy, "--rewards=[{name: toy, kwargs: {floor: -3}}, {name: toy, weight: 0.5}]"])
    assert [(r.name, r.weight, r.kwargs) for r in cfg.rewards] == [("toy", 1.0, {"floor": -3}), ("toy", 0.5, {})]
    cfg = load_config([*toy, "--policy.widths=[8, 8, 16, 16]", "--learner.eval_metrics=[]", "--ray.init_kwargs={}"])
    assert (cfg.policy.widths, cfg.learner.eval_metrics, cfg.ray.init_kwargs) == ([8, 8, 16, 16], [], {})
    assert load_config([*toy, "--ray.init_kwargs={namespace: x}"]).ray.init_kwargs == {"namespace": "x"}


@pytest.mark.parametrize(
    ("argv", "k", "steps"),
    [
        (["--rollout.k=3", "--rollout={k: 4}"], 4, 4),
        (["--rollout={k: 4}", "--rollout.k=3"], 3, 4),
        (["--rollout.k=3", "--rollout={steps: 5}"], 3, 5),
        (["--rollout.k", "3", "--rollout={k: 5, steps: 6}", "--rollout.steps=7"], 5, 7),
        (["--rollout.k=3", "--rollout.k=5"], 5, 4),
    ],
)
def test_the_last_flag_that_sets_a_field_counts(argv, k, steps):
    """A dotted flag won over a section's mapping wherever the two stood on the line."""
    cfg = load_config(argv)
    assert (cfg.rollout.k, cfg.rollout.steps) == (k, steps)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--policy.widths=[8, 8",
            "the value of --policy.widths is not valid YAML: line 1, column 6: expected ',' or ']', but got "
            "'<stream end>' (while parsing a flow sequence at line 1, column 1)",
        ),
        (
            "--rewards=[{name: toy, name: hps}]",
            "the value of --rewards is not valid YAML: line 1, column 14: duplicate key 'name' (first at line 1)",
        ),
        ("--rollout={k: 4, colour: 5}", "unrecognized arguments: --rollout.colour=5 (--help lists every flag)"),
        ("--rollout.colour={a: 1}", "unrecognized arguments: --rollout.colour={a: 1} (--help lists every flag)"),
    ],
)
def test_a_malformed_list_or_mapping_flag_is_one_line_naming_it(flag, message):
    with pytest.raises(ConfigError) as e:
        load_config([flag])
    assert str(e.value) == f"invalid command line: {message}"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"rollout": {"bogus": 1}}, "rollout.bogus"),
        ({"nonsense": {}}, "nonsense"),
        ({"rollout": {"k": 1}}, "rollout.k"),
        ({"rollout": {"steps": 0}}, "rollout.steps"),
        ({"rollout": {"k": "two"}}, "rollout.k"),
        ({"rollout": {"contexts_per_iter": 1}, "learner": {"baseline": "js"}}, "contexts_per_iter"),
        ({"rollout": {"contexts_per_iter": 1}, "learner": {"baseline": "xctx"}}, "contexts_per_iter"),
        ({"rollout": {"contexts_per_iter": 2}, "learner": {"baseline": "js_loco"}}, "contexts_per_iter"),
        ({"learner": {"baseline": "ppo"}}, "learner.baseline"),
        ({"rewards": [{"name": "toy", "wieght": 1}]}, "rewards.0.wieght"),
        ({"policy": {"widths": [30], "groups": 8}}, "groups"),
        ({"learner": {"device": "gpu0"}}, "learner.device"),
        ({"rollout": {"policy_device": "cuda:x"}}, "rollout.policy_device"),
        ({"learner": {"broadcast_dtype": "int8"}}, "learner.broadcast_dtype"),
        ({"rollout": {"micro_batch": 0}}, "rollout.micro_batch"),
        ({"rollout": {"num_workers": "auto"}}, "rollout.num_gpus > 0"),
        ({"rollout": {"num_workers": "many"}}, "rollout.num_workers"),
        ({"rollout": {"num_workers": 4, "max_workers": 2}}, "rollout.max_workers=2 is below"),
        # kwargs are untyped: a YAML .nan or .inf is refused there too, named by its place
        ({"rewards": [{"name": "toy", "kwargs": {"floor": float("nan")}}]}, "rewards.0.kwargs: floor is nan"),
        (
            {"learner": {"eval_metrics": [{"name": "m:M", "kwargs": {"a": [1, {"b": float("-inf")}]}}]}},
            "a[1].b is -inf",
        ),
        ({"sampler": {"backend": "a.b:C", "kwargs": {"scale": float("inf")}}}, "sampler.kwargs: scale is inf"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, data, field):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    assert field in str(e.value)


def test_rloo_with_one_context_is_fine():
    cfg = load_config(["--rollout.contexts_per_iter=1", "--learner.baseline=rloo"])
    assert cfg.rollout.contexts_per_iter == 1


def test_yaml_must_be_a_mapping(tmp_path: Path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(["--config", str(p)])
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config(["--rollout.k=4", "--experiment.seed=7"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    again = load_yaml_config(p)
    assert again.model_dump(exclude={"config"}) == cfg.model_dump(exclude={"config"})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "learner.main", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_mistakes_exit_2_without_traceback(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  k: 1\n  colour: blue\n")
    res = _cli("--config", str(p))
    assert res.returncode == 2
    assert "rollout.k" in res.stderr and "rollout.colour: unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("--rollout.k=0")  # one mistake: one line (it was a heading, then the field)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: invalid config: rollout.k: Input should be greater than or equal to 2 (got '0')"
    ]
    res = _cli("--rollout.nope=3")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    # one line, not the usage of every field before it
    assert res.stderr.strip().splitlines() == [
        "error: invalid command line: unrecognized arguments: --rollout.nope=3 (--help lists every flag)"
    ]


@pytest.mark.parametrize("argv", [["--rollout"], ["--ray"], ["--rollout.k"], ["--rollout", "--learner.iterations=3"]])
def test_a_flag_without_a_value_is_refused(argv):
    """A section flag given alone would otherwise be read as the section's defaults, silently."""
    with pytest.raises(ConfigError, match=rf"^invalid command line: {argv[0]} needs a value \({argv[0]}=VALUE\)$"):
        load_config(argv)


@pytest.mark.parametrize("argv", [["--config"], ["--resume"], ["--learner.iterations", "--overwrite"]])
def test_a_flag_without_a_value_is_refused_before_anything_reads_it(argv):
    """--config alone was argparse's usage of a parser named main.py and exit 2, not one line."""
    with pytest.raises(ConfigError, match=rf"^invalid command line: {argv[0]} needs a value \({argv[0]}=VALUE\)$"):
        load_config(argv)


def test_a_yes_no_flag_alone_is_true():
    """The README's own `--overwrite`, and the refusals' 'add --overwrite', were refused: "needs a
    value"; only `--overwrite=true` worked."""
    assert load_config(["--overwrite"]).overwrite is True
    cfg = load_config(["--overwrite", "--learner.progress", "--rollout.k=3", "--resume_changes"])
    assert (cfg.overwrite, cfg.learner.progress, cfg.rollout.k, cfg.resume_changes) == (True, True, 3, True)
    # with a value it is that value, after = or as the next word
    assert load_config(["--learner.progress=false"]).learner.progress is False
    assert load_config(["--learner.progress", "false", "--overwrite"]).learner.progress is False
    with pytest.raises(ConfigError, match=r"overwrite: Input should be a valid boolean.*\(got 'maybe'\)"):
        load_config(["--overwrite", "maybe"])
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(["--overwrite", "--resume=auto"])


def test_no_environment_variable_changes_a_run(monkeypatch):
    """The config is a settings class, which read a variable for every field, in any case: a
    stray OVERWRITE=1 deleted the run in the dir, RESUME=auto resumed one, CONFIG named a file
    that was never read, and a bad POLICY was an error about a 'source' no flag had set."""
    for name, value in (
        ("OVERWRITE", "1"),
        ("resume", "auto"),
        ("CONFIG", "elsewhere.yaml"),
        ("POLICY", "conditional"),
        ("EXPERIMENT", '{"name": "zz"}'),
        ("ROLLOUT", '{"k": 7}'),
    ):
        monkeypatch.setenv(name, value)
    cfg = load_config(["--config", "configs/toy.yaml"])
    assert (cfg.overwrite, cfg.resume, cfg.config) == (False, None, Path("configs/toy.yaml"))
    assert (cfg.experiment.name, cfg.rollout.k, cfg.policy.variant) == ("toy", 2, "conditional")  # the file's
    assert load_config(["--overwrite"]).overwrite is True  # the flags still count


def test_a_cluster_running_on_this_machine_is_joined_without_the_resources_of_one_to_start(monkeypatch):
    """``ray start --head``, then a run with ray.num_cpus: ray.init() joins that cluster, and refused
    the resources (a traceback: 'When connecting to an existing cluster, num_cpus and num_gpus must
    not be provided'); they describe a cluster the run starts, as the field says."""
    import ray

    from learner import loop

    calls: list[dict] = []
    local = load_config(["--ray.num_cpus=2", '--ray.init_kwargs={"address": "local"}']).ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    ray_cfg = load_config(["--ray.num_cpus=2", "--ray.num_gpus=0"]).ray
    monkeypatch.setattr(loop, "_running_cluster", lambda: None)
    assert loop.init_ray(ray_cfg) is True
    monkeypatch.setattr(loop, "_running_cluster", lambda: "10.0.0.1:6379")
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(loop, "_check_answers", lambda address, source: asked.append((address, source)))
    assert loop.init_ray(ray_cfg) is True
    assert calls == [{"include_dashboard": False, "num_cpus": 2, "num_gpus": 0}, {"include_dashboard": False}]
    assert asked == [("10.0.0.1:6379", "the cluster `ray start` left running on this machine")]
    # a cluster of the run's own, asked for by name: its resources are the run's
    assert loop.init_ray(local) is True and calls[-1]["num_cpus"] == 2 and len(asked) == 1

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    # another user's cluster on this machine that wants a token: said as where it was found ("at
    # None (RAY_ADDRESS)" before, RAY_ADDRESS unset), with what joins it and what starts one's own
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ConfigError) as e:
        loop.init_ray(ray_cfg)
    assert str(e.value).startswith(
        "cannot join the Ray cluster at 10.0.0.1:6379 (the cluster `ray start` left running on this machine):"
    )
    assert "RAY_AUTH_MODE=token" in str(e.value) and """--ray.init_kwargs='{"address": "local"}'""" in str(e.value)


def test_a_path_given_from_the_home_directory_is_read_from_there():
    """After '=' the shell leaves '~' as it is: --experiment.output_dir=~/runs made a directory
    named '~' in the current one (a later 'rm -rf ~' to clean it up removes the home)."""
    from common.config import given_path

    cfg = load_config(["--experiment.output_dir=~/runs", "--learner.checkpoint_dir=~/ck"])
    assert (cfg.experiment.output_dir, cfg.learner.checkpoint_dir) == (Path.home() / "runs", str(Path.home() / "ck"))
    assert load_config(["--learner.checkpoint_dir=s3://bucket/~run"]).learner.checkpoint_dir == "s3://bucket/~run"
    assert given_path("~/runs/x") == Path.home() / "runs" / "x"  # the tools' --run, --out


def test_a_prompt_given_bare_on_the_command_line_is_one_prompt_commas_and_all():
    """pydantic-settings splits a bare list value at its commas: the docs' own prompt 'a red fox in
    the snow, oil painting' became two prompts, 'a red fox in the snow' and 'oil painting'."""
    fox = "a red fox in the snow, oil painting"
    assert load_config([f"--learner.eval_prompts={fox}"]).learner.eval_prompts == [fox]
    assert load_config(["--learner.train_prompts", fox]).learner.train_prompts == [fox]
    assert load_config([f'--learner.eval_prompts=["{fox}", "a cat"]']).learner.eval_prompts == [fox, "a cat"]
    assert load_config(["--learner.eval_prompts=a", "--learner.eval_prompts=b"]).learner.eval_prompts == ["b"]
    assert load_config(["--policy.widths=8,8,16,16"]).policy.widths == [8, 8, 16, 16]  # numbers: as before
    with pytest.raises(ConfigError, match="eval_prompts"):
        load_config(["--learner.eval_prompts= "])


def test_a_mapping_flag_given_a_bare_value_says_how_to_give_one():
    """--rollout.k_schedule=3 said 'Parsing error encountered for rollout.k_schedule: not enough
    values to unpack (expected 2, got 1)'."""
    with pytest.raises(ConfigError) as e:
        load_config(["--rollout.k_schedule=3"])
    assert str(e.value) == (
        "invalid command line: --rollout.k_schedule='3': give a mapping as in the file, e.g."
        " --rollout.k_schedule='{3000: 8}' (--rollout.k_schedule='{}' for none)"
    )
    with pytest.raises(ConfigError, match=r"--ray.init_kwargs='\{key: value\}'"):
        load_config(["--ray.init_kwargs=x"])
    assert load_config(["--rollout.k_schedule=3000=8"]).rollout.k_schedule == {3000: 8}  # pydantic-settings' own


def test_a_yes_or_no_given_for_a_number_is_refused(tmp_path):
    """pydantic takes true for 1, and YAML reads yes, no, on and off as true and false: a file's
    'max_restarts: yes' was one restart, silently."""
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  max_restarts: yes\n  num_workers: on\nlearner:\n  progress: no\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid config:" and sorted(lines[1:]) == [
        "  rollout.max_restarts: a number, not true (YAML reads yes, no, on and off as true and false)",
        "  rollout.num_workers: a number, not true (YAML reads yes, no, on and off as true and false)",
    ]
    p.write_text("learner:\n  progress: no\nrollout:\n  max_restarts: 1\n")  # a yes/no where one is asked
    cfg = load_config(["--config", str(p)])
    assert (cfg.learner.progress, cfg.rollout.max_restarts) == (False, 1)


def test_ray_init_kwargs_are_arguments_of_ray_init():
    with pytest.raises(ConfigError, match=r"ray.init_kwargs: 'bogus': not an argument of ray.init \(it takes address,"):
        load_config(['--ray.init_kwargs={"bogus": 1}'])
    # ray.init's own, and its private ones (checked by Ray itself)
    kwargs = {"namespace": "x", "log_to_driver": False, "_temp_dir": "/tmp/ray-x"}
    assert load_config([f"--ray.init_kwargs={json.dumps(kwargs)}"]).ray.init_kwargs == kwargs


def test_integer_flags_name_their_bounds():
    assert int_at_least(1, 1000)("7") == 7
    assert ints_at_least(1, 1000)("2, 4,8") == [2, 4, 8]
    for parse, text, why in [
        (int_at_least(0), "-1", "must be at least 0, got -1"),
        (int_at_least(1, 1000), "1001", "must be from 1 to 1000, got 1001"),
        (int_at_least(0), "x", "expected an integer, got 'x'"),
        (ints_at_least(1), "2,,4", "expected an integer, got ''"),
        (ints_at_least(1), "2,0", "must be at least 1, got 0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(why)):
            parse(text)


def test_cli_help_lists_every_field():
    res = _cli("--help")
    assert res.returncode == 0
    for section in Config.model_fields:
        assert f"--{section}" in res.stdout
    for name in ("--rollout.k", "--learner.baseline", "--policy.init", "--sampler.toy.spread", "--ray.num_cpus"):
        assert name in res.stdout
    assert "rollouts (schedules) per context" in res.stdout  # descriptions are the help text


def test_embedded_default_is_the_digits_config():
    """`python -m learner.main` with no arguments runs configs/digits.yaml."""
    toy = load_yaml_config(REPO / "configs" / "digits.yaml")
    assert load_config([]).model_dump(exclude={"config"}) == toy.model_dump(exclude={"config"})


def test_k_schedule_is_validated_and_read_by_iteration():
    from common.config import RolloutConfig

    r = RolloutConfig(k=2, k_schedule={"4000": 16, "3000": 8})
    assert [r.k_at(i) for i in (0, 2999, 3000, 3999, 4000, 10**6)] == [2, 2, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="k_schedule"):
        RolloutConfig(k_schedule={100: 1})
    with pytest.raises(ValueError, match="k_schedule"):
        RolloutConfig(k_schedule={-1: 4})


def test_concentration_schedule_is_validated_and_read_by_iteration():
    from common.config import PolicyConfig

    p = PolicyConfig(max_concentration=40.0, concentration_schedule={"6000": 100.0})
    assert [p.max_concentration_at(i) for i in (0, 5999, 6000, 10**6)] == [40.0, 40.0, 100.0, 100.0]
    assert PolicyConfig().max_concentration_at(5) is None
    with pytest.raises(ValueError, match="set max_concentration"):
        PolicyConfig(concentration_schedule={10: 50.0})
    with pytest.raises(ValueError, match="iterations >= 0"):
        PolicyConfig(max_concentration=5.0, concentration_schedule={-1: 50.0})
    with pytest.raises(ValueError):
        PolicyConfig(max_concentration=5.0, concentration_schedule={1: 0.0})


def test_the_tests_never_write_to_the_users_cache():
    from platformdirs import user_cache_dir

    from common.artifacts import cache_root

    assert cache_root() != Path(user_cache_dir("steinsched"))
    assert os.environ["STEINSCHED_CACHE"]


def test_auto_workers_count_the_clusters_gpus(monkeypatch):
    """num_workers='auto': one worker per rollout.num_gpus share of the cluster's GPUs (none: one line)."""
    import ray

    from learner.groups import RolloutGroup

    cfg = load_config(["--rollout.num_workers=auto", "--rollout.num_gpus=0.5"])
    group = RolloutGroup.__new__(RolloutGroup)
    group.num_gpus, group._reserved = cfg.rollout.num_gpus, []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert group.auto_count() == 16
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    with pytest.raises(ConfigError, match="the cluster has 0 GPUs, not one share of rollout.num_gpus=0.5"):
        group.auto_count()


@pytest.mark.parametrize(
    ("gpus", "share", "reserved", "workers"),
    [
        (2, 1.0, [0.25], 1),  # the HPS reward's quarter takes a device's room from a whole-GPU worker (was 2)
        (4, 1.0, [0.25, 0.25, 0.25, 0.25], 3),  # four quarters packed on one device
        (2, 0.6, [], 2),  # one 0.6 share per device, not 2 // 0.6 = 3
        (3, 0.3, [0.5], 7),  # 3 per device, 1 beside the half a reward holds
        (4, 2.0, [0.1], 1),  # whole shares need whole devices
    ],
)
def test_auto_workers_pack_the_gpus_device_by_device_beside_the_rewards(monkeypatch, gpus, share, reserved, workers):
    """'auto' took every GPU share of the cluster's sum: a cluster that cannot grow left the
    reward servers' GPU share no room, and fractional shares were counted in the sum, not per
    device, so the last worker waited its start timeout for room that never came."""
    import ray

    from learner.groups import auto_workers, reserved_gpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": float(gpus)})
    assert auto_workers(share, reserved) == workers
    cfg = load_config(
        [
            "--rollout.num_workers=auto",
            "--rollout.num_gpus=1",
            '--rewards=[{"name": "toy", "num_servers": 2, "num_gpus": 0.25}]',
            '--learner.eval_metrics=[{"name": "digits_fd", "num_gpus": 0.5}]',
        ]
    )
    assert sorted(reserved_gpus(cfg)) == [0.25, 0.25, 0.5]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0})
    with pytest.raises(ConfigError, match=r"not one share of rollout.num_gpus=1 beside the 1 its reward and metric"):
        auto_workers(1.0, reserved_gpus(cfg))


def test_fractional_gpu_shares_that_fit_the_sum_but_no_device_are_refused_at_once(monkeypatch):
    """3 x 0.6 GPU on 2 GPUs fit the sum (1.8), not the devices: the third waited its start timeout."""
    import ray

    from learner import groups

    monkeypatch.setattr(groups, "own_cluster", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match=r"fit in its 2 GPUs together but not one device at a time"):
        groups.check_room([("rollout workers", 3, {"CPU": 0.25, "GPU": 0.6})])
    groups.check_room([("rollout workers", 2, {"CPU": 0.25, "GPU": 0.6}), ("rewards[0]", 2, {"GPU": 0.4})])


def test_min_workers_above_what_auto_starts_is_refused(monkeypatch):
    import ray

    from learner.groups import actor_asks

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 4.0})
    cfg = load_config(["--rollout.num_workers=auto", "--rollout.num_gpus=1", "--rollout.min_workers=6"])
    with pytest.raises(ConfigError, match=r"rollout.min_workers=6 exceeds the 4 workers rollout.num_workers='auto'"):
        actor_asks(cfg)  # what start_actors checks before any actor starts


def test_elastic_growth_never_replaces_a_worker_that_died_for_good(monkeypatch):
    """rollout.max_workers counts every worker started: a dead one keeps its place (else a worker
    that dies on every call would be started again forever, past rollout.max_restarts); room the
    cluster gained beyond that gets new workers."""
    from types import SimpleNamespace

    import ray

    from learner.groups import RolloutGroup

    group = RolloutGroup.__new__(RolloutGroup)
    group.num_cpus, group.num_gpus, group.max_workers, group.start_timeout_s = 0.5, 0, 3, 60.0
    group.workers, group.alive, group._joining = ["w0", "w1"], [1], {}  # w0 died for good
    started: list[int] = []

    def remote(index, *args, **kwargs):
        started.append(index)
        return SimpleNamespace(pid=SimpleNamespace(remote=lambda: f"ref{index}"))

    group._actor, group._args, group._kwargs = SimpleNamespace(remote=remote), (), {}
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: (refs, []))  # it answers at once
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: 123)
    assert group.grow() == 0 and started == [2]  # one place left of three, not two; started, not waited for
    monkeypatch.setattr(ray, "available_resources", lambda: pytest.fail("the cluster asked while one is joining"))
    assert group.grow() == 1 and group.alive == [1, 2] and started == [2]  # it joins at the next launch
    assert group.grow() == 0 and started == [2]  # no room left: the cluster is not asked (a call per launch)


@pytest.mark.parametrize(
    ("program", "argv", "why"),
    [
        ("learner.evaluate", [], "the following arguments are required: --run"),
        ("learner.evaluate", ["--run", "r", "--seeds", "0"], "argument --seeds: must be from 2 to"),
        (  # a config flag before '--' was only "unrecognized arguments"
            "learner.evaluate",
            ["--run", "r", "--rollout.num_workers=4"],
            "unrecognized arguments: --rollout.num_workers=4; config flags go after '--': python -m learner.evaluate"
            " ... -- --rollout.num_workers=4",
        ),
        ("rollout.generate", ["--run", "r"], "the following arguments are required: --prompt"),
        ("rollout.generate", ["--run", "r", "--prompt", "x", "--sed", "0"], "unrecognized arguments: --sed 0"),
        ("rewards.http_server", ["--reward", "toy", "--port", "http"], "argument --port: expected an integer"),
    ],
)
def test_the_tools_flag_mistakes_are_one_line(program, argv, why, capsys):
    """learner.main's mistakes were one line; the other tools printed argparse's usage block of
    five lines first."""
    main = importlib.import_module(program).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: invalid command line: {why}") and line.endswith("(--help lists every flag)")


def test_schedule_entries_past_the_end_of_the_run_are_announced(tmp_path, capsys):
    """digits_long.yaml's schedules (K = 8 from iteration 500, ...) copied into a shorter run
    never took effect, silently."""
    from learner.main import main

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    flags = ["--learner.iterations=10", "--rollout.k_schedule={5: 4, 5000: 8, 10: 16}", "--policy.max_concentration=50"]
    flags += ["--policy.concentration_schedule={5000: 100}", f"--experiment.output_dir={a_file}"]
    assert main(flags) == 2  # refused before any work: the output dir is a file
    assert capsys.readouterr().out.splitlines() == [
        "warning: rollout.k_schedule at iteration 10, 5000 is never in force: the run has learner.iterations=10",
        "warning: policy.concentration_schedule at iteration 5000 is never in force: the run has learner.iterations=10",
    ]
    assert load_config(["--learner.iterations=10", "--rollout.k_schedule={9: 4}"]).never_in_force() == []


def test_a_resume_may_change_how_workers_downscale_but_not_what_they_sample():
    from common.config import RUN_FLAGS, resume_conflicts

    saved = Config().model_dump(mode="json", exclude=RUN_FLAGS)
    # the same images on any number of threads (rewards.images.downscale)
    assert resume_conflicts(saved, Config(rollout={"image_threads": 8})) == []
    assert resume_conflicts(saved, Config(rollout={"image_threads": 8, "k": 4})) == ["rollout.k"]
