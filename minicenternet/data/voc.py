"""Pascal VOC (XML) to the COCO layout that :meth:`CocoDetection.from_root` reads.

``voc_to_coco(voc_root, out)`` writes ``out/annotations/instances_{split}.json`` and a folder
``out/{split}/`` of links to the JPEGs for every split listed in ``ImageSets/Main``.

Conventions chosen here, and why:

- Boxes. VOC's ``xmin..xmax`` are 1-based pixel indices, both ends included: the box covers
  pixels ``xmin`` to ``xmax`` (``xmax - xmin + 1`` of them). The library's boxes are continuous
  coordinates in which the 0-based pixel ``i`` spans ``[i, i + 1)``, so VOC pixel ``p`` spans
  ``[p - 1, p)`` and the box spans ``[xmin - 1, xmax]``: COCO ``[xmin - 1, ymin - 1,
  xmax - xmin + 1, ymax - ymin + 1]``. The width matches the ``+ 1`` of VOC's own evaluation
  code, and a box around the whole image becomes ``[0, 0, W, H]``, as in COCO.
- ``difficult=1`` objects are kept with ``iscrowd=1``. VOC's evaluation ignores them (finding
  one is no hit, missing one no miss); ``COCOeval`` treats crowd regions the same way, so the
  COCO AP of a converted set ignores the same objects. Training uses them unless the dataset is
  made with ``skip_crowd=True``. (COCOeval's overlap with a crowd region is the detection's
  fraction inside it rather than IoU, so the two evaluations agree closely but not exactly.)
- Classes are the ``name`` of every object in the converted splits, sorted, with category ids
  ``1..C``: convert all the splits you need in one call so that they share the ids.
- Image ids are ``1..N`` in the sorted order of each split's list; ``file_name`` is the JPEG's.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

__all__ = ["voc_to_coco"]


@dataclass
class _Object:
    """One ``<object>`` of an XML file."""

    name: str
    bbox: list[float]  # COCO [x, y, w, h]
    difficult: bool


@dataclass
class _Image:
    """One XML file: its JPEG, the size it states and its objects."""

    jpeg: Path
    width: int
    height: int
    objects: list[_Object]


def _year_folder(voc_root: Path) -> Path:
    """``voc_root`` itself if it holds ``Annotations/``, else its one ``VOC*`` child that does."""
    if (voc_root / "Annotations").is_dir():
        return voc_root
    years = sorted(p for p in voc_root.glob("VOC*") if (p / "Annotations").is_dir())
    if len(years) == 1:
        return years[0]
    if years:
        raise ValueError(f"{voc_root}: holds {', '.join(p.name for p in years)}; pass one of them")
    raise FileNotFoundError(f"{voc_root}: neither a VOC year folder (no Annotations/) nor a VOCdevkit holding one")


def _split_ids(year: Path, split: str) -> list[str]:
    list_file = year / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        found = sorted(p.stem for p in (year / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise FileNotFoundError(f"{list_file}: split list not found; splits there: {found or 'none'}")
    ids = sorted({line.split()[0] for line in list_file.read_text().splitlines() if line.strip()})
    if not ids:
        raise ValueError(f"{list_file}: the split list names no images")
    return ids


def _number(node: ET.Element, tag: str, xml_file: Path, where: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{xml_file}: {where} has no number <{tag}> (found {text!r})") from None


def _read_xml(year: Path, image_id: str) -> _Image:
    xml_file = year / "Annotations" / f"{image_id}.xml"
    if not xml_file.is_file():
        raise FileNotFoundError(f"{xml_file}: annotation file not found")
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{xml_file}: malformed XML ({err})") from None
    jpeg = year / "JPEGImages" / (root.findtext("filename") or f"{image_id}.jpg").strip()
    if not jpeg.is_file():
        raise FileNotFoundError(f"{jpeg}: image of {xml_file} not found")
    size = root.find("size")
    if size is None:
        raise ValueError(f"{xml_file}: no <size>")
    width, height = (int(_number(size, tag, xml_file, "<size>")) for tag in ("width", "height"))
    objects = []
    for k, node in enumerate(root.iter("object")):
        name, box = (node.findtext("name") or "").strip(), node.find("bndbox")
        if not name or box is None:
            raise ValueError(f"{xml_file}: object {k} has no <name> or no <bndbox>")
        x1, y1, x2, y2 = (_number(box, tag, xml_file, f"object {k}") for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (node.findtext("difficult") or "0").strip() == "1"
        objects.append(_Object(name, [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], difficult))
    return _Image(jpeg, width, height, objects)


def _link_or_copy(source: Path, target: Path) -> None:
    """Link ``target`` to ``source``; copy it where the file system refuses links."""
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        os.symlink(source.resolve(), target)
    except OSError:
        shutil.copy2(source, target)


def voc_to_coco(
    voc_root: str | Path, out: str | Path, splits: tuple[str, ...] | list[str] = ("train", "val")
) -> dict[str, Path]:
    """Convert Pascal VOC splits to COCO json files and image folders under ``out``.

    Args:
        voc_root: a VOC year folder (``VOC2007``, holding ``Annotations/``, ``JPEGImages/`` and
            ``ImageSets/Main/``) or the ``VOCdevkit`` folder holding exactly one of them.
        out: folder to write ``annotations/instances_{split}.json`` and ``{split}/`` to.
        splits: names of the lists in ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``).

    Returns:
        ``{split: annotation file}``; ``CocoDetection.from_root(out, split)`` reads each.

    Raises:
        FileNotFoundError: naming the missing split list, XML file or image.
        ValueError: naming the file, for a malformed XML, an object without a name or box, or
            an empty split list.
    """
    if not splits:
        raise ValueError("voc_to_coco: no splits to convert")
    year, out = _year_folder(Path(voc_root)), Path(out)
    images = {split: {image_id: _read_xml(year, image_id) for image_id in _split_ids(year, split)} for split in splits}
    names = sorted({obj.name for split in images.values() for image in split.values() for obj in image.objects})
    category_of = {name: i + 1 for i, name in enumerate(names)}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, split_images in images.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in category_of.items()]}
        for image_number, image in enumerate(split_images.values(), start=1):
            _link_or_copy(image.jpeg, folder / image.jpeg.name)
            coco["images"].append(
                {"id": image_number, "file_name": image.jpeg.name, "width": image.width, "height": image.height}
            )
            for obj in image.objects:
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_number, "category_id": category_of[obj.name],
                    "bbox": obj.bbox, "area": obj.bbox[2] * obj.bbox[3], "iscrowd": int(obj.difficult),
                })
        written[split] = out / "annotations" / f"instances_{split}.json"
        written[split].write_text(json.dumps(coco))
    return written
