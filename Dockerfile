# docker build -t steinsched:0.1.0 .      (docs/deploy.md: build, push, and the manifests that run it)
#
# The image every node of a steinsched cluster runs: Ray's own CUDA image (the Ray version the
# manifests name, Python 3.11, CUDA 12.8, the non-root user `ray`), with this package and its
# dependencies installed once at build time, so that a job ships only its config and never
# builds an environment on the nodes. Model weights are not baked in: mount a cache volume at
# /home/ray/.cache/huggingface (or set HF_HOME) and pre-download, or let the first job fetch them.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cu128

# the image's own user (ray) owns the code; root only makes its directory
USER root
RUN mkdir -p /app/steinsched && chown ray:users /app/steinsched
USER ray
WORKDIR /app/steinsched

# the dependencies first, from the package metadata alone: a code change does not reinstall torch
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p common rollout rewards learner \
    && touch common/__init__.py rollout/__init__.py rewards/__init__.py learner/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall -y steinsched

COPY --chown=ray:users common ./common
COPY --chown=ray:users rollout ./rollout
COPY --chown=ray:users rewards ./rewards
COPY --chown=ray:users learner ./learner
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users deploy ./deploy
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import common, rollout, rewards, learner; print('steinsched installed')"

ENV TOKENIZERS_PARALLELISM=false \
    HF_HUB_DISABLE_TELEMETRY=1
# KubeRay and `ray up` start Ray themselves; alone, the image runs the entry point's help
CMD ["python", "-m", "learner.main", "--help"]
