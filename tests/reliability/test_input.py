"""Careless and hostile input: every mistake is one clear message and exit status 2, found at
startup, before Ray starts and before anything is written. No Ray here."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import ConfigError, load_config
from common.prompts import MAX_PROMPT_CHARS
from learner.main import main
from rewards.registry import check_scores, resolve


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


def _yaml(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("flag", "field"),
    [
        ("--learner.lr=inf", "learner.lr"),
        ("--learner.weight_decay=nan", "learner.weight_decay"),
        ("--policy.concentration=inf", "policy.concentration"),
        ("--policy.max_concentration=1e300", "policy.max_concentration"),
        ("--learner.grad_clip=-inf", "learner.grad_clip"),
        ('--rewards=[{"name": "toy", "weight": NaN}]', "rewards.0.weight"),
        ("--rollout.k=100000", "rollout.k"),
        ("--rollout.contexts_per_iter=100000000", "rollout.contexts_per_iter"),
        ("--learner.eval_seeds=1000000000", "learner.eval_seeds"),
        ("--policy.widths=[0]", "policy.widths.0"),
        ("--policy.widths=[1000000]", "policy.widths.0"),
        ("--rollout.sample_timeout_s=0", "rollout.sample_timeout_s"),
        ("--experiment.seed=99999999999999999999999", "experiment.seed"),  # was an overflow once the workers drew
        # Ray's ValueError as a traceback once Ray had started
        ("--rollout.num_gpus=1.5", "rollout.num_gpus: 1.5 GPUs: more than one must be a whole number"),
        ("--rollout.num_cpus=0.00001", "rollout.num_cpus: 1e-05 is below 0.0001, the smallest share Ray reserves"),
        ('--rewards=[{"name": "toy", "num_gpus": 2.5}]', "rewards.0.num_gpus: 2.5 GPUs"),
    ],
)
def test_non_finite_and_unbounded_numbers_are_refused(capsys, tmp_path, flag, field):
    _fails(capsys, ["--config", "configs/toy.yaml", f"--experiment.output_dir={tmp_path}", flag], field)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused config"


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        # trained the whole run on a reward of 0
        (["--rewards=[{name: toy, weight: 0}]"], ["rewards: every weight is 0"]),
        # every rollout at the toy's floor: the cap scaled each alpha below alpha_min
        (
            ["--policy.max_concentration=0.5", "--policy.concentration_schedule={}"],
            ["policy.max_concentration=0.5 is below policy.alpha_min x (rollout.steps + 1) = 5"],
        ),
        (["--policy.concentration_schedule={100: 2.0}"], ["policy.concentration_schedule[100]=2"]),
        # trained the whole run (500 iterations and the global baseline), then the FD's reshape error as a traceback
        (
            ["--sampler.backend=toy", "--rewards=[{name: toy}]", "--learner.eval_metrics=[{name: digits_fd}]"],
            ["learner.eval_metrics[0]: metric 'digits_fd' reads only the samples of the digits backend", "with toy"],
        ),
        (["--rewards=[{name: digits}]"], ["rewards[0]: reward 'digits' reads only the samples of the digits"]),
        (["--config=configs/digits.yaml", "--rewards=[{name: toy}]"], ["reward 'toy' reads only the samples of"]),
        # an unknown name or a misspelt kwarg: the server's error, once Ray and the run had started
        (
            ["--rewards=[{name: toy}, {name: tyo}]"],
            ["rewards[1]: unknown reward 'tyo': use one of [", "'toy'", "or an import path"],
        ),
        (["--learner.eval_metrics=[{name: fd}]"], ["learner.eval_metrics[0]: unknown metric 'fd'", "'digits_fd'"]),
        (
            ["--config=configs/digits.yaml", "--rewards=[{name: digits, kwargs: {clasifier: x}}]"],
            ["rewards[0]: reward 'digits': bad kwargs ['clasifier']: got an unexpected keyword argument 'clasifier'"],
        ),
        (
            ["--config=configs/digits.yaml", "--learner.eval_metrics=[{name: digits_fd, kwargs: {nope: 1}}]"],
            ["learner.eval_metrics[0]: metric 'digits_fd': bad kwargs ['nope']"],
        ),
        (["--rewards=[{name: toy, kwargs: {sampler: {}}}]"], ["reward 'toy': kwargs 'sampler' is given by the run"]),
    ],
)
def test_settings_that_could_only_waste_the_run_are_refused_before_it(capsys, tmp_path, flags, needles):
    config = [] if any(f.startswith("--config") for f in flags) else ["--config", "configs/toy.yaml"]
    _fails(capsys, [*config, f"--experiment.output_dir={tmp_path}", *flags], *needles)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused config"


def test_a_field_of_either_kind_is_one_line_without_pydantic_s_names_for_them(capsys, tmp_path):
    """A number or 'auto': was two lines, 'rollout.num_workers.constrained-int: ...' and
    "rollout.num_workers.literal['auto']: ..."."""
    err = _fails(capsys, [f"--experiment.output_dir={tmp_path}", "--rollout.num_workers=-3"], "rollout.num_workers")
    assert err.strip().splitlines() == [
        "error: invalid config: rollout.num_workers: Input should be greater than or equal to 1 or 'auto' (got '-3')"
    ]


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", "."])
def test_run_name_stays_under_output_dir(capsys, tmp_path, name):
    _fails(capsys, [f"--experiment.output_dir={tmp_path}", f"--experiment.name={name}"], "experiment.name")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("x" * 300, "each part must be at most 255 bytes"),  # was OSError: File name too long, a traceback
        ("runs/" + "y" * 256, "each part must be at most 255 bytes"),
        (" ", "not blank"),  # made a directory named ' '
        ("a\nb", "with a control character"),  # a directory with a newline in its name
    ],
)
def test_a_run_name_is_a_directory_name_the_filesystem_takes(tmp_path, name, why):
    with pytest.raises(ConfigError, match=f"experiment.name: .*{why}"):
        load_config([], experiment={"name": name, "output_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())


def test_empty_prompt_lists_are_errors_not_a_silent_fallback(capsys, tmp_path):
    cfg = _yaml(tmp_path, "learner:\n  train_prompts: []\n")
    _fails(capsys, ["--config", cfg], "learner.train_prompts: the list holds no prompt")
    cfg = _yaml(tmp_path, 'learner:\n  eval_prompts: ["class 1", "\\u200b "]\n')
    _fails(capsys, ["--config", cfg], "learner.eval_prompts: prompt 2 is empty or holds only invisible")
    cfg = _yaml(tmp_path, f"learner:\n  train_prompts: ['{'x' * (MAX_PROMPT_CHARS + 1)}']\n")
    _fails(capsys, ["--config", cfg], "learner.train_prompts: prompt 1 has 4097 characters; the limit is 4096")


def test_duplicate_yaml_keys_and_a_second_config_are_errors(capsys, tmp_path):
    cfg = _yaml(tmp_path, "learner:\n  lr: 0.1\n  lr: 0.2\n")
    _fails(capsys, ["--config", cfg], "duplicate key 'lr'", "line 2")
    cfg = _yaml(tmp_path, "learner: {lr: 0.1}\nlearner: {lr: 0.2}\n")
    _fails(capsys, ["--config", cfg], "duplicate key 'learner'")
    _fails(capsys, ["--config", "configs/toy.yaml", "--config", "configs/digits.yaml"], "--config given 2 times")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "learner:\n  lr: [1, 2\n",
            "line 3, column 1: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence at line 2, column 7)",
        ),
        (
            "learner:\n  lr: 0.1\n lr2: 3\n",
            "line 3, column 2: expected <block end>, but found '<block mapping start>'"
            " (while parsing a block mapping at line 1, column 1)",
        ),
        ("learner:\n  lr: 0.1\n  lr: 0.2\n", "line 3, column 3: duplicate key 'lr' (first at line 2)"),
        ("learner: *nope\n", "line 1, column 10: found undefined alias 'nope'"),
        (
            "learner:\tx\n",
            "line 1, column 9: found character '\\t' that cannot start any token (while scanning for the next token)",
        ),
        (
            "a: !!python/object/apply:os.system [ls]\n",
            "line 1, column 4: could not determine a constructor for the tag"
            " 'tag:yaml.org,2002:python/object/apply:os.system'",
        ),
        ("rewards:\n  - &r {name: toy, kwargs: {x: *r}}\n", "line 2, column 5: found unconstructable recursive node"),
    ],
)
def test_malformed_yaml_is_one_line_naming_line_and_column(capsys, tmp_path, text, message):
    """PyYAML's messages quote the text over several lines as "<unicode string>"; each is one line
    here, naming the file, where, and what the parser was reading. No tag runs code."""
    path = _yaml(tmp_path, text)
    err = _fails(capsys, ["--config", path])
    assert err == f"error: config file {path} is not valid YAML: {message}\n", err


def test_unreadable_config_files(capsys, tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    _fails(capsys, ["--config", str(binary)], "is not UTF-8 text")
    _fails(capsys, ["--config", str(tmp_path)], "is a directory")
    _fails(capsys, ["--config", str(tmp_path / "missing.yaml")], "not found")
    for text in ("", "\n\n", "# the settings were never saved\n", "{}\n"):  # ran the defaults: the digits demo
        _fails(capsys, ["--config", _yaml(tmp_path, text)], "holds no settings (it is empty, or comments only)")


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--experiment.output_dir=", "experiment.output_dir: is blank"),
        ("--experiment.output_dir= ", "experiment.output_dir: is blank"),
        ("--learner.checkpoint_dir=", "learner.checkpoint_dir: is blank"),
        ("--sampler.flux.prompt_file=", "sampler.flux.prompt_file: is blank"),
        ("--sampler.sd.eval_prompt_file= ", "sampler.sd.eval_prompt_file: is blank"),
        ("--config=", "--config is blank"),
    ],
)
def test_a_blank_directory_is_refused_not_read_as_this_one(capsys, flag, said):
    """``--experiment.output_dir=$OUT`` with OUT unset ran in the current directory; a blank
    checkpoint dir was the run dir's own, silently; a blank config or prompt file was 'the config
    file . is not a regular file (it is a directory)'."""
    _fails(capsys, [flag], f"{said} (an unset variable in the command?)")


