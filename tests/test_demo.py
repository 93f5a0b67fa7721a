"""The README's first command keeps working: ``hack/demo.py`` (what ``make demo`` runs) takes
``examples/video.yaml`` through the real control plane, the operator and S3 to an MP4.

It starts and stops its own cluster, so it needs no fixture; it checks the downloaded video
and that the demo left no cluster process behind."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from smartdiff.io.video import read_mp4

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_applies_the_example_and_gets_an_mp4(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "demo.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cat-surfing   Succeeded   4/4" in proc.stdout
    assert "s3://videos/generated/default/cat-surfing.mp4" in proc.stdout
    video = tmp_path / "cat-surfing.mp4"
    info = read_mp4(video)
    assert info.frames.shape[0] == 5 and info.codec == "h264" and info.pix_fmt == "yuv420p"
    sha = hashlib.sha256(video.read_bytes()).hexdigest()
    assert f"sha256 {sha[:16]}" in proc.stdout  # the file is the one the status names
    assert "no process or port is left behind" in proc.stdout
