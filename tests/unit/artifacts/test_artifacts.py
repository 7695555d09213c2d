"""The one atomic folder publish every stage, cache and the registry use."""

from __future__ import annotations

from pipelines.artifacts.manifest import publish_folder, staging_folder


def _build(out, text):
    tmp = staging_folder(out)
    tmp.mkdir()
    (tmp / "weights.txt").write_text(text)
    return tmp


def test_publish_replaces_a_previous_folder(tmp_path):
    out = tmp_path / "merge"
    assert publish_folder(_build(out, "v1"), out)
    assert publish_folder(_build(out, "v2"), out)
    assert (out / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge"]  # no staging or old folder left behind


def test_first_publisher_wins_without_replace(tmp_path):
    out = tmp_path / "base-4bit"
    assert publish_folder(_build(out, "first"), out, replace=False)
    assert not publish_folder(_build(out, "second"), out, replace=False)
    assert (out / "weights.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-4bit"]


def test_staging_folder_is_a_fresh_sibling(tmp_path):
    out = tmp_path / "a" / "model"
    tmp = staging_folder(out)
    assert tmp.parent == out.parent and not tmp.exists() and tmp.name.startswith("model.tmp-")
    tmp.mkdir()
    (tmp / "junk").write_text("x")
    assert not staging_folder(out).exists()  # a crashed earlier attempt's leftovers are cleared
