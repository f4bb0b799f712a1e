"""Real OpenMMLab tools, run unmodified with mmengine's ``track_parallel_progress`` and with
multitrack's drop-in patched in (issue 13): ``python -m benchmarks.real_tools``.

The pieces, each owning one thing:

- ``env``: the venv under a cache folder (mmengine, mmcv-lite, cityscapesscripts, pycocotools,
  numpy, OpenCV, this checkout's multitrack wheel) and the tools taken from the mmdet 3.3.0 and
  mmseg 1.2.2 wheels;
- ``datasets``: small synthetic Cityscapes and COCO data the tools accept (stdlib only);
- ``tools``: which tools, their imports and arguments;
- ``drop_in``: the wrapper, run in the venv, that patches the drop-in in and runs a tool;
- ``timing``: interleaved rounds of fresh processes, outputs compared, the table.

Needs the package registries and a few minutes; not part of the test suite.
"""
