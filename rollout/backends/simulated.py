"""The simulated backend: a sampler that costs what a real one costs and returns what a real one
returns, without a model. For capacity planning and for measuring the system's own overhead
(`bench/overhead.py`): everything but the model is real (the loop, the actors, the policy at the
backbone's size, the images' bytes through the object store).

- Time: ``seconds_per_call`` per call plus ``seconds_per_image_step`` per image per model
  evaluation (the reference samples included), spent sleeping, or busy on the GPU when
  ``busy='gpu'`` and one is present.
- Shapes: a preset of a real backbone (``flux``, ``sd3``, ``sdxl``) gives x_T, the text tokens
  and the pooled embedding, so the policy built for it has the real size; images are uint8
  ``[N, image_size, image_size, 3]``.
- Values: deterministic functions of (prompt, noise, schedule), so a run is reproducible and a
  schedule changes the image (and a reward on it), without meaning anything.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import numpy as np

from common.messages import SamplerSpec
from common.schedule import uniform_flow_tau
from rollout.sampler import PromptFeatures

#: x_T [C, h, w] at 1024x1024, text tokens (max length, width), pooled width of real backbones.
PRESETS: dict[str, dict[str, Any]] = {
    "flux": {"x_shape": (16, 128, 128), "max_tokens": 512, "token_dim": 4096, "pooled_dim": 768},
    "sd3": {"x_shape": (16, 128, 128), "max_tokens": 256, "token_dim": 4096, "pooled_dim": 2048},
    "sdxl": {"x_shape": (4, 128, 128), "max_tokens": 77, "token_dim": 2048, "pooled_dim": 1280},
    "tiny": {"x_shape": (4, 8, 8), "max_tokens": 8, "token_dim": 16, "pooled_dim": 16},
}


class SimulatedSampler:
    def __init__(
        self,
        preset: str = "flux",
        image_size: int = 1024,
        seconds_per_image_step: float = 0.025,
        seconds_per_call: float = 0.0,
        busy: str = "sleep",
        prompts: int = 64,
    ):
        if preset not in PRESETS:
            raise ValueError(f"unknown simulated preset {preset!r}; expected one of {sorted(PRESETS)}")
        if busy not in ("sleep", "gpu"):
            raise ValueError(f"busy must be 'sleep' or 'gpu', got {busy!r}")
        p = PRESETS[preset]
        self.preset, self.image_size = preset, image_size
        self.x_shape: tuple[int, ...] = tuple(p["x_shape"])
        self.max_tokens, self.token_dim, self.pooled_dim = p["max_tokens"], p["token_dim"], p["pooled_dim"]
        self.seconds_per_image_step, self.seconds_per_call = seconds_per_image_step, seconds_per_call
        self.busy = busy
        self.train_prompts = [f"simulated prompt {i}" for i in range(prompts)]
        self.eval_prompts = [f"simulated held-out prompt {i}" for i in range(max(2, prompts // 8))]
        self.nfe = 0  # model evaluations simulated so far (images x steps)
        self.busy_seconds = 0.0

    def spec(self) -> SamplerSpec:
        return SamplerSpec(
            backend="simulated",
            x_shape=self.x_shape,
            token_dim=self.token_dim,
            pooled_dim=self.pooled_dim,
            train_prompts=self.train_prompts,
            eval_prompts=self.eval_prompts,
        )

    def default_tau(self, steps: int) -> np.ndarray:
        return uniform_flow_tau(steps)

    def encode(self, prompts: list[str]) -> list[PromptFeatures]:
        out = []
        for p in prompts:
            rng = np.random.default_rng(zlib.crc32(p.encode()))
            n = min(self.max_tokens, len(p.split()) + 2)
            tokens = rng.standard_normal((n, self.token_dim), dtype=np.float32)
            out.append(PromptFeatures(tokens=tokens, pooled=rng.standard_normal(self.pooled_dim, dtype=np.float32)))
        return out

    def initial_noise(self, seeds: list[int]) -> np.ndarray:
        return np.stack([np.random.default_rng(s).standard_normal(self.x_shape, dtype=np.float32) for s in seeds])

    def _spend(self, seconds: float) -> None:
        start = time.perf_counter()
        if self.busy == "gpu":
            import torch

            from common.devices import resolve_device

            if resolve_device("auto").type == "cuda":  # a GPU this worker was given, not one it only sees
                a = torch.randn(2048, 2048, device="cuda")
                while time.perf_counter() - start < seconds:
                    a = a @ a
                    a = a / a.norm()
                    torch.cuda.synchronize()
                self.busy_seconds += time.perf_counter() - start
                return
        time.sleep(seconds)
        self.busy_seconds += time.perf_counter() - start

    def sample(self, prompts: list[str], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        """uint8 images [N, S, S, 3] after the cost of N x L model evaluations."""
        n, steps = times.shape
        self.nfe += n * steps
        self._spend(self.seconds_per_call + self.seconds_per_image_step * n * steps)
        # a deterministic image per (prompt, noise, schedule): a level from the noise's mean and the
        # schedule's first time, a tint from the prompt
        level = 0.5 + 0.1 * noise.reshape(n, -1).mean(1) + 0.3 * (1 - times[:, 0])
        tint = np.array([(zlib.crc32(p.encode()) % 64) / 255 for p in prompts])
        base = np.clip(np.stack([level, level + tint, level - tint], axis=1), 0, 1)  # [N, 3]
        side = self.image_size
        row = np.tile((base * 255).astype(np.uint8), (1, side))  # [N, S*3]: one row of pixels, copied S times
        return np.ascontiguousarray(np.broadcast_to(row[:, None, :], (n, side, side * 3))).reshape(n, side, side, 3)
