# The image the cluster runs (cluster.yaml, ray job submit, deploy/kuberay/*.yaml): CUDA runtime, Ray, the pinned
# stack, clipaudit; the same image for the CPU head and the GPU workers.
# Build: docker build -t clipaudit:latest . ; push it where cluster.yaml / the RayJob name it.
FROM rayproject/ray:2.60.0-py311-cu124

# The base image runs as the user `ray` (group `users`): the project folder must be theirs for the editable install.
WORKDIR /opt/clipaudit
RUN sudo chown ray:users /opt/clipaudit
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users src ./src
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir -e . \
    && python -c "import clipaudit, open_clip, transformers, lancedb, ray, matplotlib" \
    && python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot"

ENV RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false
CMD ["python", "jobs/audit.py", "--config", "configs/demo.yaml"]
