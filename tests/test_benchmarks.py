"""The benchmark harness (``python -m benchmarks``): a smoke run end to end, and the few pure
pieces its numbers rest on. No timing is asserted: only that the harness measures and reports.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

# `benchmarks` lives at the repository root, beside `src`: importable under bare `pytest` too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import one, real_task, replace, report, tasks, workloads
from benchmarks import results as saved
from benchmarks.contenders import CLUSTER_MAX_RUNS, CONTENDERS, DEFAULT, split
from benchmarks.machine import Machine
from benchmarks.pairing import Paired, paired, strongest_peer, task_cpu_ratio
from benchmarks.real_tools import datasets, timing
from benchmarks.results import Results, WorkloadResult
from benchmarks.runner import ROOT, Outcome, rotate
from benchmarks.stats import best_peer, make_rows

CLUSTER = ("multitrack-ray", "multitrack-dask")


def test_quick_run_writes_a_table_with_a_time_per_contender(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "b",
            "--contenders",
            "loop,multitrack,pool-map",
            "--write",
            str(out),
            "--json",
            str(tmp_path / "runs.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    print(done.stderr)
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    assert "## Summary" in report and "## (b) trivial" in report
    assert "| (b) trivial |" in report  # the summary row
    for label in ("loop", r"\*\*multitrack\*\*"):
        row = re.search(rf"^\| {label} \| ([0-9.e-]+) \|", report, re.MULTILINE)
        assert row is not None, f"no timed row for {label}:\n{report}"
        assert float(row.group(1)) > 0
    assert "None: every run finished" in report
    # the paired column, against the one peer that ran, and every run knows its round
    assert "**multitrack / best peer**, paired (range)" in report
    assert re.search(r"^\| \(b\) trivial \|.*\| pool-map \|.*\| \*\*[0-9.]+ \(", report, re.M)
    outcomes = [o for w in saved.load(tmp_path / "runs.json").workloads for o in w.outcomes]
    assert {o.round for o in outcomes} == {0}


def test_spin_results_have_a_closed_form() -> None:
    inputs = [0, 1, 6, 7, 13, 1000]
    assert workloads.check("c", inputs, [tasks.spin(n) for n in inputs]) is None
    assert workloads.check("c", inputs, [0] * len(inputs)) is not None


def test_ideal_is_the_makespan_lower_bound() -> None:
    # four equal tasks on two cores: half the work; one task of most of the work: that task
    assert workloads.ideal_fraction({"iterations": [1, 1, 1, 1]}, cores=2) == 0.5
    assert workloads.ideal_fraction({"iterations": [8, 1, 1]}, cores=2) == 0.8
    assert workloads.ideal_fraction({"count": 3}, cores=2) is None


def _sleep_then_spin(iterations: int) -> int:
    time.sleep(0.3)  # wall time, no CPU time: not work
    return tasks.spin(iterations)


def test_a_cpu_timed_task_reports_its_cpu_time_not_its_wall_time() -> None:
    # No absolute bound on a time (a loaded machine stretches everything): the task sleeps
    # 0.3 s and does almost no work, so its CPU time is a small fraction of the wall time of
    # the same call, however slow the machine; wall time measured instead would be all of it.
    timed = pickle.loads(pickle.dumps(tasks.CpuTimed(tasks.spin)))  # crosses to workers as is
    assert timed.fn is tasks.spin
    started = time.perf_counter()
    value, cpu = tasks.CpuTimed(_sleep_then_spin)(1_000)
    wall = time.perf_counter() - started
    assert value == tasks.spin(1_000)
    assert wall >= 0.3
    assert 0 < cpu < wall / 10, f"{cpu:.3f} s of CPU in {wall:.3f} s: wall time, not CPU time"


def test_the_work_floor_is_the_even_spread_or_the_longest_task() -> None:
    assert one.work_floor([1.0, 1.0, 1.0, 1.0], cores=2) == 2.0
    assert one.work_floor([3.0, 0.5, 0.5], cores=2) == 3.0
    assert one.work_floor([1.0, 1.0], cores=1) == 2.0  # the loop: one core


def test_measure_reports_the_work_floor_on_cpu_workloads_only(tmp_path: Path) -> None:
    spec = {"contender": "loop", "workers": 2, "mode": "map", "out_dir": str(tmp_path)}
    spin = one.measure({**spec, "workload": "c", "params": {"iterations": [200_000] * 3}})
    assert spin["ok"], spin  # results unwrapped from their CPU times, then checked
    assert 0 < spin["floor_s"] <= spin["seconds"]  # the loop adds next to nothing to its work
    assert spin["task_cpu_s"] == spin["floor_s"]  # one core: the floor is all the work
    # ... and the yardstick of the others: the same tasks spread on the 2 workers
    assert spin["workers_floor_s"] == pytest.approx(spin["task_cpu_s"] / 2)
    trivial = one.measure({**spec, "workload": "b", "params": {"count": 10}})
    assert trivial["ok"] and "floor_s" not in trivial and "task_cpu_s" not in trivial


def test_own_overhead_measures_each_run_against_its_own_work() -> None:
    # the machine ran slow in the second run: a longer time, more CPU time in the tasks, a
    # higher floor; the own overhead, the efficiency and the time over the floor stay the same
    runs = [(2.0, 3.8, 1.9), (3.0, 5.8, 2.9), (2.1, 3.8, 1.9), (2.2, None, None)]
    outcomes = [
        Outcome("multitrack", "c", "ok", seconds=s, task_cpu_s=cpu, floor_s=floor)
        for s, cpu, floor in runs
    ]
    outcomes.append(Outcome("multitrack", "c", "timeout"))
    (row,) = make_rows(outcomes, ["multitrack"])
    assert row.own_overhead_s == pytest.approx(0.1)
    assert row.overhead_s is None  # no loop ran: nothing to measure against
    assert row.cores_busy == pytest.approx(1.9)  # 3.8 / 2.0 (5.8 / 3.0 and 3.8 / 2.1 around it)
    assert row.over_floor == pytest.approx(2.0 / 1.9)


def _cpu_run(name: str, round_: int, seconds: float, task_cpu: float) -> Outcome:
    """A run of (c) on 2 workers whose tasks took ``task_cpu`` s of CPU in all (even tasks)."""
    serial = name == "loop"
    floor = task_cpu if serial else task_cpu / 2
    return Outcome(
        name,
        "c",
        "ok",
        seconds=seconds,
        task_cpu_s=task_cpu,
        floor_s=floor,
        workers_floor_s=task_cpu / 2,
        round=round_,
    )


def test_a_slowdown_of_the_tasks_counts_as_overhead() -> None:
    # multitrack's tasks took 4.2 s of CPU where the loop's took 4.0: measured against its own
    # work it added 0.1 s; against the loop's (2.0 s on 2 workers) it added 0.2 s
    outcomes = [
        *(_cpu_run("loop", r, 4.05, 4.0) for r in range(3)),
        *(_cpu_run("multitrack", r, 2.2, 4.2) for r in range(3)),
    ]
    loop, mt = make_rows(outcomes, ["loop", "multitrack"])
    assert mt.overhead_s == pytest.approx(0.2)
    assert mt.own_overhead_s == pytest.approx(0.1)
    assert loop.overhead_s == pytest.approx(0.05)  # the loop against its own one core
    assert task_cpu_ratio(outcomes, "multitrack") == Paired(1.05, 1.05, 1.05, 3)


def test_paired_ratio_pairs_runs_of_the_same_round() -> None:
    # the machine was twice as slow in round 1: the medians' ratio is 1.0, every round says 0.9
    mt = [_cpu_run("multitrack", r, s, 4.0) for r, s in enumerate([1.8, 3.6, 1.8])]
    peer = [_cpu_run("pool-map", r, s, 4.0) for r, s in enumerate([2.0, 4.0, 3.6])]
    figure = paired([*mt, *peer], "multitrack", "pool-map")
    assert figure is not None and figure.rounds == 3
    assert figure.median == pytest.approx(0.9) and figure.low == pytest.approx(0.5)
    # a round that one of the two lost (a timeout) is left out; unrecorded rounds: by position
    failed = Outcome("pool-map", "c", "timeout", round=3)
    again = paired(
        [*mt, *peer, _cpu_run("multitrack", 3, 9.9, 4.0), failed], "multitrack", "pool-map"
    )
    assert again is not None and again.rounds == 3
    bare = [Outcome(o.contender, "c", "ok", seconds=o.seconds) for o in [*mt, *peer]]
    assert paired(bare, "multitrack", "pool-map") == figure


def test_the_best_peer_is_the_strongest_by_the_paired_figure() -> None:
    # executor has the lowest median (its fast rounds fell in the machine's fast spells), but
    # round by round pool-map is the one multitrack is furthest behind
    times = {
        "loop": [4.0, 4.0, 4.0],
        "multitrack": [1.6, 2.6, 2.0],
        "pool-map": [1.55, 2.5, 1.9],  # 1.03, 1.04, 1.05 of multitrack's
        "executor": [1.8, 1.7, 2.4],  # 0.89, 1.53, 0.83
    }
    names = tuple(times)
    outcomes = tuple(
        _cpu_run(name, r, s, 3.8) for name, runs in times.items() for r, s in enumerate(runs)
    )
    result = WorkloadResult("c", {"iterations": [10] * 20}, names, outcomes)
    assert best_peer(result.rows).contender == "executor"  # by the medians
    peer, figure = strongest_peer(result.outcomes, result.rows)
    assert peer.contender == "pool-map" and figure.median == pytest.approx(1.04)
    text = report.render(_results(result))
    assert "**multitrack / best peer**, paired (range)" in text
    summary = re.search(r"^\| \(c\) cpu \|.*$", text, re.MULTILINE)
    assert summary is not None
    assert "| pool-map | 1.90 | **1.04 (1.03\u20131.05)** | 1.05 |" in summary.group(0)
    assert "task CPU 1.00x the loop's" in summary.group(0)


def test_round_robin_rotates_the_first_contender() -> None:
    names = ("a", "b", "c")
    assert [rotate(names, r)[0] for r in range(4)] == ["a", "b", "c", "a"]


def test_cluster_backends_are_default_contenders_but_not_peers() -> None:
    for name in CLUSTER:
        contender = CONTENDERS[name]
        assert name in DEFAULT
        assert contender.cluster and not contender.peer and contender.first is not None
        assert f'backend="{name.split("-")[1]}"' in contender.code
        assert any("timed" in note for note in contender.notes)  # start-up is in the time
    assert not CONTENDERS["multitrack"].cluster


def test_cluster_backends_run_on_a_few_workloads_and_runs_spread_over_the_run() -> None:
    ray = CONTENDERS["multitrack-ray"]
    assert ray.runs_in("c", 0, 5) and not ray.runs_in("a", 0, 5)
    taken = [run for run in range(10) if ray.runs_in("cold", run, 10)]
    assert taken == [0, 2, 4, 6, 8] and len(taken) == CLUSTER_MAX_RUNS
    assert all(CONTENDERS["pool-map"].runs_in("a", run, 10) for run in range(10))
    assert not CONTENDERS["pool-map"].runs_in("cold", 0, 10)  # no lazy map, no cold start


def _results(*workloads: WorkloadResult) -> Results:
    machine = Machine("cpu", 2, 2, 1.0, "os", "3.11", "fork", {}, "today", "0")
    return Results(machine, "cmd", 3, 2, "log", True, 60.0, 0.0, 0, "1m", workloads, None)


def _outcomes(name: str, seconds: float, runs: int = 3) -> list[Outcome]:
    return [Outcome(name, "c", "ok", seconds=seconds) for _ in range(runs)]


def test_report_shows_cluster_backends_apart_against_multitrack() -> None:
    # a cluster backend faster than every peer still is neither the best peer nor in the table
    names = ("loop", "multitrack", "pool-map", "multitrack-ray")
    outcomes = (
        *_outcomes("loop", 4.0),
        *_outcomes("multitrack", 2.0),
        *_outcomes("pool-map", 2.5),
        *_outcomes("multitrack-ray", 1.0, runs=2),
    )
    cpu = WorkloadResult("c", {"iterations": [10] * 20}, names, outcomes)
    results = _results(cpu)
    peer = best_peer(cpu.rows)
    assert peer is not None and peer.contender == "pool-map"
    text = report.render(results)
    peers, cluster = text.split("## Cluster backends on one machine")
    assert "multitrack-ray" not in peers.split("## (c) cpu")[1]
    assert "| (c) cpu | multitrack-ray | 1.00 | 1.00\u20131.00 | 4.00 | 0.50 | 2/2 |" in cluster
    assert "**multitrack** (process backend) | 2.00" in cluster
    assert "fewer than the others" in cluster  # 2 runs where the peers had 3: said why


# -- workload (g) and the worker-replacement row (issue 13) --------------------------------------


def test_a_script_of_several_calls_splits_the_tasks_in_order() -> None:
    assert split(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert split([1, 2], 1) == [[1, 2]]
    assert workloads.calls("g", {"calls": 5}) == 5
    assert workloads.calls("c", {"calls": 5}) == 1  # every other workload: one call


def test_the_real_script_workload_runs_its_calls_and_checks_results(tmp_path: Path) -> None:
    params = {"calls": 2, "per_call": 3, "rounds": 1}
    spec = {"contender": "loop", "workers": 2, "mode": "map", "out_dir": str(tmp_path)}
    outcome = one.measure({**spec, "workload": "g", "params": params})
    assert outcome["ok"], outcome
    inputs = workloads.build_inputs("g", params, tmp_path)
    assert [job.seed for job in inputs] == list(range(6))
    results = [real_task.blur(job) for job in inputs]
    assert workloads.check("g", inputs, results) is None
    assert workloads.check("g", inputs, results[::-1]) is not None  # out of order
    wrong = [(seed, checksum + 1) for seed, checksum in results]
    assert workloads.check("g", inputs, wrong) is not None  # another image's checksum
    assert real_task.calibrate_rounds() >= 1


def test_the_real_script_workload_says_when_opencv_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    params = workloads.plan("g", quick=True, workdir=tmp_path, spin_s=1e-7)
    assert "needs OpenCV" in params["missing"]  # planned, not crashed
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec = {"contender": "loop", "workload": "g", "params": params, "workers": 2, "mode": "map"}
    spec_path.write_text(json.dumps({**spec, "out_dir": str(tmp_path / "out")}))
    assert one.main([str(spec_path), str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert not result["ok"] and "workload (g) needs OpenCV and numpy" in result["error"]


def test_the_replacement_is_the_first_start_in_another_process_after_the_death(
    tmp_path: Path,
) -> None:
    assert replace.replacement_delay(tmp_path) is None  # no death recorded
    (tmp_path / "death").write_text("10.0 100")
    (tmp_path / "start-1").write_text("9.5 100")  # before the death, in the dead worker
    assert replace.replacement_delay(tmp_path) is None
    (tmp_path / "start-2").write_text("10.5 101")
    (tmp_path / "start-3").write_text("10.25 102")
    assert replace.replacement_delay(tmp_path) == (0.25, 100, 102)


def test_replacement_runs_on_every_pool_but_not_the_loop_nor_the_cluster() -> None:
    takes_part = [name for name, c in CONTENDERS.items() if c.runs_in("replace", 0, 1)]
    assert "multitrack" in takes_part and "pebble" in takes_part and "executor" in takes_part
    for name in ("loop", "multitrack-pool", *CLUSTER):
        assert name not in takes_part


def _replace_once(name: str, tmp_path: Path) -> dict[str, Any]:
    spec_path, result_path = tmp_path / f"{name}.json", tmp_path / f"{name}-result.json"
    spec = {"contender": name, "workload": "replace", "params": {}, "workers": 1}
    spec_path.write_text(json.dumps({**spec, "mode": "replace", "out_dir": str(tmp_path / name)}))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.one", str(spec_path), str(result_path)],
        cwd=ROOT,
        timeout=30,
        check=True,
        start_new_session=True,
        capture_output=True,
    )
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def test_replacement_child_times_multitrack_and_reports_a_broken_pool(tmp_path: Path) -> None:
    mt = _replace_once("multitrack", tmp_path)
    assert mt["ok"], mt
    assert mt["detail"]["fate"] == "returned"  # errors="return": the call goes on
    assert mt["detail"]["new_pid"] != mt["detail"]["dead_pid"]
    assert 0 < mt["seconds"] < replace.PATIENCE_S
    broken = _replace_once("executor", tmp_path)
    assert not broken["ok"] and "BrokenProcessPool" in broken["error"]


def test_quick_run_renders_the_real_script_and_replacement_rows(tmp_path: Path) -> None:
    out, saved_json = tmp_path / "report.md", tmp_path / "runs.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--only", "g,replace"]
    command += ["--contenders", "loop,multitrack,executor", "--write", str(out)]
    done = subprocess.run(
        [*command, "--json", str(saved_json)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    summary = re.search(r"^\| \(g\) real-script \|.*\| executor \|.*\*\*[0-9.]+ \(", text, re.M)
    assert summary is not None, text  # the paired column against the peer that ran
    assert "## (g) real-script" in text and "`real_task.blur`" in text
    section = text.split("## Worker replacement")[1]
    assert re.search(r"^\| \*\*multitrack\*\* \| [0-9.]+ \|.*\| returned \|$", section, re.M)
    assert re.search(r"^\| executor \| \u2013 \|.*\*\*breaks the pool\*\*", section, re.M)
    assert "| loop |" not in section  # the loop would die itself
    # results saved before the row existed still render
    data = json.loads(saved_json.read_text())
    del data["replace"]
    saved_json.write_text(json.dumps(data))
    assert "## Worker replacement" not in report.render(saved.load(saved_json))


# benchmarks/real_tools: the pure pieces (the real run needs the registries and minutes)


def _decode_png(blob: bytes) -> tuple[int, int, int, bytes]:
    """Width, height, bit depth and the unfiltered rows of a PNG written by ``png_bytes``."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth = struct.unpack(">IIB", blob[16:25])
    start = blob.index(b"IDAT")
    (length,) = struct.unpack(">I", blob[start - 4 : start])
    return width, height, depth, zlib.decompress(blob[start + 4 : start + 4 + length])


