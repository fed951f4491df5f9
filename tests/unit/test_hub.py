"""A model named by a hub id that this machine has no copy of, and the hub cannot give: one line
naming what was asked for, why the hub gave nothing, and the setting that takes a local copy.
diffusers said ``X does not appear to have a file named model_index.json`` with the network down."""

from __future__ import annotations

import logging
import socket

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from common.config import FluxConfig, SDConfig
from common.hub import fetched, hub_problem
from rewards.hps import HPSReward
from rollout.backends.diffusers_common import load_pipeline
from rollout.backends.sd import sd_sampler
from tests.unit.test_hps import FIXTURE

PIPELINE = "give a local directory laid out as a diffusers pipeline (README: Real models and local weights)"
OFF = "downloads are off (local_files_only, or HF_HUB_OFFLINE=1)"


def test_a_pipeline_neither_here_nor_fetchable_is_one_line_naming_it_and_the_way_out():
    from diffusers import FluxPipeline

    with pytest.raises(OSError) as e:  # the sd backend reads model_index.json first
        sd_sampler(SDConfig(model="steinsched-tests/no-such-model", local_files_only=True))
    assert str(e.value) == (
        f"sampler model 'steinsched-tests/no-such-model' is neither a local path nor in the hub cache, and {OFF}:"
        f" {PIPELINE}"
    )
    with pytest.raises(OSError) as e:
        load_pipeline(FluxPipeline, FluxConfig(model="steinsched-tests/flux", local_files_only=True))
    assert str(e.value).startswith("sampler model 'steinsched-tests/flux' is neither") and OFF in str(e.value)


def _unreachable(*args, **kwargs):
    try:
        raise socket.gaierror(-2, "Name or service not known")
    except socket.gaierror as e:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e


def test_the_hub_out_of_reach_is_named_with_its_network_error_before_the_model_is_built(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _unreachable)
    with pytest.raises(OSError) as e:
        HPSReward(arch=str(FIXTURE / "tiny-hps.json"))
    assert str(e.value) == (
        "hps: the HPS v2.1 checkpoint (HPS_v2.1_compressed.pt of xswu/HPSv2) is neither a local path nor in the hub"
        " cache, and the hub cannot be reached (gaierror: [Errno -2] Name or service not known): give the path of a"
        " copy as the reward's kwargs checkpoint"
    )


def test_other_errors_pass_as_they_are():
    with pytest.raises(ValueError, match="^not the hub$"), fetched("x", "y"):
        raise ValueError("not the hub")
    with pytest.raises(FileNotFoundError, match="^no such file$"), fetched("x", "y"):
        raise FileNotFoundError("no such file")
    assert hub_problem(OSError("X does not appear to have a file named model_index.json.")) is None
    try:
        _unreachable()
    except LocalEntryNotFoundError as e:
        wrapped = OSError("X does not appear to have a file named model_index.json.")
        wrapped.__cause__ = e
        assert hub_problem(wrapped) == "the hub cannot be reached (gaierror: [Errno -2] Name or service not known)"
    # a client whose module name ends in digits of its own (urllib3, under requests): not taken for
    # another name (its digits stripped, it was "urllib", and the line said downloads were off)
    import urllib3  # requests' (ray[default] brings it)

    try:
        try:
            raise urllib3.exceptions.ProtocolError("Connection aborted.")
        except urllib3.exceptions.ProtocolError as e:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e
    except LocalEntryNotFoundError as e:
        assert hub_problem(e) == "the hub cannot be reached (ProtocolError: Connection aborted.)"


def test_the_hub_clients_retries_are_counted_in_the_line_not_printed(monkeypatch, tmp_path, capfd):
    """Each actor that loaded a model from an unreachable hub printed two lines per retry, five
    retries per file, over 23 s, before the one line; and diffusers' warning about an argument the
    hub client no longer reads came with every load."""
    import time
    import types
    import warnings

    from huggingface_hub.utils import _http

    waited: list[float] = []
    clock = types.SimpleNamespace(sleep=waited.append, time=time.time, monotonic=time.monotonic)
    monkeypatch.setattr(_http, "time", clock)  # the backoff's waits, without waiting
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError) as e, fetched("model 'a/b'", "give a local copy"):
        warnings.warn("The `local_dir_use_symlinks` argument is deprecated and ignored", UserWarning, stacklevel=1)
        huggingface_hub.hf_hub_download("a/b", "f.bin", endpoint=f"http://127.0.0.1:{port}", cache_dir=tmp_path)
    assert waited == [1, 2, 4, 8, 8]
    assert str(e.value).startswith("model 'a/b' is neither a local path nor in the hub cache, and the hub cannot be")
    assert str(e.value).endswith(" after 5 retries over 23 s: give a local copy")
    out, err = capfd.readouterr()
    assert "Retry" not in out + err and "thrown while requesting" not in out + err and "symlinks" not in out + err
    # outside a load, the hub client's lines are its own again
    assert not logging.getLogger("huggingface_hub.utils._http").filters
