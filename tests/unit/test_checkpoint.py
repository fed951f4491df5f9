"""Checkpoints: atomic layout, manifest verification, damaged ones skipped, the last N kept."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from common.checkpoint import find_latest, list_checkpoints, load_checkpoint, save_checkpoint, verify
from common.policy import SchedulePolicy

TINY = {"widths": [8, 8], "groups": 4, "attn_heads": 2, "head_hidden": 8, "input_kind": "vector"}


def _policy(seed=0):
    torch.manual_seed(seed)
    return SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()


def test_save_load_round_trip(tmp_path):
    pol = _policy(0)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    pol(_inp()).sum().backward()
    opt.step()
    ck = save_checkpoint(tmp_path, 7, pol, opt, {"iteration": 7, "version": 7, "cursor": 112})
    assert ck.name == "ckpt-00000007" and (tmp_path / "latest").read_text().strip() == ck.name
    assert verify(ck) is None
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]

    other = _policy(1)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = load_checkpoint(ck, other, opt2)
    assert state == {"iteration": 7, "version": 7, "cursor": 112}
    for a, b in zip(pol.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_a_checkpoint_of_another_shape_is_one_line_naming_it(tmp_path):
    from common.config import ConfigError

    pol = _policy(0)
    ck = save_checkpoint(tmp_path, 1, pol, torch.optim.AdamW(pol.parameters()), {"iteration": 1})
    torch.manual_seed(0)
    longer = SchedulePolicy(steps=4, in_channels=4, token_dim=6, **TINY).eval()  # L = 4, not 3
    with pytest.raises(ConfigError, match=r"ckpt-00000001 holds another policy's weights: size mismatch") as e:
        load_checkpoint(ck, longer, None)
    assert "\n" not in str(e.value)


def _inp():
    from common.policy import PolicyInputs

    return PolicyInputs(torch.randn(2, 4), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))


def test_damaged_checkpoint_is_skipped(tmp_path):
    pol = _policy()
    opt = torch.optim.AdamW(pol.parameters())
    save_checkpoint(tmp_path, 1, pol, opt, {"iteration": 1})
    ck2 = save_checkpoint(tmp_path, 2, pol, opt, {"iteration": 2})
    weights = ck2 / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    assert "bytes" in verify(ck2)
    msgs = []
    assert find_latest(tmp_path, log=msgs.append).name == "ckpt-00000001"
    assert "damaged" in msgs[0]
    ck3 = save_checkpoint(tmp_path, 3, pol, opt, {"iteration": 3})
    (ck3 / "state.json").write_text(json.dumps({"iteration": 999}))  # same size? no: hash catches it
    assert verify(ck3) is not None
    (ck3 / "manifest.json").unlink()
    assert "manifest" in verify(ck3)


def test_keeps_the_last_n(tmp_path):
    pol = _policy()
    opt = torch.optim.AdamW(pol.parameters())
    for i in range(1, 6):
        save_checkpoint(tmp_path, i, pol, opt, {"iteration": i}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004", "ckpt-00000005"]


def test_store_on_an_fsspec_url(tmp_path):
    import fsspec

    from common.checkpoint import CheckpointStore

    url = f"memory://ckpt-test-{tmp_path.name}/run"
    store = CheckpointStore(url)
    pol = _policy()
    opt = torch.optim.AdamW(pol.parameters())
    for i in (1, 2, 3):
        store.save(i, pol, opt, {"iteration": i}, keep=2)
    fs = fsspec.filesystem("memory")
    root = f"/ckpt-test-{tmp_path.name}/run"
    assert fs.cat(f"{root}/latest").decode().strip() == "ckpt-00000003"
    assert store.names() == ["ckpt-00000002", "ckpt-00000003"]
    local = store.latest()
    assert local.name == "ckpt-00000003" and verify(local) is None
    other = _policy(1)
    assert load_checkpoint(local, other, None) == {"iteration": 3}
    assert all(torch.equal(a, b) for a, b in zip(pol.state_dict().values(), other.state_dict().values(), strict=True))
    # a damaged remote checkpoint is skipped in favour of the previous one
    fs.pipe(f"{root}/ckpt-00000003/state.json", b'{"iteration": 99}')
    msgs = []
    assert store.latest(log=msgs.append).name == "ckpt-00000002" and "damaged" in msgs[0]


def _run_dir(tmp_path, checkpoints=0):
    """A finished run's directory as the loop leaves it: config.yaml, policy/, and ``checkpoints``."""
    from common.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config([]).to_yaml())
    pol = _policy()
    pol.save_pretrained(run / "policy")
    for i in range(1, checkpoints + 1):
        save_checkpoint(run / "checkpoints", i, pol, torch.optim.AdamW(pol.parameters()), {"iteration": i})
    return run