def test_config_files_that_would_hang_or_exhaust_memory_are_refused_at_once(capsys, tmp_path, monkeypatch):
    """A FIFO with no writer, an endless device, a file of gigabytes, the "billion laughs" (ten
    aliases nested nine deep: 10^9 values from 400 bytes) and nesting past the parser's stack:
    each one line, read no further than needed. Anchors used as configs use them still load."""
    import os

    from common import config

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    _fails(capsys, ["--config", str(fifo)], f"config file {fifo} is not a regular file")
    _fails(capsys, ["--config", "/dev/zero"], "config file /dev/zero is not a regular file")
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 2**20)
    _fails(capsys, ["--config", _yaml(tmp_path, "#" * 2**20 + "\n")], "is larger than 1 MiB: is it a config?")
    monkeypatch.undo()
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    laughs += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = _yaml(tmp_path, "rewards:\n  - name: toy\n    kwargs:\n" + "".join(f"      {x}\n" for x in laughs))
    _fails(capsys, ["--config", bomb], "holds more than 1,000,000 values once its aliases are expanded")
    deep = _yaml(tmp_path, "learner:\n  lr: " + "[" * 50_000 + "]" * 50_000 + "\n")
    _fails(capsys, ["--config", deep], "nests its lists or mappings too deeply")
    shared = _yaml(
        tmp_path,
        "rewards:\n  - {name: toy, kwargs: &k {floor: -3.0}}\n  - {name: toy, weight: 0.5, kwargs: *k}\n",
    )
    cfg = load_config(["--config", shared])
    assert [r.kwargs for r in cfg.rewards] == [{"floor": -3.0}, {"floor": -3.0}]


