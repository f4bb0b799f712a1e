"""The real tools measured: where each comes from, what it needs, and how it is called.

Owns one table, ``TOOLS``, in the order of issue 13's first table. Each tool runs on a fresh
copy of its dataset (``datasets``) in a run folder, as ``python <tool> <argv>``; everything it
writes lands in that folder (mmseg's converter writes ``*_labelTrainIds.png`` beside its inputs,
in the dataset itself), which is what the two drop-ins' outputs are compared on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

WORKERS = "2"


@dataclass(frozen=True)
class Tool:
    """One tool: its row label, wheel, file in the wheel's ``tools/``, imports and arguments."""

    label: str
    package: str
    member: str
    modules: tuple[str, ...]
    dataset: str  # "cityscapes" or "coco": the folder name in a run folder
    argv: Callable[[str, str], list[str]]  # (dataset folder, output folder) -> arguments


def _cityscapes(data: str, out: str) -> list[str]:
    return [data, "-o", out, "--nproc", WORKERS]


def _split_coco(data: str, out: str) -> list[str]:
    # 2 percents x 2 folds = 4 tasks; the tool uses as many processes as folds
    return [
        "--data-root",
        data,
        "--out-dir",
        out,
        "--labeled-percent",
        "10",
        "50",
        "--fold",
        WORKERS,
    ]


TOOLS = (
    Tool(
        "mmdet `tools/dataset_converters/cityscapes.py` (16, 5, 3 tasks: 3 calls)",
        "mmdet",
        "dataset_converters/cityscapes.py",
        (
            "mmengine",
            "mmcv",
            "numpy",
            "cv2",
            "pycocotools.mask",
            "cityscapesscripts.helpers.labels",
        ),
        "cityscapes",
        _cityscapes,
    ),
    Tool(
        "mmdet `tools/misc/split_coco.py` (4 tasks)",
        "mmdet",
        "misc/split_coco.py",
        ("mmengine", "numpy"),
        "coco",
        _split_coco,
    ),
    Tool(
        "mmseg `tools/dataset_converters/cityscapes.py` (24 tasks)",
        "mmseg",
        "dataset_converters/cityscapes.py",
        ("mmengine", "cityscapesscripts.preparation.json2labelImg"),
        "cityscapes",
        _cityscapes,
    ),
)
