"""Small synthetic datasets that the real OpenMMLab tools accept, written with the stdlib alone.

Owns what the tools read, and nothing they write:

- a Cityscapes tree (``make_cityscapes``)::

      leftImg8bit/<split>/<city>/<city>_000000_<frame>_leftImg8bit.png    RGB, never decoded
      gtFine/<split>/<city>/<city>_000000_<frame>_gtFine_instanceIds.png  16-bit ids
                                                   _gtFine_labelIds.png     8-bit label ids
                                                   _gtFine_polygons.json    the same scene

  mmdet's converter reads ``instanceIds`` (ids >= 1000 are instances, id // 1000 their label;
  24..33 alone are crowds), mmseg's reads ``polygons.json`` and writes ``labelTrainIds.png``
  beside it. Each image is a sky band, a road, a few cars and a person, and on even frames a
  crowd of cars: every path of both converters runs.
- a COCO annotation file (``make_coco``): ``annotations/instances_train2017.json`` with
  images, annotations, licenses, categories and info, what mmdet's ``split_coco`` reads.

The PNGs are encoded here (``png_bytes``) so the generator needs neither numpy nor OpenCV and
its tests run anywhere. Everything is deterministic: the same call writes the same bytes.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

# Images per split: the sizes of issue 13's table (mmseg's converter takes all 24 at once).
SPLITS = {"train": 16, "val": 5, "test": 3}
CITIES = {"train": "aachen", "val": "frankfurt", "test": "berlin"}
HEIGHT, WIDTH = 128, 256
# Cityscapes label ids (cityscapesscripts.helpers.labels) and names.
ROAD, SKY, PERSON, CAR = 7, 23, 24, 26
NAMES = {ROAD: "road", SKY: "sky", PERSON: "person", CAR: "car"}
# One rectangle of the scene: (instance id, x0, y0, x1, y1), x1 and y1 excluded.
Rect = tuple[int, int, int, int, int]


def png_bytes(rows: Sequence[Sequence[int]], bit_depth: int, channels: int) -> bytes:
    """A PNG of ``rows`` (each ``width * channels`` samples): grey (1) or RGB (3), 8 or 16 bits."""
    height, width = len(rows), len(rows[0]) // channels
    sample = "H" if bit_depth == 16 else "B"
    raw = b"".join(b"\0" + struct.pack(f">{len(row)}{sample}", *row) for row in rows)
    color_type = {1: 0, 3: 2}[channels]
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = (b"IHDR", header), (b"IDAT", zlib.compress(raw, 6)), (b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(tag, data) for tag, data in chunks)


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def scene(frame: int) -> list[Rect]:
    """The rectangles of one image, painted in order (later on top); varies with ``frame``."""
    third = HEIGHT // 3
    rects: list[Rect] = [(SKY, 0, 0, WIDTH, third), (ROAD, 0, third, WIDTH, HEIGHT)]
    if frame % 2 == 0:
        rects.append((CAR, 0, third + 4, 48, HEIGHT - 8))  # a crowd: the label id alone
    for car in range(1 + frame % 3):
        x0 = 56 + 60 * car + 3 * frame
        rects.append((CAR * 1000 + car, x0, third + 10, min(x0 + 44, WIDTH), HEIGHT - 12))
    x0 = 8 + 7 * frame
    rects.append((PERSON * 1000, x0, third - 10, x0 + 14, third + 40))
    return rects


def paint(rects: Sequence[Rect]) -> list[list[int]]:
    """The instance-id image (rows of ids) of a scene."""
    image = [[0] * WIDTH for _ in range(HEIGHT)]
    for ident, x0, y0, x1, y1 in rects:
        for row in image[y0:y1]:
            row[x0:x1] = [ident] * (x1 - x0)
    return image


def label_of(ident: int) -> int:
    """The label id of an instance id, as Cityscapes encodes them."""
    return ident // 1000 if ident >= 1000 else ident


def polygons(rects: Sequence[Rect]) -> dict[str, object]:
    """The ``gtFine_polygons.json`` of a scene: one polygon per rectangle, in paint order."""
    objects = []
    for ident, x0, y0, x1, y1 in rects:
        name = NAMES[label_of(ident)] + ("group" if CAR <= ident < 1000 else "")
        corners = [[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]]
        objects.append({"label": name, "polygon": corners})
    return {"imgHeight": HEIGHT, "imgWidth": WIDTH, "objects": objects}


def make_cityscapes(root: Path, splits: dict[str, int] = SPLITS) -> list[Path]:
    """Write a Cityscapes tree under ``root``; return the ``leftImg8bit`` images written."""
    images = []
    for split, count in splits.items():
        city = CITIES[split]
        for frame in range(count):
            stem = f"{city}_000000_{frame:06d}"
            images.append(_write_frame(root, split, city, stem, frame))
    return images


def _write_frame(root: Path, split: str, city: str, stem: str, frame: int) -> Path:
    rects = scene(frame)
    ids = paint(rects)
    gt = root / "gtFine" / split / city
    left = root / "leftImg8bit" / split / city
    gt.mkdir(parents=True, exist_ok=True)
    left.mkdir(parents=True, exist_ok=True)
    (gt / f"{stem}_gtFine_instanceIds.png").write_bytes(png_bytes(ids, 16, 1))
    labels = [[label_of(ident) for ident in row] for row in ids]
    (gt / f"{stem}_gtFine_labelIds.png").write_bytes(png_bytes(labels, 8, 1))
    (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons(rects)))
    rgb = [
        [(ident * 37 + channel * 80) % 256 for ident in row for channel in range(3)]
        for row in labels
    ]
    image = left / f"{stem}_leftImg8bit.png"
    image.write_bytes(png_bytes(rgb, 8, 3))
    return image


def coco(images: int = 2000, per_image: int = 4) -> dict[str, object]:
    """A COCO detection annotation dict: ``images`` images with 0..``per_image`` boxes each."""
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(("person", "car", "dog"))]
    image_list, annotations = [], []
    for image_id in range(1, images + 1):
        image_list.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 480, "width": 640}
        )
        for box in range(image_id % (per_image + 1)):
            x, y, w, h = 10 * box, 5 * box + image_id % 50, 40 + box, 30 + image_id % 20
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1 + (image_id + box) % len(categories),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
    return {
        "info": {"description": "synthetic"},
        "licenses": [],
        "categories": categories,
        "images": image_list,
        "annotations": annotations,
    }


def make_coco(root: Path, images: int = 2000) -> Path:
    """Write ``root/annotations/instances_train2017.json``; return its path."""
    path = root / "annotations" / "instances_train2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco(images)))
    return path
