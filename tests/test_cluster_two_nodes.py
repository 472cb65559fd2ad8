"""The multi-node path on this machine: two ``ray start`` nodes on 127.0.0.1 (own ports, own temp folders; see
cluster_helpers.py), the whole audit submitted with ``ray job submit --working-dir``, on local files and on an S3
API server of our own (moto) for both the images and the run_dir; then nodes too small for the plan.

The corpus is a generated Flickr8k layout (``Flickr8k.token.txt`` plus JPEGs of generated scenes), tiny models,
the LLM stages as a dry run. Every process started here is stopped by pid.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cluster_helpers import RayCluster, ray_cluster, s3_server, submit_audit

from clipaudit.probe.scenes import make_scene

pytestmark = pytest.mark.ray

IMAGES = 16


def write_flickr8k_layout(folder: Path, n: int = IMAGES) -> Path:
    """``n`` generated scenes as JPEGs and their captions in Flickr8k's token layout, under ``folder``."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for index in range(n):
        image, spec = make_scene(11, index)
        name = f"{1000 + index}_scene.jpg"
        image.save(images / name, quality=90)
        lines += [f"{name}#{i}\t{caption}" for i, caption in enumerate(spec.captions())]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return folder


def audit_config(run_dir: str, captions: str, images: str) -> dict:
    return {
        "run_dir": run_dir,
        "dataset": {"format": "flickr8k", "captions": captions, "images": images},
        "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
        "embed": {"batch_size": 8, "actors_per_model": 1, "cpus_per_actor": 0.5},
        "neighbours": {"k": 4},
        "daf": {"max_overlap": None, "top_n": 3, "permutations": 10},
        "tcac": {"transforms": ["grayscale", "hflip"], "cases_per_transform": 2},
        "llm": {"dry_run": True},
        "report": {"daf_cases": 2, "tcac_cases": 1},
    }


def submit_and_wait(cluster: RayCluster, config_path: Path, env_vars: dict[str, str]) -> str:
    """Submit the audit with ``config_path``; assert it succeeds; return its logs."""
    status, logs = submit_audit(cluster, config_path, env_vars)
    assert status["status"] == "SUCCEEDED", f"{status['status']}: {status.get('message')}\n{logs[-6000:]}"
    return logs


def check_logs(logs: str) -> None:
    assert "2 node(s): node" in logs, "the driver planned its actors over both nodes"
    assert f"{IMAGES} in = {IMAGES} embedded + 0 rejected" in logs


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node of 2 CPUs each."""
    with ray_cluster(2, 2) as cluster:
        yield cluster


def test_audit_job_on_two_nodes_with_local_files(two_nodes: RayCluster, tmp_path: Path) -> None:
    corpus = write_flickr8k_layout(tmp_path / "flickr")
    run_dir = tmp_path / "run"
    config_path = tmp_path / "audit.yaml"
    config_path.write_text(yaml.safe_dump(audit_config(str(run_dir), str(corpus / "Flickr8k.token.txt"),
                                                       str(corpus / "images"))))
    check_logs(submit_and_wait(two_nodes, config_path, {}))

    from clipaudit.io.tables import RunTables

    tables = RunTables(str(run_dir))
    assert tables.count("samples") == IMAGES
    assert tables.count("image_embeddings_clip") == tables.count("image_embeddings_reference") == IMAGES
    assert tables.count("neighbours") == 2 * IMAGES
    assert tables.count("tcac_cases") == 2 * IMAGES
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["embedded"] == IMAGES
    assert (run_dir / "report" / "index.html").stat().st_size > 0


def test_audit_job_on_two_nodes_with_images_and_run_dir_on_s3(two_nodes: RayCluster, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = write_flickr8k_layout(tmp_path / "flickr")
    with s3_server() as s3:
        s3.upload_folder(corpus, "flickr8k")
        run_dir = f"s3://{s3.bucket}/runs/nightly"
        config_path = tmp_path / "audit.yaml"
        config_path.write_text(yaml.safe_dump(audit_config(run_dir, f"s3://{s3.bucket}/flickr8k/Flickr8k.token.txt",
                                                           f"s3://{s3.bucket}/flickr8k/images")))
        check_logs(submit_and_wait(two_nodes, config_path, s3.env))

        keys = s3.keys("runs/nightly/")
        assert "runs/nightly/summary.json" in keys and "runs/nightly/report/index.html" in keys
        tables = {key.split("/")[3] for key in keys if key.startswith("runs/nightly/lancedb/")}
        assert {"samples.lance", "image_embeddings_clip.lance", "neighbours.lance", "tcac_cases.lance"} <= tables
        summary = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="runs/nightly/summary.json")["Body"].read())
        assert summary["counts"]["embedded"] == IMAGES

        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        from clipaudit.io.tables import RunTables

        assert RunTables(run_dir).count("neighbours") == 2 * IMAGES


def run_cli(cluster: RayCluster, tmp_path: Path, *overrides: str, timeout_s: float) -> subprocess.CompletedProcess:
    """``clipaudit run`` (ingest + embed) as a driver joined to ``cluster``, on a generated synthetic corpus."""
    config = {"run_dir": str(tmp_path / "run"), "dataset": {"format": "synthetic", "num_images": 8, "seed": 1},
              "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
              "embed": {"batch_size": 4, "actors_per_model": 1, "cpus_per_actor": 0.5}}
    config_path = tmp_path / "small.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).with_name("clipaudit")), "run", "--config", str(config_path),
               "--stages", "ingest,embed", "--set", f"ray.address={cluster.address}", *overrides]
    return subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=timeout_s)


def test_nodes_of_one_cpu_each(tmp_path: Path) -> None:
    """Each node keeps 0.5 CPU after its model actor: the decode tasks fit in that (they used to ask for a whole
    CPU and wait forever); an actor that fits on no node fails within seconds and says what is missing."""
    with ray_cluster(1, 1) as cluster:
        done = run_cli(cluster, tmp_path, timeout_s=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "8 in = 8 embedded + 0 rejected" in done.stdout + done.stderr

        started = time.monotonic()
        fresh = tmp_path / "refused"  # a run_dir with work left: one whose images are all embedded places nothing
        fresh.mkdir()
        refused = run_cli(cluster, fresh, "--set", "embed.cpus_per_actor=1.5", timeout_s=120)
        elapsed = time.monotonic() - started
        assert refused.returncode != 0
        assert "a model actor needs 1.5 CPU on one node, and no node has that" in refused.stderr
        assert elapsed < 60, f"the misfit was reported after {elapsed:.0f} s"