def test_real_tools_png_holds_16_bit_ids_row_by_row() -> None:
    width, height, depth, raw = _decode_png(datasets.png_bytes([[26001, 7], [24000, 0]], 16, 1))
    assert (width, height, depth) == (2, 2, 16)
    # each row: filter byte 0, then big-endian samples
    assert raw == bytes([0, 0x65, 0x91, 0, 7, 0, 0x5D, 0xC0, 0, 0])


def test_real_tools_cityscapes_layout_is_what_the_converters_read(tmp_path: Path) -> None:
    assert sum(datasets.SPLITS.values()) == 24  # mmseg's converter: all splits in one call
    images = datasets.make_cityscapes(tmp_path, {"train": 2, "val": 1, "test": 1})
    assert len(images) == 4
    for image in images:
        # mmdet's collect_files: glob('<split>/*/...png'), the gtFine names from the image's
        split_dir = image.parent.parent
        assert image.name.endswith("_leftImg8bit.png") and split_dir.parent.name == "leftImg8bit"
        stem = str(image.relative_to(tmp_path / "leftImg8bit"))[: -len("leftImg8bit.png")]
        for suffix in ("gtFine_instanceIds.png", "gtFine_labelIds.png", "gtFine_polygons.json"):
            assert (tmp_path / "gtFine" / (stem + suffix)).is_file()
    frame0 = tmp_path / "gtFine/train/aachen/aachen_000000_000000_gtFine_polygons.json"
    polygons = json.loads(frame0.read_text())
    labels = {obj["label"] for obj in polygons["objects"]}
    assert labels == {"sky", "road", "car", "cargroup", "person"}  # frame 0: a crowd too


