"""Video files as sequences: frames and their presentation times, sampling to a fixed rate and length, a corrupt
file and a huge declared frame count refused, and class folders / manifests of videos picked by layout detection and
read as clips. The videos are written by PyAV, the library that reads them."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lepton.data.readers.sequence import read_sequence
from lepton.data.readers.video import is_video, probe_video, write_video
from lepton.errors import ConfigError, DataError

pytest.importorskip("av")


def ramp(n: int = 12, size: int = 16) -> np.ndarray:
    """Grey frames whose brightness is their index × 20, so which frame was read shows in the pixels."""
    return np.stack([np.full((size, size + 8), 20 * i, np.uint8) for i in range(n)])


def index_of(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) * 255 / 20) for f in frames]


@pytest.mark.parametrize("name", ["clip.mp4", "clip.avi"])
def test_video_frames_timing_and_resampling(tmp_path, name):
    path = write_video(tmp_path / name, ramp(), fps=10)
    assert is_video(path) and probe_video(path, max_frames=100, max_pixels=10**6).frames == 12
    clip = read_sequence(path)
    assert clip.frames.shape == (12, 3, 16, 24) and clip.timing == "pts"  # YUV 4:2:0, read as RGB
    assert np.allclose(clip.times, np.arange(12) / 10, atol=1e-3) and clip.fps == pytest.approx(10, rel=1e-3)
    assert index_of(clip.frames) == list(range(12))
    half = read_sequence(path, fps=5, length=5)  # every second frame, centred in the 1.2 s clip
    assert half.frames.shape == (5, 3, 16, 24) and np.allclose(half.times, np.arange(5) / 5)
    assert index_of(half.frames) == [1, 3, 5, 7, 9]
    looped = read_sequence(path, fps=10, length=15)  # longer than the video: read as a loop
    assert index_of(looped.frames)[12:] == [0, 1, 2]


def test_colour_video_keeps_rgb_and_magic_bytes_identify_it(tmp_path):
    frames = np.zeros((6, 16, 16, 3), np.uint8)
    frames[..., 0] = 200  # red
    path = write_video(tmp_path / "colour.mp4", frames, fps=25)
    renamed = path.rename(tmp_path / "colour.bin")
    assert is_video(renamed)  # the ISO BMFF 'ftyp' box, whatever the name
    clip = read_sequence(renamed)
    assert clip.frames.shape[1] == 3 and clip.frames[:, 0].mean() > 0.6 and clip.frames[:, 2].mean() < 0.2


def test_corrupt_and_truncated_videos_are_refused_naming_the_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"bad\.mp4: not a readable video file"):
        read_sequence(bad)
    good = write_video(tmp_path / "cut.avi", ramp(12, 32), fps=10).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(good[: len(good) // 20])  # the header and hardly any frame data
    with pytest.raises(DataError, match=r"cut\.avi"):
        read_sequence(cut)


def test_huge_declared_frame_count_and_size_are_refused(tmp_path):
    path = write_video(tmp_path / "huge.avi", ramp(), fps=10)
    data = bytearray(path.read_bytes())
    strh, avih = data.find(b"strh"), data.find(b"avih")
    struct.pack_into("<I", data, strh + 8 + 32, 10**9)  # the stream header's dwLength: a billion frames
    struct.pack_into("<I", data, avih + 8 + 16, 10**9)  # the main header's dwTotalFrames
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="declares 1000000000 frames, over the limit of 5000"):
        read_sequence(path, fps=5, length=4)
    small = write_video(tmp_path / "ok.mp4", ramp(), fps=10)
    with pytest.raises(DataError, match="over the limit of 100 pixels"):
        from lepton.data.readers.sequence import read_video

        read_video(small, max_pixels=100)
    with pytest.raises(DataError, match="12 frames is over|declares 12 frames, over the limit of 5"):
        read_sequence(small, max_frames=5)


def _video_classes(root: Path, n: int = 4) -> None:
    rng = np.random.default_rng(0)
    for label, level in (("still", 0), ("moving", 1)):
        (root / label).mkdir(parents=True)
        for i in range(n):
            frames = (rng.random((8, 16, 16)) * 40 + np.arange(8)[:, None, None] * 25 * level).astype(np.uint8)
            write_video(root / label / f"v{i}.mp4", frames, fps=8)


def test_video_folders_and_manifests_pick_the_sequence_task(tmp_path):
    from lepton.data.readers.clips import load_clips
    from lepton.tasks import choose_task

    _video_classes(tmp_path / "videos")
    name, layout = choose_task(tmp_path / "videos")
    assert (name, layout.name) == ("sequence", "video-folders") and "8 videos" in layout.evidence
    data = load_clips(tmp_path / "videos", fps=4, length=4, size=8)
    assert len(data) == 8 and data.images[0].shape == (3, 4, 8, 8) and data.label_names == ["moving", "still"]
    manifest = tmp_path / "videos.csv"
    manifest.write_text("path,label,age\n" + "".join(f"videos/{c}/v{i}.mp4,{c},{50 + i}\n" for c in ("still", "moving")
                                                     for i in range(4)))
    name, layout = choose_task(manifest)
    assert (name, layout.name) == ("sequence", "clip-manifest")
    with pytest.raises(ConfigError, match="--task classification contradicts the data"):
        choose_task(manifest, "classification")
    with pytest.raises(DataError, match="no covariates"):
        from lepton.data.readers.covariates import parse_covariates

        load_clips(tmp_path / "videos", fps=4, length=4, size=8, covariates=parse_covariates("age:numeric"))


@pytest.mark.slow
def test_train_sequence_on_a_folder_of_videos(tmp_path):
    """`lepton train` on class folders of MP4 files: the layout picks the sequence task, a clip model trains."""
    from typer.testing import CliRunner

    from lepton.cli import app

    _video_classes(tmp_path / "videos", n=6)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "videos"), "--model", "seq_attention", "--epochs", "1",
                                      "--batch-size", "4", "--output-dir", str(tmp_path / "runs"), "--name", "vid",
                                      "--task-option", "fps=4", "--task-option", "frames=4",
                                      "--task-option", "size=16", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "sequence" in result.output
    from lepton.runs import load_run

    run = load_run(tmp_path / "runs" / "vid")
    answer = run.predict([tmp_path / "videos" / "moving" / "v0.mp4"])[0]
    assert answer["label"] in ("moving", "still")
