"""The glyph data set (bench/glyphs.py) and its open-set benchmark (bench/openset_glyphs.py) at tiny sizes:
rendering, the disjoint split, the cache, the message without fonts, the tiny benchmark's record and report."""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not installed: import it from the checkout
    sys.path.append(str(ROOT))

from bench import glyphs, openset, openset_glyphs, report  # noqa: E402

try:
    glyphs.find_faces()
    FONTS = None
except glyphs.MissingFontError as exc:
    FONTS = str(exc)
needs_fonts = pytest.mark.skipif(FONTS is not None, reason=f"needs Noto CJK fonts: {glyphs.APT_COMMAND}")

TINY = glyphs.GlyphSpec(train_ids=5, test_ids=3, augs=2, styles=("sans", "serif-bold"), regions=("JP", "SC"))


@needs_fonts
def test_tiny_render_is_seeded_and_the_split_disjoint(tmp_path):
    data = glyphs.load(TINY, root=tmp_path, log=lambda *_: None)
    assert data.rendered and data.path.exists() and data.path.parent == tmp_path
    per = 2 * 2 * TINY.augs  # styles × regions × augmentations
    assert data.per_identity == per and data.faces == ["sans/JP", "sans/SC", "serif-bold/JP", "serif-bold/SC"]
    assert data.train_images.shape == (5 * per, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (3 * per, 32, 32)
    assert data.train_labels.tolist() == [i for i in range(5) for _ in range(per)]
    # disjoint identities, all CJK ideographs, each photo of one drawn (ink brighter than the background)
    assert not set(data.train_codes) & set(data.test_codes) and len(set(data.train_codes)) == 5
    assert all(glyphs.FIRST <= c <= glyphs.LAST for c in data.train_codes + data.test_codes)
    photos = torch.cat([data.train_images, data.test_images]).float()
    assert (photos.amax(dim=(1, 2)) - photos.amin(dim=(1, 2)) > 60).all()
    # two photos of one identity differ (face, augmentation); the same options render the same set
    assert not torch.equal(data.train_images[0], data.train_images[1])
    again = glyphs.load(TINY, cache=False, log=lambda *_: None)
    assert torch.equal(again.train_images, data.train_images) and again.test_codes == data.test_codes
    other = glyphs.load(dataclasses.replace(TINY, seed=1), cache=False, log=lambda *_: None)
    assert other.train_codes != data.train_codes


@needs_fonts
def test_cache_is_reused_and_keyed_by_the_options(tmp_path, monkeypatch):
    first = glyphs.load(TINY, root=tmp_path, log=lambda *_: None)

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again although the set is cached")

    monkeypatch.setattr(glyphs, "render", no_render)
    second = glyphs.load(TINY, root=tmp_path, log=lambda *_: None)
    assert not second.rendered and second.path == first.path
    assert torch.equal(second.train_images, first.train_images) and second.train_codes == first.train_codes
    monkeypatch.undo()
    glyphs.load(dataclasses.replace(TINY, test_ids=2), root=tmp_path, log=lambda *_: None)
    assert len(list(tmp_path.glob("glyphs-*.npz"))) == 2  # other options, another file


def test_missing_fonts_name_the_debian_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glyphs, "FONT_DIRS", (str(tmp_path),))
    with pytest.raises(glyphs.MissingFontError, match="apt-get install -y fonts-noto-cjk"):
        glyphs.load(TINY, root=tmp_path)
    assert glyphs.main(["--train-ids", "2", "--test-ids", "1"]) == 2
    assert "apt-get install -y fonts-noto-cjk" in capsys.readouterr().err
    assert openset.main(["--data", "glyphs", "--size", "tiny", "--out", str(tmp_path)]) == 2
    assert "fonts-noto-cjk" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npz")) and not (tmp_path / openset_glyphs.RECORD).exists()


@needs_fonts
def test_tiny_benchmark_writes_its_record_and_report_checks_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MARGINOPS_GLYPHS_CACHE", str(tmp_path / "cache"))  # not MARGINOPS_CACHE_DIR: the build's
    out = tmp_path / "results"
    assert openset.main(["--data", "glyphs", "--size", "tiny", "--out", str(out), "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| ArcFace (s=32, m=0.5) |" in printed and "TAR @ FAR=1e-4" in printed
    with (out / openset_glyphs.RECORD).open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["head"] for r in rows} == set(openset_glyphs.HEADS) | {""}
    assert {r["run"] for r in rows} == {"tiny"} and {r["metric"] for r in rows} >= {"auc", "tar@1e-4", "top1"}
    assert (out / openset_glyphs.ROC_PNG).exists() and (out / openset_glyphs.CIRCLE_PNG).exists()
    assert len(list((tmp_path / "cache").glob("glyphs-*.npz"))) == 2  # the benchmark's set and the 2-D picture's

    # the README block comes from the record, and --check holds it (and the two plots) to it
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\n{report.END}\n\n{report.GLYPH_BEGIN}\nold\n{report.GLYPH_END}\n")
    args = ["--csv", str(out), "--readme", str(readme)]
    assert report.main(args) == 0
    text = readme.read_text()
    assert "old" not in text and "**tiny** — `python -m bench.openset --data glyphs --size tiny" in text
    assert "| Sub-center ArcFace (s=32, m=0.5, k=3) |" in text and f"](results/{openset_glyphs.ROC_PNG})" in text
    capsys.readouterr()
    assert report.main([*args, "--check"]) == 0
    checked = capsys.readouterr().out
    assert "· glyphs · tiny: 10 rows" in checked and f"{openset_glyphs.CIRCLE_PNG}: drawn data sha256" in checked

    # one number of the record changes: the block and the ROC plot are stale, named
    record = (out / openset_glyphs.ROC).read_text().splitlines()
    run, head, seed, far, tar, stamp = record[-1].split(",")
    record[-1] = ",".join([run, head, seed, far, "0.5" if tar != "0.5" else "0.25", stamp])
    (out / openset_glyphs.ROC).write_text("\n".join(record) + "\n")
    assert report.main([*args, "--check"]) == 1
    assert f"{openset_glyphs.ROC_PNG}: stale" in capsys.readouterr().err
    assert report.main(args) == 0 and report.main([*args, "--check"]) == 0


def test_evaluate_reports_tar_at_each_far_and_the_roc():
    labels = torch.arange(20).repeat_interleave(3)
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.one_hot(labels, 32).float() + 0.3 * torch.randn(60, 32, generator=g)
    m = openset.evaluate(emb, labels, 3, fars=(1e-3, 1e-2), curve=(1e-4, 1e-2, 0.1, 1.0))
    assert set(m["tar_at"]) == {1e-3, 1e-2} and m["tar_at"][1e-3] == m["tar"]
    fars = [far for far, _ in m["roc"]]
    assert fars == [1e-2, 0.1, 1.0]  # 1,710 impostor pairs resolve no FAR of 1e-4
    tars = [tar for _, tar in m["roc"]]
    assert tars == sorted(tars) and tars[-1] == 1.0
    # the same threshold rule as tar_at_far
    assert m["roc"][0][1] == m["tar_at"][1e-2]