def test_real_tools_scene_has_instances_crowds_and_stuff_inside_the_image() -> None:
    for frame in range(16):
        ids = {i for row in datasets.paint(datasets.scene(frame)) for i in row}
        assert all(len(row) == datasets.WIDTH for row in datasets.paint(datasets.scene(frame)))
        assert {datasets.ROAD, datasets.SKY, 26000, 24000} <= ids
        assert (datasets.CAR in ids) == (frame % 2 == 0)  # crowds: the label id alone
    cv2, numpy = pytest.importorskip("cv2"), pytest.importorskip("numpy")
    blob = datasets.png_bytes(datasets.paint(datasets.scene(0)), 16, 1)
    decoded = cv2.imdecode(numpy.frombuffer(blob, "uint8"), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype.name == "uint16" and decoded.shape == (datasets.HEIGHT, datasets.WIDTH)
    assert decoded[60, 60] == 26000


def test_real_tools_coco_annotations_point_at_its_images() -> None:
    data = datasets.coco(images=50)
    image_ids = {image["id"] for image in data["images"]}  # type: ignore[attr-defined]
    annotations = data["annotations"]
    assert len(image_ids) == 50 and annotations
    assert {a["image_id"] for a in annotations} <= image_ids  # type: ignore[attr-defined]
    assert len({a["id"] for a in annotations}) == len(annotations)  # type: ignore[arg-type]
    assert {"info", "licenses", "categories"} <= data.keys()


def _tool_run(mode: str, round_: int, seconds: float, files: str = "a", rc: int = 0) -> timing.Run:
    return timing.Run("tool", mode, round_, seconds, rc, {"out/x.json": files}, "")


def test_real_tools_table_pairs_each_round_with_mmengine() -> None:
    runs = [
        _tool_run("mmengine", 0, 1.0),
        _tool_run("multitrack", 0, 2.0),
        _tool_run("mmengine", 1, 4.0),  # a busy round: both slow
        _tool_run("multitrack", 1, 4.0),
        _tool_run("mmengine", 2, 1.0),
        _tool_run("multitrack", 2, 1.5),
    ]
    assert timing.ratios(runs, "tool", "multitrack") == [2.0, 1.0, 1.5]
    table = timing.table(runs, ["tool"], ["mmengine", "multitrack"])
    assert "| tool | 1.00 s (1.00-4.00) | 2.00 s (1.50-4.00) | 1.50x (1.00-2.00) |" in table
    assert timing.order(["a", "b", "c"], 1) == ["b", "c", "a"]


def test_real_tools_mismatches_name_the_runs_that_differ() -> None:
    runs = [
        _tool_run("mmengine", 0, 1.0),
        _tool_run("multitrack", 0, 1.0),
        _tool_run("multitrack", 1, 1.0, files="b"),
        _tool_run("multitrack fork", 0, 1.0, rc=1),
    ]
    assert timing.mismatches(runs, "tool") == [
        "multitrack round 1: 1 files differ, e.g. ['out/x.json']",
        "multitrack fork round 0: exit status 1",
    ]
    assert "failed" in timing.table(runs[3:], ["tool"], ["mmengine", "multitrack fork"])