def _prompt_file(tmp_path, data: bytes | None, name: str = "p.txt"):
    p = tmp_path / name
    if data is None:
        p.mkdir()
    else:
        p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "holds no prompt"),
        (b"\n \n\t\n", "holds no prompt"),
        (b"a cat\n\xc3\x28 broken\n", "is not UTF-8 text (byte 6, line 2)"),
        (None, "is not a regular file"),
        (b"x" * 1_300_000, "line 1 has 1300000 characters; the limit is"),
        ("a cat\n\u200b\u200b\n".encode(), "line 2 holds only invisible characters"),
        # a NUL-separated file (/proc/self/environ) was one prompt, echoed whole in the next error
        (b"A=1\x00TOKEN=secret\x00" * 30, "line 1 holds a control character ('\\x00' at 4): 'A=1\\x00TOKEN="),
        (b"a \x1b[31mred\x1b[0m cat\n", "line 1 holds a control character ('\\x1b' at 3)"),
    ],
)
def test_bad_prompt_files_fail_at_startup(capsys, tmp_path, data, needle):
    path = _prompt_file(tmp_path, data)
    _fails(
        capsys,
        ["--sampler.backend=sd", f"--sampler.sd.prompt_file={path}", f"--experiment.output_dir={tmp_path}"],
        needle,
    )
    _fails(
        capsys,
        ["--sampler.backend=flux", f"--sampler.flux.eval_prompt_file={tmp_path / 'missing.txt'}"],
        "does not exist",
    )


