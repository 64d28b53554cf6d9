# emaki bot image: CUDA runtime, non-root user, data dir as a volume. Default command: `emaki bot`.
#   docker build -t emaki .
#   docker run --gpus all -e DISCORD_TOKEN -e HF_TOKEN -v emaki-data:/data emaki
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    EMAKI_DATA_DIR=/data HF_HOME=/data/hf-cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 emaki && mkdir -p /data && chown emaki:emaki /data
WORKDIR /app
RUN python3 -m venv /opt/venv && chown -R emaki:emaki /opt/venv /app
ENV PATH=/opt/venv/bin:$PATH
USER emaki

COPY --chown=emaki:emaki pyproject.toml README.md requirements.lock ./
COPY --chown=emaki:emaki emaki ./emaki
COPY --chown=emaki:emaki engine ./engine
COPY --chown=emaki:emaki bot ./bot
COPY --chown=emaki:emaki training ./training
# torch==2.13.0 from PyPI is the CUDA build on Linux x86-64; everything else at the lock's versions.
RUN pip install torch==2.13.0 && pip install -c requirements.lock ".[mp4,cluster]"

VOLUME ["/data"]
CMD ["emaki", "bot"]
