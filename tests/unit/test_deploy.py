"""Deploy files parse, start with the command that uses them, and run the real entry point."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO

FILES = sorted((REPO / "deploy").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_deploy_yaml(path):
    text = path.read_text()
    assert text.startswith("# ") and "learner.main" in text.splitlines()[0]
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    if data.get("kind") == "RayJob":
        assert data["spec"]["entrypoint"].startswith("python -m learner.main")
