"""``python -m bench.glyphs``: a data set of real images for open-set recognition, rendered from installed fonts.

An identity is a CJK ideograph (a code point of the CJK Unified Ideographs block, U+4E00–U+9FA5); one
"photo" of it is the glyph drawn by one font face (Noto Sans / Serif CJK, Regular / Bold, each in its
Japanese, Korean, Simplified- and Traditional-Chinese forms: up to 16 faces from the 4 .ttc collections of
the Debian package fonts-noto-cjk) and then distorted by a seeded augmentation: stroke width (dilation or
erosion), an affine warp (rotation, scale, shear, shift), blur, an occluding block, contrast and noise.
Training and test identities are disjoint code points.  Images are small (32 × 32 grayscale, uint8) so
that a CNN trains on 2 CPU cores.

The rendered set is cached as one .npz under ``$MARGINOPS_CACHE_DIR/glyphs`` (default
``~/.cache/marginops/glyphs``; ``$MARGINOPS_GLYPHS_CACHE`` names another folder), its name a hash of the options
and the font files: the same options load it back instead of rendering again.

    python -m bench.glyphs                          # the default set of python -m bench.openset --data glyphs
    python -m bench.glyphs --train-ids 50 --test-ids 10 --sheet /tmp/sheet.png   # and a contact sheet
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

VERSION = 1  # bump when rendering or augmentation changes: the cache key includes it
APT_PACKAGE = "fonts-noto-cjk"
APT_COMMAND = f"apt-get install -y {APT_PACKAGE}"
# where Debian/Ubuntu put the package's .ttc files, then the other usual font folders
FONT_DIRS = (
    "/usr/share/fonts/opentype/noto",
    "/usr/share/fonts/opentype",
    "/usr/share/fonts/truetype",
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
)
# style -> collection file (Noto's Pan-CJK .ttc: every face covers the whole URO block)
FONT_FILES = {
    "sans": "NotoSansCJK-Regular.ttc",
    "sans-bold": "NotoSansCJK-Bold.ttc",
    "serif": "NotoSerifCJK-Regular.ttc",
    "serif-bold": "NotoSerifCJK-Bold.ttc",
}
# the regional forms differ in real strokes for many ideographs (骨, 直, 次 ...): more distinct "photos"
REGIONS = ("JP", "KR", "SC", "TC")
FIRST, LAST = 0x4E00, 0x9FA5  # CJK Unified Ideographs as of Unicode 1.1: 20,902 code points


class MissingFontError(RuntimeError):
    pass


@dataclass(frozen=True)
class Face:
    style: str
    region: str
    path: str
    index: int  # the face's index in its .ttc

    @property
    def name(self) -> str:
        return f"{self.style}/{self.region}"


def _collection_faces(path: Path) -> dict[str, int]:
    """region -> index of the non-Mono face of that region in a .ttc (read from the face names, not assumed)."""
    from PIL import ImageFont

    out: dict[str, int] = {}
    for index in range(32):
        try:
            family, _ = ImageFont.truetype(str(path), 16, index=index).getname()
        except OSError:
            break
        region = family.rsplit(" ", 1)[-1]
        if "Mono" not in family and region in REGIONS:
            out.setdefault(region, index)
    return out


def find_font_files(dirs=None) -> dict[str, Path]:
    """style -> path of each Noto CJK collection found in the font folders."""
    found: dict[str, Path] = {}
    for folder in dirs if dirs is not None else FONT_DIRS:
        folder = Path(os.path.expanduser(folder))
        if not folder.is_dir():
            continue
        for style, name in FONT_FILES.items():
            if style not in found:
                hits = sorted(folder.rglob(name))
                if hits:
                    found[style] = hits[0]
    return found


def find_faces(styles=None, regions=None, dirs=None) -> list[Face]:
    """The faces to render with, in a fixed order; MissingFontError (naming the Debian package) if none."""
    files = find_font_files(dirs)
    wanted_styles = list(styles or FONT_FILES)
    wanted_regions = list(regions or REGIONS)
    faces = []
    for style in wanted_styles:
        if style not in files:
            continue
        indices = _collection_faces(files[style])
        faces += [Face(style, r, str(files[style]), indices[r]) for r in wanted_regions if r in indices]
    if not faces:
        searched = ", ".join(str(d) for d in (dirs if dirs is not None else FONT_DIRS))
        raise MissingFontError(
            f"no Noto CJK font found (looked for {', '.join(FONT_FILES[s] for s in wanted_styles)} under "
            f"{searched}); the glyph data set renders CJK ideographs from them. On Debian/Ubuntu: "
            f"{APT_COMMAND}"
        )
    return faces


@dataclass(frozen=True)
class GlyphSpec:
    """What a rendered set depends on (with the font files and VERSION: its cache key)."""

    train_ids: int = 3000
    test_ids: int = 300
    augs: int = 1  # augmented photos per face and identity
    styles: tuple = tuple(FONT_FILES)
    regions: tuple = REGIONS
    size: int = 32
    seed: int = 0  # picks the code points, their split and every augmentation

    @property
    def render_size(self) -> int:
        return 2 * self.size  # drawn at twice the size, warped, then averaged down (anti-aliasing)


def cache_root() -> Path:
    """$MARGINOPS_GLYPHS_CACHE, else beside marginops' build cache: ($MARGINOPS_CACHE_DIR, else $XDG_CACHE_HOME or
    ~/.cache, /marginops)/glyphs."""
    if os.environ.get("MARGINOPS_GLYPHS_CACHE"):
        return Path(os.environ["MARGINOPS_GLYPHS_CACHE"])
    root = os.environ.get("MARGINOPS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marginops"
    )
    return Path(root) / "glyphs"


def cache_key(spec: GlyphSpec, faces: list[Face]) -> str:
    fonts = sorted({(Path(f.path).name, Path(f.path).stat().st_size) for f in faces})
    text = json.dumps(
        {"spec": dataclasses.asdict(spec), "faces": [f.name for f in faces], "fonts": fonts, "version": VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class GlyphSet:
    """Photos ordered by identity (``per_identity`` consecutive rows each); labels index ``*_codes``."""

    train_images: torch.Tensor  # (N, size, size) uint8, ink bright on a dark background
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_codes: list  # code points
    test_codes: list
    faces: list  # face names, in rendering order
    per_identity: int
    path: Optional[Path] = None
    rendered: bool = False  # False: loaded from the cache

    @staticmethod
    def to_input(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) -> float (N, 1, H, W) around 0."""
        return images.unsqueeze(1).float().div_(127.5).sub_(1.0)