def test_a_prompt_file_s_byte_order_mark_is_not_part_of_its_first_prompt(tmp_path):
    """A file saved by Notepad starts with a byte-order mark, which was kept in its first prompt
    ('\ufeffa cat'): another prompt for T5 and CLIP, without a word."""
    from common.prompts import read_prompt_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\r\na dog\r\n".encode("utf-8-sig"))
    assert read_prompt_file(path) == ["a cat", "a dog"]


def test_resume_takes_auto_or_a_checkpoint_and_excludes_overwrite(capsys, tmp_path):
    _fails(capsys, ["--resume=yes please"], "--resume takes 'auto', the name of one of the run's checkpoints")
    _fails(capsys, [f"--resume={tmp_path}"], "--resume takes")
    _fails(capsys, ["--resume=auto", "--overwrite=true"], "exclude each other")
    # a checkpoint's name, as --checkpoint takes it (it was refused with a message naming that very form)
    ckpt = tmp_path / "r" / "checkpoints" / "ckpt-00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    flags = [f"--experiment.output_dir={tmp_path}", "--experiment.name=r"]
    assert load_config([*flags, "--resume=ckpt-00000004"]).resume == str(ckpt)
    missing = f"--resume ckpt-00000002: no such checkpoint in {ckpt.parent}"
    err = _fails(capsys, [*flags, "--resume=ckpt-00000002"], missing)
    assert "  config:" not in err, "a check of the whole config is not labelled as a field"


def test_a_reward_class_without_call_is_refused():
    with pytest.raises(ValueError, match=r"class NoCall has no __call__\(images, prompts\) method"):
        resolve("tests.integration.rewards_for_tests:NoCall")


@pytest.mark.parametrize(
    ("scores", "kind"),
    [
        (["1.0", "2.0"], "strings"),
        ([True, False], "booleans"),
        ([1 + 0j, 2 + 0j], "complex numbers"),
        ([1.0, None], "objects"),
        (np.array([b"1", b"2"]), "bytes"),
    ],
)
def test_scores_must_be_real_numbers(scores, kind):
    with pytest.raises(ValueError, match=f"reward 'r' returned {kind}, not real numbers"):
        check_scores("r", scores, ["a", "b"])
    assert check_scores("r", np.array([1, 2], dtype=np.int64), ["a", "b"]).dtype == np.float32


def test_an_empty_list_flag_is_an_empty_list():
    assert load_config(["--learner.eval_metrics=[]"]).learner.eval_metrics == []


def test_load_config_errors_are_config_errors():
    with pytest.raises(ConfigError):
        load_config(["--learner.lr=nan"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_any_bytes_as_a_config_file_give_a_config_or_a_config_error(tmp_path, data):
    """Property: whatever bytes --config names, the loader answers with a Config or one
    ConfigError (the config loader's other fuzzing: tests/unit/test_fuzz.py)."""
    p = tmp_path / "fuzz.yaml"
    p.write_bytes(data)
    try:
        load_config(["--config", str(p)])
    except ConfigError as e:
        assert str(e)


def test_a_prompt_in_a_message_is_cut_short():
    """Every message quoting a prompt quoted it whole: 4096 characters on one line."""
    from common.prompts import check_prompts, shown

    assert shown("a cat") == "'a cat'"
    assert shown("x" * 5000) == f"{'x' * 60!r}... (5000 characters)"
    with pytest.raises(ValueError) as e:
        check_prompts(["ok", "\x00" + "z" * 4000])
    assert len(str(e.value)) < 160 and "(4001 characters)" in str(e.value)


@pytest.mark.parametrize(
    ("text", "flag", "section"),
    [
        ("sampler: toy\n", "--sampler.toy.dim=8", "sampler: a section of settings, given 'toy'"),
        ("experiment: 5\n", "--experiment.name=x", "experiment: a section of settings, given 5"),
        ("experiment: [1]\n", "--experiment.name=x", "experiment: a section of settings, given [1]"),
        ("sampler: {toy: 3}\n", "--sampler.toy.dim=8", "sampler.toy: a section of settings, given 3"),
        ("sampler:\nexperiment: {name: a}\n", "--sampler.toy.dim=8", "sampler: a section of settings, given nothing"),
    ],
)
def test_a_section_given_as_something_else_is_refused_whatever_flags_set_in_it(capsys, tmp_path, text, flag, section):
    """``sampler: toy`` was refused alone, but with ``--sampler.toy.dim=8`` pydantic-settings merged
    the flag's section over it: the default sampler (digits) trained, without a word."""
    config = _yaml(tmp_path, text)
    _fails(capsys, ["--config", config, f"--experiment.output_dir={tmp_path / 'out'}"], text.split(":")[0])
    _fails(capsys, ["--config", config, f"--experiment.output_dir={tmp_path / 'out'}", flag], section)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "why"),
    [
        ("--ray.init_kwargs={num_cpus: .inf}", "ValueError: Resource quantities must all be whole numbers."),
        ('--ray.init_kwargs={num_cpus: "abc"}', "AssertionError: CPU (<class 'str'>): abc"),
        ("--ray.init_kwargs={object_store_memory: 1}", "ValueError: Attempting to cap object store memory usage at 1"),
        ("--ray.num_cpus=100000000000000000000", "ray.num_cpus"),
        ("--rollout.max_restarts=100000000000000000000", "rollout.max_restarts"),  # Ray's OverflowError
    ],
)
def test_ray_settings_it_cannot_start_with_are_one_line(capsys, tmp_path, flag, why):
    """ray.init's own checks of its arguments were tracebacks (rc 1) after the run dir was made."""
    import ray

    err = _fails(capsys, ["--config", "configs/toy.yaml", f"--experiment.output_dir={tmp_path}", flag], why)
    assert "\n" not in err.strip() and not ray.is_initialized()
    if flag.startswith("--ray.init_kwargs"):
        assert err.startswith("error: Ray could not start (given ray.init_kwargs, ")
    assert not any(tmp_path.iterdir())


