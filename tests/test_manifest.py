import json

import pytest

from videodit.data.manifest import ManifestError, read_manifest, write_manifest


def test_jsonl_and_csv_rows(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a.mp4", "caption": "a red circle", "num_frames": 17, "fps": 8, "tag": "x"}) + "\n\n"
        + json.dumps({"path": "/abs/./c/../b.png", "caption": "x", "detailed_caption": "long"}) + "\n")
    rows = read_manifest(str(tmp_path / "m.jsonl"))
    assert rows[0].path == str(tmp_path / "a.mp4") and rows[0].num_frames == 17 and rows[0].fps == 8.0
    assert rows[0].extra == {"tag": "x"} and rows[1].path == "/abs/b.png" and rows[1].detailed_caption == "long"
    (tmp_path / "m.csv").write_text("path,caption,height,width\nc.mp4,\"a, b\",64,128\nd.mp4,y,,\n")
    rows = read_manifest(str(tmp_path / "m.csv"))
    assert (rows[0].caption, rows[0].height, rows[0].width) == ("a, b", 64, 128) and rows[1].height is None


def test_a_byte_order_mark_is_read_as_none(tmp_path):
    """Spreadsheets save "CSV UTF-8" with a byte-order mark; some editors do so for JSONL."""
    (tmp_path / "m.csv").write_bytes("path,caption\nc.mp4,é\n".encode("utf-8-sig"))
    (tmp_path / "m.jsonl").write_bytes(json.dumps({"path": "c.mp4", "caption": "é"}).encode("utf-8-sig"))
    for name in ("m.csv", "m.jsonl"):
        [row] = read_manifest(str(tmp_path / name))
        assert (row.path, row.caption) == (str(tmp_path / "c.mp4"), "é")


def test_write_read_round_trip(tmp_path):
    for name in ("out.jsonl", "out.csv"):
        rows = [dict(path=str(tmp_path / "a.mp4"), caption="one", num_frames=9,
                     attributes={"count": 2, "colors": ["red", "blue"]}, tags=["x", "it's"])]  # kept as they are
        back = read_manifest(write_manifest(str(tmp_path / name), rows))
        assert back[0].to_dict() == rows[0]


@pytest.mark.parametrize("lines,where,words", [
    (['{"path": "a.mp4", "caption": "ok"}', '{"path": "b.mp4"}'], 2, ["caption"]),
    (['{"path": "a.mp4", "caption": "ok"}', '{"caption": "x"}'], 2, ["path"]),
    (['{"path": "a.mp4", "caption": "ok", "num_frames": "many"}'], 1, ["num_frames", "integer"]),
    (['{"path": "a.mp4", "caption": "ok", "num_frames": 4.5}'], 1, ["num_frames", "integer"]),
    (['{"path": "a.mp4", "caption": "ok", "fps": -3}'], 1, ["fps", "positive"]),
    (['{"path": "a.mp4", "caption": "ok", "num_frames": 0}'], 1, ["num_frames", "positive"]),
    (['{"path": "a.mp4", "caption": "ok"}', '', '{"path": "a.mp4", "caption": 5}'], 3, ["caption", "string"]),
    (['{"path": "a.mp4", "caption": "ok"}', '{"path": "b.mp4", "caption": ""}'], 2, ["caption", "non-empty"]),
    (['{"path": "a.mp4", "caption": "ok"}', '{not json'], 2, ["JSON"]),
    (['["a.mp4", "x"]'], 1, ["object"]),
])
def test_jsonl_errors_name_line_and_field(tmp_path, lines, where, words):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(str(p))
    assert f"m.jsonl:{where}:" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_csv_errors_name_line_and_field(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,caption,width\na.mp4,x,64\nb.mp4,y,wide\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: field 'width'"):
        read_manifest(str(p))
    p.write_text("file,text\na.mp4,x\n")
    with pytest.raises(ManifestError, match=r"m\.csv:1: .*'path' and 'caption'"):
        read_manifest(str(p))
    p.write_text("path,caption\na.mp4,a grey square, seen from above\n")  # an unquoted comma: a caption cut short
    with pytest.raises(ManifestError, match=r"m\.csv:2: 3 cells, but the header names 2 columns; quote"):
        read_manifest(str(p))


def test_missing_empty_and_unknown_manifests(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "none.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(str(tmp_path / "e.jsonl"))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match=".jsonl or .csv"):
        read_manifest(str(tmp_path / "m.txt"))


@pytest.mark.parametrize("bad", ["missing", "folder", "cp1252"])
@pytest.mark.parametrize("command", ["train.py", "cache", "caption", "vae stats"])
def test_every_command_names_a_bad_manifest_in_one_line(tmp_path, command, bad):
    """A missing manifest, a folder of clips given as one, and a spreadsheet's non-UTF-8 CSV: one line each."""
    import importlib.util
    import os

    import yaml

    from videodit import caption, vae
    from videodit.data import cache

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    missing, shipped_vae = str(tmp_path / "nope.jsonl"), os.path.join(root, "models", "shapes-tiny", "vae")
    if bad == "folder":
        missing = str(tmp_path)
    elif bad == "cp1252":  # Excel's plain "CSV" on Windows
        missing = str(tmp_path / "m.csv")
        (tmp_path / "m.csv").write_bytes("path,caption\nclip.mp4,caf\xe9 au lait\n".encode("cp1252"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(dict(model=dict(preset="tiny"), data=dict(source="manifest", manifest=missing),
                                          train=dict(vae=shipped_vae, output_dir=str(tmp_path / "run")))))
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(root, "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = {"train.py": lambda: script.main(["--config", str(config)]),
           "cache": lambda: cache.main(["--config", str(config), "--out", str(tmp_path / "cache")]),
           "caption": lambda: caption.main(["--manifest", missing, "--out", str(tmp_path / "o.jsonl"),
                                            "--backend", "shapes"]),
           "vae stats": lambda: vae.stats_command([shipped_vae, "--manifest", missing])}[command]
    with pytest.raises(SystemExit) as e:
        run()
    assert str(e.value.code) == {"missing": f"error: {missing}: manifest not found",
                                 "folder": f"error: {missing} is a folder; a manifest is a .jsonl or .csv file that "
                                           f"lists the clips and their captions (README: Data)",
                                 "cp1252": f"error: {missing}:2: not UTF-8 text (byte 0xe9); save the manifest as "
                                           f"UTF-8 (a spreadsheet's 'CSV UTF-8')"}[bad]