def _draw(face_font, code: int, canvas: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(image).text((canvas / 2, canvas / 2), chr(code), font=face_font, fill=255, anchor="mm")
    return np.asarray(image)


def _fonts(faces: list[Face], canvas: int) -> list:
    from PIL import ImageFont

    # about 0.8 of the canvas: the ideograph keeps a margin for the warp
    return [ImageFont.truetype(f.path, int(0.8 * canvas), index=f.index) for f in faces]


def _missing_glyph(fonts: list, canvas: int) -> list[np.ndarray]:
    """Each face's drawing of a code point no font has (its .notdef box): a glyph equal to it is missing."""
    return [_draw(font, 0x10FFFD, canvas) for font in fonts]


def augment(clean: torch.Tensor, bold: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """(N, 1, 2·size, 2·size) float glyphs in [0, 1] -> (N, size, size) uint8 photos, one random distortion each.

    ``bold`` (N,) bool: which glyphs may be eroded (a regular face's hairlines would vanish)."""
    n = clean.shape[0]

    def uniform(lo, hi, shape=(n,)):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    # stroke width: erode, keep or dilate by one pixel of the double-size drawing
    stroke = torch.randint(-1, 2, (n,), generator=g)
    stroke = torch.where(bold | (stroke >= 0), stroke, torch.zeros_like(stroke))
    dilated = F.max_pool2d(clean, 3, 1, 1)
    eroded = -F.max_pool2d(-clean, 3, 1, 1)
    x = torch.where(
        (stroke > 0)[:, None, None, None], dilated, torch.where((stroke < 0)[:, None, None, None], eroded, clean)
    )
    # affine warp: rotation, anisotropic scale, shear, shift (normalized coordinates)
    angle = uniform(-0.17, 0.17)  # ±10°
    sx, sy = uniform(0.85, 1.1), uniform(0.85, 1.1)
    shear = uniform(-0.15, 0.15)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos / sx, (-sin + shear * cos) / sx, tx], dim=1),
            torch.stack([sin / sy, (cos + shear * sin) / sy, ty], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.avg_pool2d(x, 2)  # down to size × size
    # blur: a random mix with a 3×3 binomial blur
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3)
    amount = uniform(0.0, 1.0)[:, None, None, None]
    x = (1 - amount) * x + amount * F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    # occlusion: half the photos get a block erased (background) or inked
    h, w = (
        torch.randint(5, 3 * size // 8 + 1, (n,), generator=g),
        torch.randint(5, 3 * size // 8 + 1, (n,), generator=g),
    )
    top, left = (
        (torch.rand(n, generator=g) * (size - h + 1)).long(),
        (torch.rand(n, generator=g) * (size - w + 1)).long(),
    )
    rows, cols = torch.arange(size)[None, :, None], torch.arange(size)[None, None, :]
    block = (
        (rows >= top[:, None, None])
        & (rows < (top + h)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + w)[:, None, None])
    )
    occluded = (torch.rand(n, generator=g) < 0.5)[:, None, None]
    fill = (torch.rand(n, generator=g) < 0.5).float()[:, None, None]
    x = x[:, 0]
    x = torch.where(block & occluded, fill, x)
    # contrast and sensor noise
    background, ink = uniform(0.0, 0.3)[:, None, None], uniform(0.65, 1.0)[:, None, None]
    x = background + (ink - background) * x
    x = x + uniform(0.0, 0.08)[:, None, None] * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def render(spec: GlyphSpec, faces: list[Face], log=print) -> dict:
    """Pick spec.train_ids + spec.test_ids code points that every face draws, render and augment their photos."""
    canvas = spec.render_size
    fonts = _fonts(faces, canvas)
    notdef = _missing_glyph(fonts, canvas)
    g = torch.Generator().manual_seed(spec.seed)
    candidates = (torch.randperm(LAST - FIRST + 1, generator=g) + FIRST).tolist()
    wanted = spec.train_ids + spec.test_ids
    if wanted > len(candidates):
        raise ValueError(f"{wanted} identities asked for; the block has {len(candidates)} code points")
    per_identity = len(faces) * spec.augs
    bold = torch.tensor([f.style.endswith("bold") for f in faces]).repeat_interleave(spec.augs)

    def augmented(clean: list) -> torch.Tensor:
        """(n, per_identity, size, size) photos of n identities' drawings (n, faces, R, R)."""
        x = torch.from_numpy(np.stack(clean)).float().div_(255.0)
        x = x.repeat_interleave(spec.augs, dim=1).reshape(-1, 1, canvas, canvas)
        return augment(x, bold.repeat(len(clean)), spec.size, g).view(-1, per_identity, spec.size, spec.size)

    codes, clean, photos = [], [], []
    start = time.perf_counter()
    for code in candidates:
        drawn = [_draw(font, code, canvas) for font in fonts]
        # a face without the glyph draws its .notdef box (or nothing): such a code point is skipped
        if any(not d.any() or np.array_equal(d, m) for d, m in zip(drawn, notdef)):
            continue
        codes.append(code)
        clean.append(np.stack(drawn))
        if len(clean) == 500:  # augmented 500 identities at a time: bounded memory whatever the size of the set
            photos.append(augmented(clean))
            clean = []
        if len(codes) == wanted:
            break
        if len(codes) % 2000 == 0:
            seconds = time.perf_counter() - start
            log(f"  drew {len(codes):,} / {wanted:,} identities × {len(faces)} faces ({seconds:.0f} s)")
    if len(codes) < wanted:
        raise ValueError(f"only {len(codes)} code points are drawn by every face; {wanted} asked for")
    if clean:
        photos.append(augmented(clean))
    photos = torch.cat(photos)  # (identities, per_identity, size, size)
    # the photos of an identity in random order: the first one (enrolled in identification) is any face
    order = torch.argsort(torch.rand(wanted, per_identity, generator=g), dim=1)
    photos = torch.gather(photos, 1, order[:, :, None, None].expand_as(photos))
    train, test = photos[: spec.train_ids], photos[spec.train_ids :]
    return {
        "train_images": train.reshape(-1, spec.size, spec.size).numpy(),
        "test_images": test.reshape(-1, spec.size, spec.size).numpy(),
        "train_codes": np.array(codes[: spec.train_ids], dtype=np.int64),
        "test_codes": np.array(codes[spec.train_ids :], dtype=np.int64),
        "faces": np.array([f.name for f in faces]),
        "per_identity": np.array(per_identity),
    }


def load(spec: GlyphSpec = GlyphSpec(), *, cache: bool = True, root: Optional[Path] = None, log=print) -> GlyphSet:
    """The rendered set of ``spec``: read from the cache when it is there, else rendered (and cached)."""
    faces = find_faces(spec.styles, spec.regions)
    root = Path(root) if root is not None else cache_root()
    path = root / f"glyphs-{cache_key(spec, faces)}.npz"
    rendered = not (cache and path.exists())
    if rendered:
        start = time.perf_counter()
        log(
            f"rendering {spec.train_ids:,} + {spec.test_ids:,} identities × {len(faces)} faces × {spec.augs} "
            f"augmentation(s) at {spec.size}×{spec.size} ..."
        )
        arrays = render(spec, faces, log=log)
        log(f"  rendered in {time.perf_counter() - start:.1f} s")
        if cache:
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    else:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    per = int(arrays["per_identity"])
    train_images, test_images = torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["test_images"])
    return GlyphSet(
        train_images=train_images,
        train_labels=torch.arange(len(arrays["train_codes"])).repeat_interleave(per),
        test_images=test_images,
        test_labels=torch.arange(len(arrays["test_codes"])).repeat_interleave(per),
        train_codes=arrays["train_codes"].tolist(),
        test_codes=arrays["test_codes"].tolist(),
        faces=arrays["faces"].tolist(),
        per_identity=per,
        path=path if cache else None,
        rendered=rendered,
    )


