# The image the cluster runs (cluster.yaml, ray job submit): CUDA runtime, Ray, the pinned stack, clipaudit.
# Build: docker build -t clipaudit:latest .
FROM rayproject/ray:2.60.0-py311-cu124

WORKDIR /opt/clipaudit
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
COPY jobs ./jobs
RUN pip install --no-cache-dir -e . \
    && python -c "import clipaudit, open_clip, transformers, lancedb, ray"

ENV RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false
CMD ["python", "jobs/audit.py", "--config", "configs/demo.yaml"]