def test_an_image_path_is_checked_without_touching_what_the_user_has(tmp_path):
    """rollout.generate's --out, checked before sampling: a FIFO waited for a reader forever; a link
    to nothing was removed (its target left behind, empty); a file there is left as it was."""
    import os

    from rollout.generate import check_image_path

    fifo = tmp_path / "o.png"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=rf"^--out {fifo} is not a regular file; name an image file$"):
        check_image_path(fifo)
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "target.png")
    check_image_path(link)
    assert link.is_symlink() and not (tmp_path / "target.png").exists()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"an image")
    check_image_path(mine)
    assert mine.read_bytes() == b"an image"
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match=rf"^--out {loop} cannot be written: "):  # was a RuntimeError's traceback
        check_image_path(loop)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["link.png", "loop.png", "mine.png", "o.png"]


def test_a_number_without_a_point_is_a_number_in_free_kwargs_too(tmp_path):
    """PyYAML (YAML 1.1) read 1e-3 as the text '1e-3': a typed field converted it, but a reward's
    free kwargs kept the text, and the run failed at its first step (numpy's 'ufunc maximum did
    not contain a loop' on a string), after Ray and the workers had started."""
    config = _yaml(tmp_path, "rewards: [{name: toy, kwargs: {floor: 1e-3}}]\n")
    cfg = load_config(["--config", config, "--rewards=[{name: toy, kwargs: {floor: -1e1}}]"])
    assert cfg.rewards[0].kwargs == {"floor": -10.0}
    assert load_config(["--config", config]).rewards[0].kwargs == {"floor": 0.001}
    assert load_config(["--config", config, "--learner.lr=3e-4"]).learner.lr == 3e-4


@pytest.mark.parametrize("flag", ["--sampler.toy.spread=1e300", "--sampler.toy.mode_scale=1e300"])
def test_a_toy_mixture_too_wide_for_floats_is_refused_at_startup(capsys, tmp_path, flag):
    """An OverflowError on a worker mid-run (rc 1, the run dir left behind)."""
    field = flag[2:].split("=")[0]
    _fails(capsys, ["--config", "configs/toy.yaml", f"--experiment.output_dir={tmp_path}", flag], field)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["1e3", "2e-5", "+1E3", "1_0e1", "1.5e3"])
def test_a_text_that_reads_as_a_number_is_saved_quoted_and_loads_as_written(tmp_path, text):
    """A run's config.yaml is written with the loader's own rule for numbers: ``--experiment.name=1e3``
    was saved bare, then read back as 1000.0, and the run could not be resumed, evaluated or sampled."""
    cfg = load_config(
        ["--config", "configs/toy.yaml", f"--experiment.name={text}", f"--learner.eval_prompts=[{text!r}]"]
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_config(["--config", str(saved)])
    assert again.experiment.name == text and again.learner.eval_prompts == [text]