def contact_sheet(data: GlyphSet, path: Path, identities: int = 8) -> Path:
    """A PNG grid: one row per identity (training ones first, then test ones), one column per photo."""
    from PIL import Image

    per = data.per_identity
    rows = [data.train_images[i * per : (i + 1) * per] for i in range(min(identities // 2, len(data.train_codes)))]
    rows += [data.test_images[i * per : (i + 1) * per] for i in range(min(identities // 2, len(data.test_codes)))]
    sheet = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()
    image = Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def add_arguments(parser: argparse.ArgumentParser, spec: GlyphSpec = GlyphSpec()) -> None:
    parser.add_argument("--train-ids", type=int, default=spec.train_ids, help="training identities (code points)")
    parser.add_argument("--test-ids", type=int, default=spec.test_ids, help="unseen test identities")
    parser.add_argument("--augs", type=int, default=spec.augs, help="augmented photos per face and identity")
    parser.add_argument("--styles", default=",".join(spec.styles), help="font styles: " + ",".join(FONT_FILES))
    parser.add_argument("--regions", default=",".join(spec.regions), help="regional forms: " + ",".join(REGIONS))
    parser.add_argument("--data-seed", type=int, default=spec.seed, help="code points, split and augmentations")


def spec_from(args) -> GlyphSpec:
    return GlyphSpec(
        train_ids=args.train_ids,
        test_ids=args.test_ids,
        augs=args.augs,
        styles=tuple(s.strip() for s in args.styles.split(",") if s.strip()),
        regions=tuple(r.strip() for r in args.regions.split(",") if r.strip()),
        seed=args.data_seed,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.glyphs", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--no-cache", action="store_true", help="render even if the set is cached, write nothing")
    parser.add_argument("--sheet", default=None, help="also write a contact sheet PNG (a few identities' photos)")
    args = parser.parse_args(argv)
    try:
        data = load(spec_from(args), cache=not args.no_cache)
    except MissingFontError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(data.train_codes):,} training and {len(data.test_codes):,} test identities (disjoint code points), "
        f"{data.per_identity} photos each ({len(data.faces)} faces: {', '.join(data.faces)}); "
        f"{data.train_images.shape[0]:,} + {data.test_images.shape[0]:,} images of "
        f"{data.train_images.shape[1]}×{data.train_images.shape[2]}"
    )
    if data.path is not None:
        print(f"{'rendered into' if data.rendered else 'loaded from'} {data.path}")
    if args.sheet:
        print(f"contact sheet: {contact_sheet(data, Path(args.sheet))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