def test_a_damaged_run_is_one_line_naming_its_file(tmp_path):
    """What evaluate and generate read of a run: every damage is a ConfigError naming the file."""
    import pytest

    from common.checkpoint import load_run_config, load_run_policy
    from common.config import ConfigError

    run = _run_dir(tmp_path, checkpoints=1)
    assert load_run_policy(run).steps == 3 and load_run_config(run).experiment.name == "digits"
    assert load_run_config(run, ["--experiment.seed=5"]).experiment.seed == 5
    weights = run / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # truncated
    with pytest.raises(ConfigError, match=r"the policy in .*/policy cannot be loaded \(SafetensorError: .*header"):
        load_run_policy(run)
    assert load_run_policy(run, "latest").steps == 3  # the checkpoint is intact
    (run / "policy" / "config.json").write_text("{garbage")
    with pytest.raises(ConfigError, match=r"the policy in .*/policy cannot be loaded \(JSONDecodeError: "):
        load_run_policy(run)
    torch.manual_seed(0)
    SchedulePolicy(steps=3, in_channels=4, token_dim=6, **{**TINY, "widths": [8, 16]}).save_pretrained(run / "policy")
    (run / "policy" / "config.json").write_text(
        json.dumps({**json.loads((run / "policy" / "config.json").read_text()), "widths": [8, 8]})
    )
    with pytest.raises(ConfigError, match=r"cannot be loaded \(RuntimeError: .* size mismatch for blocks"):
        load_run_policy(run)
    (run / "policy" / "config.json").unlink()  # was the hub mixin's line, then a TypeError of missing arguments
    with pytest.raises(ConfigError, match=r"^the policy in .*/policy cannot be loaded: its config.json is missing$"):
        load_run_policy(run)
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is not a checkpoint \(it has no manifest.json or state"):
        load_run_policy(run, str(tmp_path))  # was 'checkpoint ... is damaged (unreadable manifest (...))'
    (ckpt,) = (run / "checkpoints").glob("ckpt-*")
    with pytest.raises(ConfigError, match=rf"\(a path is read from the current directory: give {run}/checkpoints/"):
        load_run_policy(run, f"checkpoints/{ckpt.name}")  # a path relative to the run, from elsewhere
    for manifest in ("[1]", '{"policy/model.safetensors": 3}'):  # JSON, not a manifest: an AttributeError
        (ckpt / "manifest.json").write_text(manifest)
        with pytest.raises(ConfigError, match=r"is damaged \(a manifest that is not a file -> \{bytes, sha256\}"):
            load_run_policy(run, str(ckpt))
    # the only checkpoint damaged: 'latest' names the damage, where it said there was no checkpoint 'latest'
    with pytest.raises(
        ConfigError, match=rf"^no undamaged checkpoint in .*checkpoints: each of {ckpt.name} is damaged$"
    ):
        load_run_policy(run, "latest")

    config = run / "config.yaml"
    config.write_text(config.read_text() + "old_section: {a: 1}\n")
    with pytest.raises(
        ConfigError, match=r"^the run's config .*/run/config.yaml: invalid config: old_section: unknown key"
    ):
        load_run_config(run)
    config.write_text("")
    with pytest.raises(ConfigError, match=r"^the run's config .*/run/config.yaml: it is empty$"):
        load_run_config(run)
    config.unlink()
    with pytest.raises(ConfigError, match=r"is not a run directory \(no config.yaml\)"):
        load_run_config(run)


def test_a_run_without_its_policy_says_what_it_has(tmp_path):
    import shutil

    import pytest

    from common.checkpoint import load_run_policy
    from common.config import ConfigError

    run = _run_dir(tmp_path, checkpoints=1)
    shutil.rmtree(run / "policy")
    with pytest.raises(ConfigError, match=r"has no final policy yet \(policy/\): pass --checkpoint latest$"):
        load_run_policy(run)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(ConfigError, match=r"has no final policy \(policy/\) and no checkpoint in .*/checkpoints$"):
        load_run_policy(run)


def test_checkpoint_storage_that_cannot_be_opened_is_one_line(tmp_path):
    """An unknown protocol, or one whose package is not installed: named with the URL, found by
    the run's claim on its directory, before anything starts."""
    import pytest

    from common.checkpoint import CheckpointStore
    from common.config import ConfigError, load_config
    from common.rundir import claim

    with pytest.raises(
        ConfigError, match=r"^checkpoint storage 'nosuchfs://bucket/run': ValueError: Protocol not known: nosuchfs$"
    ):
        CheckpointStore("nosuchfs://bucket/run")
    # a filesystem's own refusal was its traceback: zip:// of a directory, github:// without its arguments
    for url, why in (("zip://x", "IsADirectoryError: "), ("github://x/y", "TypeError: ")):
        with pytest.raises(ConfigError, match=rf"^checkpoint storage '{url}': {why}") as e:
            CheckpointStore(url)
        assert "\n" not in str(e.value)
    cfg = load_config([f"--experiment.output_dir={tmp_path}", "--learner.checkpoint_dir=nosuchfs://bucket/run"])
    with pytest.raises(ConfigError, match=r"^checkpoint storage 'nosuchfs://bucket/run'"):
        claim(cfg, log=lambda _: None)
    assert not cfg.run_dir.exists()


def test_a_checkpoint_that_runs_out_of_space_frees_what_it_wrote_and_says_so(tmp_path, monkeypatch):
    """A full disk met half-way through a checkpoint: torch says only "unexpected pos 287936 vs
    287828". It is ENOSPC naming the file, the half-written checkpoint is removed (its space
    freed), and the checkpoints before it stay whole and latest."""
    pol = _policy()
    opt = torch.optim.AdamW(pol.parameters())
    save_checkpoint(tmp_path, 1, pol, opt, {"iteration": 1})

    def torch_on_a_full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 287936 vs 287828")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, 2, pol, opt, {"iteration": 2})
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / f".ckpt-00000002.tmp-{os.getpid()}"))
    assert isinstance(e.value.__cause__, RuntimeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "latest"]
    assert find_latest(tmp_path).name == "ckpt-00000001" and verify(tmp_path / "ckpt-00000001") is None
    # with room left, torch's error is torch's own (not a full disk), and nothing is left behind either
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(tmp_path, 2, pol, opt, {"iteration": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", "latest"]


def test_a_directory_is_replaced_whole(tmp_path):
    """The run's policy/ was written in place by save_pretrained: a crash mid-write left a
    part-written policy that the tools then read."""
    from common.checkpoint import replace_dir, write_atomic

    final = tmp_path / "policy"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    made = tmp_path / ".policy.tmp-1"
    made.mkdir()
    (made / "model.safetensors").write_text("new")
    (made / "config.json").write_text("{}")
    stale = tmp_path / f".policy.old-{os.getpid()}"  # a crash's leftover, under a pid used again
    stale.mkdir()
    (stale / "x").write_text("x")
    replace_dir(made, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    assert (final / "model.safetensors").read_text() == "new" and (final / "config.json").exists()
    replace_dir(_filled(tmp_path / ".again", "x"), tmp_path / "fresh")  # nothing there before
    assert (tmp_path / "fresh" / "f").read_text() == "x"
    write_atomic(tmp_path / "eval.json", "{}")
    assert (tmp_path / "eval.json").read_text() == "{}" and not list(tmp_path.glob(".eval.json.tmp-*"))


def _filled(d, text):
    d.mkdir()
    (d / "f").write_text(text)
    return d


def test_a_fifo_where_a_file_is_read_is_one_line_not_a_hang(tmp_path):
    """A FIFO in place of the policy's weights hung every tool in safetensors' open, deaf to
    SIGTERM; one in place of a checkpoint's manifest hung its verification."""
    import os

    import pytest

    from common.checkpoint import read_policy, verify
    from common.config import ConfigError

    pol = _policy()
    pol.save_pretrained(tmp_path / "policy")
    (tmp_path / "policy" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "policy" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"its model.safetensors is not a regular file$"):
        read_policy(tmp_path / "policy")
    ck = save_checkpoint(tmp_path / "ckpts", 1, pol, torch.optim.AdamW(pol.parameters()), {"iteration": 1})
    (ck / "manifest.json").unlink()
    os.mkfifo(ck / "manifest.json")
    assert verify(ck) == "unreadable manifest (manifest.json is not a regular file)"


def test_a_gpu_learners_checkpoint_resumes_on_a_cpu_host(tmp_path):
    """A CUDA learner's optimizer.pt holds its moments as cuda:0 tensors (with fused AdamW its
    step too); loaded as saved, a resume on a host without that GPU failed: 'Attempting to
    deserialize object on a CUDA device'. The tensors are tagged cuda:0 here as a GPU save tags them."""
    pol = _policy(0)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    pol(_inp()).sum().backward()
    opt.step()
    registry = list(torch.serialization._package_registry)
    torch.serialization.register_package(0, lambda obj: "cuda:0", lambda obj, location: None)
    try:
        ck = save_checkpoint(tmp_path, 3, pol, opt, {"iteration": 3})
    finally:
        torch.serialization._package_registry[:] = registry
    with pytest.raises(RuntimeError, match="CUDA"):  # as it was saved: a GPU's tensors
        torch.load(ck / "optimizer.pt", weights_only=True)
    other = _policy(1)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_checkpoint(ck, other, opt2) == {"iteration": 3}
    moments = opt2.state_dict()["state"][0]["exp_avg"]
    assert moments.device.type == "cpu" and torch.equal(moments, opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.gpu
def test_a_cuda_learners_checkpoint_with_fused_adamw_resumes_on_the_cpu(tmp_path):
    """The same on a GPU: the learner's policy on CUDA, its fused AdamW's state (step included)
    CUDA tensors; resumed by a CPU learner, every moment lands on the CPU, equal."""
    pol = _policy(0).cuda()
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3, fused=True)
    from common.policy import PolicyInputs

    cuda = torch.device("cuda")
    inp = PolicyInputs(
        torch.randn(2, 4, device=cuda),
        torch.randn(2, 3, 6, device=cuda),
        torch.ones(2, 3, dtype=torch.bool, device=cuda),
    )
    pol(inp).sum().backward()
    opt.step()
    ck = save_checkpoint(tmp_path, 3, pol, opt, {"iteration": 3})
    other = _policy(1)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    load_checkpoint(ck, other, opt2)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert b["exp_avg"].device.type == "cpu" and torch.equal(a["exp_avg"].cpu(), b["exp_avg"])
    for a, b in zip(pol.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b)
