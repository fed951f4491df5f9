"""docs/use.md's three export examples, run as the page shows them on tiny random pipelines saved
to disk (tests/fixtures/tiny_pipelines.py) with policies built for them: only the model ids, the
run paths, the dtype and the device are swapped for the page's."""

from __future__ import annotations

import re

import pytest
import torch

from common.config import FluxConfig, PolicyConfig, SDConfig
from common.policy import SchedulePolicy, policy_kwargs
from rollout.backends.diffusers_common import DiffusersSampler
from tests.conftest import REPO
from tests.fixtures.tiny_pipelines import save_tiny

TINY = PolicyConfig(widths=[8, 8, 16, 16], groups=4, attn_heads=2, head_hidden=16, init="scratch")


def _example(name: str) -> str:
    page = (REPO / "docs" / "use.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if b.startswith(f"# {name}")]
    return code


def _policy(family: str, path, pipe_dir, variant: str = "conditional") -> str:
    if family == "flux":
        from diffusers import FluxPipeline

        from rollout.backends.flux import FluxFamily

        # trained at the pipeline's own size, as the example exports at (FLUX.1-dev's is 1024, our default; the
        # tiny pipeline's is smaller)
        flux = FluxConfig(model="x", height=None, width=None)
        sampler = DiffusersSampler(FluxFamily, FluxPipeline.from_pretrained(pipe_dir), flux)
    else:
        from diffusers import StableDiffusionXLPipeline

        from rollout.backends.sd import SDFamily

        sampler = DiffusersSampler(SDFamily, StableDiffusionXLPipeline.from_pretrained(pipe_dir), SDConfig(model="x"))
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"variant": variant})
    SchedulePolicy(**policy_kwargs(cfg, sampler.spec(), 3, sampler.default_tau(3))).save_pretrained(path)
    return str(path)


CPU = {"torch.bfloat16": "torch.float32", "torch.float16": "torch.float32", '"cuda"': '"cpu"'}


def _run(code: str, subs: dict[str, str], cwd) -> None:
    for a, b in subs.items():
        assert a in code, f"docs/use.md no longer names {a}"
        code = code.replace(a, b)
    for a, b in CPU.items():
        code = code.replace(a, b)
    exec(compile(code, "docs/use.md", "exec"), {"__name__": "__main__"})


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_flux_example(in_tmp):
    pipe = str(save_tiny("flux", in_tmp / "flux"))
    policy = _policy("flux", in_tmp / "policy", pipe)
    _run(_example("export_flux.py"), {"black-forest-labs/FLUX.1-dev": pipe, "runs/flux_dev_hps/policy": policy}, in_tmp)
    assert (in_tmp / "fox.png").stat().st_size > 0


def test_sdxl_example(in_tmp):
    pipe = str(save_tiny("sdxl", in_tmp / "sdxl"))
    policy = _policy("sdxl", in_tmp / "policy", pipe)
    subs = {"stabilityai/stable-diffusion-xl-base-1.0": pipe, "runs/sdxl_hps/policy": policy}
    _run(_example("export_sdxl.py"), subs, in_tmp)
    assert (in_tmp / "lighthouse.png").stat().st_size > 0


def test_global_example(in_tmp, capsys):
    pipe = str(save_tiny("flux", in_tmp / "flux"))
    policy = _policy("flux", in_tmp / "global", pipe, variant="global")
    subs = {"black-forest-labs/FLUX.1-dev": pipe, "runs/flux_dev_hps/global/policy": policy}
    _run(_example("export_global.py"), subs, in_tmp)
    sigmas = eval(capsys.readouterr().out.strip().splitlines()[-1])  # the printed list
    assert len(sigmas) == 3 and all(0 < s <= 1 for s in sigmas) and sigmas == sorted(sigmas, reverse=True)
