"""Checkpoints: atomic layout, manifest verification, damaged ones skipped, the last N kept."""

from __future__ import annotations

import json

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
    assert store._names() == ["ckpt-00000002", "ckpt-00000003"]
    local = store.latest()
    assert local.name == "ckpt-00000003" and verify(local) is None
    other = _policy(1)
    assert load_checkpoint(local, other, None) == {"iteration": 3}
    assert all(torch.equal(a, b) for a, b in zip(pol.state_dict().values(), other.state_dict().values(), strict=True))
    # a damaged remote checkpoint is skipped in favour of the previous one
    fs.pipe(f"{root}/ckpt-00000003/state.json", b'{"iteration": 99}')
    msgs = []
    assert store.latest(log=msgs.append).name == "ckpt-00000002" and "damaged" in msgs[0]
