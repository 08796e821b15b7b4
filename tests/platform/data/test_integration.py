"""`speeder data prepare` and `speeder data stats` as a user runs them, on S3 (a loopback moto server)."""

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from speeder.schema import IMAGE_URI, IMAGES_DIR, ITEMS_FILE, META_FILE
from speeder_platform import storage

SPEEDER = os.path.join(os.path.dirname(sys.executable), "speeder")
COMMAND = [SPEEDER] if os.path.exists(SPEEDER) else [sys.executable, "-m", "speeder_platform.cli"]


@pytest.mark.integration
def test_cli_prepares_synthetic_dataset_on_s3(s3_bucket, assert_valid_dataset) -> None:
    out = f"{s3_bucket}/syn"
    overrides = ["synthetic.num_users=60", "synthetic.num_items=40", "synthetic.num_categories=4",
                 "synthetic.num_colors=2", "synthetic.image_size=16", "synthetic.missing_image_rate=0.1"]
    # The environment carries AWS_ENDPOINT_URL and the test credentials of the s3_server fixture.
    run = subprocess.run([*COMMAND, "data", "prepare", "synthetic", *overrides, "--out", out,
                          "--num-candidates", "10", "--max-history", "8"],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "splits: train" in run.stderr

    tables = assert_valid_dataset(out, num_candidates=10, max_history=8)
    meta = storage.read_json(storage.join(out, META_FILE))
    assert meta["counts"]["items"] == tables["items"].num_rows
    uris = [u for u in tables["items"].column(IMAGE_URI).to_pylist() if u is not None]
    assert 0 < len(uris) < tables["items"].num_rows
    assert len(storage.listdir(storage.join(out, IMAGES_DIR))) == len(uris) == meta["counts"]["images"]
    image = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, *uris[0].split("/")))))
    assert image.format == "PNG" and image.size == (16, 16)
    assert storage.read_table(storage.join(out, ITEMS_FILE)).num_rows == meta["counts"]["items"]

    stats = subprocess.run([*COMMAND, "data", "stats", out], capture_output=True, text=True,
                           env=dict(os.environ), timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert f"{meta['counts']['interactions']:,}" in stats.stdout
    assert f"{len(uris)} of {len(uris)} relative files present" in stats.stdout
