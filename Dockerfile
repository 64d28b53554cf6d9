# emaki bot image: CUDA 13 base, Python 3.11, non-root user, data dir as a volume. Default command: `emaki bot`.
#   docker compose up -d                       (compose.yaml: GPU, .env, the data volume)
#   docker build -t emaki . && docker run --gpus all --env-file .env -v emaki-data:/data emaki
# First pull the models into the volume (run time never downloads):
#   docker compose run --rm bot emaki models pull
#
# Why this base: PyPI's torch==2.13.0 Linux x86-64 wheel (the lock's pin) depends on cuda-toolkit==13.0.x and
# nvidia-*-cu13 wheels, so it carries its own CUDA 13 libraries; the host needs only an NVIDIA driver >= 580
# and the NVIDIA container toolkit. The CUDA base still earns its place: its NVIDIA_REQUIRE_CUDA=cuda>=13.0
# makes the toolkit refuse to start the container on an older driver with a clear message, instead of torch
# silently falling back to the CPU. `base` is the smallest flavour (no cuDNN/cuBLAS: the wheels bring them).
# Its CUDA major must stay the torch wheel's (tests/test_docker.py checks it against the lock's torch pin).
FROM nvidia/cuda:13.0.2-base-ubuntu22.04

# Python 3.11, as in the lock and CI: Ubuntu 22.04 ships 3.10, so it comes from the deadsnakes PPA.
# tini is PID 1: it forwards SIGTERM to the bot (which stops cleanly, see bot/service.py) and reaps the
# ffmpeg children the MP4 export starts.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv tini \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

# uid 10001: clear of the base image's accounts (Ubuntu 24.04 images already own uid 1000, `ubuntu`) and of
# the host's first users, so a bind-mounted data dir is never silently shared with a person's files.
RUN groupadd --system --gid 10001 emaki \
 && useradd --system --uid 10001 --gid emaki --create-home --home-dir /home/emaki --shell /usr/sbin/nologin emaki \
 && mkdir -p /data && chown emaki:emaki /data

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    EMAKI_DATA_DIR=/data HF_HOME=/data/hf-cache
# Installed as root, run as emaki: the bot cannot rewrite its own code or libraries.
RUN python3.11 -m venv /opt/venv
# torch first, alone (the largest layer, cached across code changes). PyPI's 2.13.0 on Linux x86-64 is the CUDA
# 13 build; the lock drops the local tag (+cpu) so the same pin serves both.
RUN pip install torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY emaki ./emaki
COPY engine ./engine
COPY bot ./bot
COPY training ./training
RUN pip install -c requirements.lock ".[mp4,cluster]"

USER emaki
VOLUME ["/data"]
# `emaki health` reads the heartbeat the connected bot rewrites every 30 s (no torch, no Discord call). The
# start period covers the first model load from the volume; a failing beat during it does not count.
HEALTHCHECK --interval=60s --timeout=20s --start-period=15m --retries=3 CMD ["emaki", "health"]
# Exec form under tini: SIGTERM (docker stop) reaches the bot, which finishes its current store write, leaves
# the running job to resume at the next start, closes Discord and exits 0 (compose gives it 30 s).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["emaki", "bot"]
