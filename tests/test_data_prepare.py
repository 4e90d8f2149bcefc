"""data/prepare.py end to end: tiny models, a few mp4s (some broken), shards read back, resume skips work."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from t3.data import build_latent_dataset, read_video_list
from t3.data.synthetic import synthetic_video
from t3.video_io import write_video

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_prepare():
    spec = importlib.util.spec_from_file_location("t3_data_prepare", REPO_ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Tiny VAE + text encoder on disk, 8 listed videos: 4 good, and one each truncated, missing caption,
    too short, too small."""
    from t3.models.tiny import save_tiny_text_encoder, save_tiny_vae

    root = tmp_path_factory.mktemp("prepare")
    vae = save_tiny_vae(root / "vae")
    text_encoder = save_tiny_text_encoder(root / "text_encoder")
    videos = root / "videos"
    videos.mkdir()

    def write(name: str, index: int, frames: int = 12, height: int = 48, width: int = 64) -> str:
        pixels, caption = synthetic_video(index, frames=frames, height=height, width=width)
        write_video(videos / name, pixels, fps=8)
        return caption

    rows = [("videos/good0.mp4", write("good0.mp4", 0)), ("videos/good1.mp4", write("good1.mp4", 1))]
    write("truncated.mp4", 2)
    data = (videos / "truncated.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    rows.append(("videos/truncated.mp4", "a broken file"))
    write("nocaption.mp4", 3)
    rows.append(("videos/nocaption.mp4", ""))
    rows.append(("videos/short.mp4", write("short.mp4", 4, frames=3)))
    rows.append(("videos/good3.mp4", "a caption, with a comma"))
    write("good3.mp4", 5)
    rows.append(("videos/tiny.mp4", write("tiny.mp4", 6, height=16, width=16)))
    rows.append(("videos/good4.mp4", write("good4.mp4", 7)))
    with open(root / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    return {"root": root, "vae": vae, "text_encoder": text_encoder, "list": root / "list.csv"}


def _args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--videos", str(ws["list"]), "--vae", str(ws["vae"]), "--text-encoder", str(ws["text_encoder"]),
        "--preset", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--fps", "8",
        "--out", str(out), "--samples-per-shard", "3", "--no-tiled", "--no-progress", *extra,
    ]  # fmt: skip


def test_prepare_writes_readable_shards_and_resumes(workspace, tmp_path: Path, caplog):
    prepare = _load_prepare()
    out = tmp_path / "shards"
    assert prepare.main(_args(workspace, out)) == 0

    shards = sorted(out.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(out.glob(".*tmp"))
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in skipped} == {
        "videos/truncated.mp4": "unreadable",
        "videos/nocaption.mp4": "missing_caption",
        "videos/short.mp4": "too_few_frames",
        "videos/tiny.mp4": "too_small",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["num_skipped"] == 4 and manifest["num_shards"] == 3
    assert manifest["latent_shape"] == [4, 2, 4, 4] and manifest["text_dim"] == 16
    assert (manifest["height"], manifest["width"], manifest["frames"], manifest["fps"]) == (32, 32, 5, 8.0)
    assert manifest["vae_path"] == str(workspace["vae"])

    samples = list(build_latent_dataset(out, shuffle_shards=False))
    assert [s["meta"]["source"] for s in samples] == [
        "videos/good0.mp4", "videos/good1.mp4", "videos/good3.mp4", "videos/good4.mp4",
    ]  # fmt: skip
    captions = {row["path"]: row["caption"] for row in csv.DictReader(open(workspace["list"]))}
    for sample in samples:
        assert sample["caption"] == captions[sample["meta"]["source"]]
        assert sample["latents"].shape == (4, 2, 4, 4)
        assert sample["text"].shape == (512, 16) and sample["text_mask"].any()
        assert sample["meta"]["frame_indices"] == [0, 1, 2, 3, 4]

    # A rerun finds every shard complete and rewrites nothing.
    mtimes = {s.name: s.stat().st_mtime_ns for s in shards}
    with caplog.at_level(logging.INFO):
        assert prepare.main(_args(workspace, out)) == 0
    assert {s.name: s.stat().st_mtime_ns for s in shards} == mtimes
    assert caplog.text.count("complete") == 3
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 4

    # An interrupted run (shard 1 missing, a stale temporary file) rebuilds only that shard.
    (out / "shard-000001.tar").unlink()
    (out / ".shard-000001.tar.tmp").write_bytes(b"partial")
    assert prepare.main(_args(workspace, out)) == 0
    assert (out / "shard-000001.tar").is_file() and not list(out.glob(".*tmp"))
    for name in ("shard-000000.tar", "shard-000002.tar"):
        assert (out / name).stat().st_mtime_ns == mtimes[name]
    assert len(list(build_latent_dataset(out))) == 4

    # Different settings in the same folder are refused instead of mixing shards.
    caplog.clear()
    args = _args(workspace, out)
    args[args.index("--height") + 1] = "64"
    assert prepare.main(args) == 2
    assert "height=32" in caplog.text


def test_video_list_formats(tmp_path: Path):
    (tmp_path / "list.jsonl").write_text(
        '{"path": "a.mp4", "caption": "a cat"}\n'
        "\n"
        "{broken\n"
        '{"path": "/abs/b.mp4", "caption": "  "}\n'
        '{"caption": "no path"}\n'
    )
    entries = read_video_list(tmp_path / "list.jsonl")
    assert [e.index for e in entries] == [0, 1, 2, 3]
    assert (
        entries[0].path == tmp_path / "a.mp4" and entries[0].caption == "a cat" and entries[0].error is None
    )
    assert entries[1].error.startswith("invalid JSON") and entries[1].where == "list.jsonl:3"
    assert entries[2].path == Path("/abs/b.mp4") and entries[2].caption is None
    assert entries[3].error == "no path"

    (tmp_path / "prompts.json").write_text(json.dumps([{"data_file": "vids/x.mp4", "prompt_en": "a dog"}]))
    (entry,) = read_video_list(tmp_path / "prompts.json")
    assert entry.source == "vids/x.mp4" and entry.caption == "a dog"

    (tmp_path / "bad.csv").write_text("file,text\nx.mp4,y\n")
    with pytest.raises(ValueError, match="path,caption"):
        read_video_list(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        read_video_list(tmp_path / "missing.csv")


def test_prepare_rejects_sizes_the_model_cannot_take(workspace, tmp_path: Path, caplog):
    args = _args(workspace, tmp_path / "out")
    args[args.index("--frames") + 1] = "6"
    assert _load_prepare().main(args) == 2
    assert "frames 6 is not of the form 4k+1 for tiny; nearest valid: 5 or 9" in caplog.text
    assert not (tmp_path / "out").exists()


def test_csv_rows_with_wrong_field_counts_or_line_breaks_are_bad_entries(tmp_path: Path, caplog):
    (tmp_path / "list.csv").write_text(
        "path,caption\n"
        "a.mp4,a man in a car, talking on a phone\n"  # unquoted comma: 3 fields
        'b.mp4,"a caption, quoted"\n'
        'c.mp4,"a caption over\ntwo lines"\n'  # a line break inside the caption
        "d.mp4\n"  # 1 field
        "\n"
        "e.mp4,the last one\n"
    )
    entries = read_video_list(tmp_path / "list.csv")
    assert [(e.source, e.where) for e in entries] == [
        ("a.mp4", "list.csv:2"), ("b.mp4", "list.csv:3"), ("c.mp4", "list.csv:4"), ("d.mp4", "list.csv:6"),
        ("e.mp4", "list.csv:8"),
    ]  # fmt: skip
    assert "3 fields" in entries[0].error and "2 columns" in entries[0].error
    assert entries[1].error is None and entries[1].caption == "a caption, quoted"
    assert "line break" in entries[2].error and "lines 4-5" in entries[2].error
    assert "1 field" in entries[3].error
    assert entries[4].error is None and entries[4].caption == "the last one"

    # Columns the header names beyond path,caption are not dropped silently.
    (tmp_path / "extra.csv").write_text("path,caption,score\nx.mp4,a cat,0.9\n")
    with caplog.at_level(logging.WARNING):
        (entry,) = read_video_list(tmp_path / "extra.csv")
    assert entry.error is None and "score" in caplog.text and "ignored" in caplog.text


def test_csv_quote_running_to_the_end_fails_at_the_line_it_opened(tmp_path: Path):
    (tmp_path / "list.csv").write_text(
        'path,caption\na.mp4,a fox\nb.mp4,"an unclosed quote\nc.mp4,a dog\nd.mp4,a cat\n'
    )
    with pytest.raises(ValueError, match=r"list.csv:3: .*quote.*never closed") as err:
        read_video_list(tmp_path / "list.csv")
    assert "\n" not in str(err.value)


def test_captions_with_line_breaks_are_bad_entries_in_json_lists(tmp_path: Path):
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "caption": "one\\ntwo"}\n')
    (entry,) = read_video_list(tmp_path / "list.jsonl")
    assert "line break" in entry.error


def _no_models(monkeypatch) -> None:
    """Make loading any model fail loudly: argument checks must come first."""
    import t3.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(t3.models, "load_vae", refuse)
    monkeypatch.setattr(t3.models, "load_text_encoder", refuse)


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("--fps", "-1", "--fps=-1.0"),
        ("--frames", "0", "--frames=0"),
        ("--frames", "-3", "--frames=-3"),
        ("--height", "0", "--height=0"),
        ("--start", "-2", "--start=-2.0"),
        ("--max-upscale", "0.5", "--max-upscale=0.5"),
        ("--samples-per-shard", "0", "--samples-per-shard=0"),
        ("--tile-size", "0", "--tile-size=0"),
        ("--decode-workers", "-1", "--decode-workers=-1"),
        ("--text-batch-size", "0", "--text-batch-size=0"),
        ("--vae", "/nonexistent/vae", "--vae=/nonexistent/vae"),
    ],
)
def test_prepare_checks_every_argument_before_loading_models(
    workspace, tmp_path: Path, caplog, monkeypatch, option, value, words
):
    _no_models(monkeypatch)
    args = _args(workspace, tmp_path / "out")
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    with caplog.at_level(logging.ERROR):
        assert _load_prepare().main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0], errors
    assert not (tmp_path / "out" / "prepare_config.json").exists()


def test_settings_file_is_written_with_the_first_finished_shard(
    workspace, tmp_path: Path, monkeypatch, caplog
):
    import t3.models.vae

    out = tmp_path / "shards"

    def crash(*args, **kwargs):
        raise RuntimeError("killed while encoding")

    with monkeypatch.context() as patch:
        patch.setattr(t3.models.vae, "encode_video", crash)
        with pytest.raises(RuntimeError, match="killed"):
            _load_prepare().main(_args(workspace, out))
    assert not (out / "prepare_config.json").exists()  # nothing finished: nothing to protect

    # So a corrected command is not refused; once a shard exists, other settings are refused before any
    # model is loaded.
    args = _args(workspace, out)
    args[args.index("--frames") + 1] = "9"
    assert _load_prepare().main(args) == 0
    assert json.loads((out / "prepare_config.json").read_text())["frames"] == 9
    _no_models(monkeypatch)
    caplog.clear()
    assert _load_prepare().main(_args(workspace, out)) == 2
    assert "frames=9" in caplog.text
