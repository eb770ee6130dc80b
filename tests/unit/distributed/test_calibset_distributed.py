"""``generate_calibrate_set`` across 2 gloo processes equals one process; parts, manifest, resume, errors.

One process group runs every scenario (module fixture) on the tiny SD3 pipeline with 5 prompts
(process 0 generates prompts 0, 2, 4 and process 1 prompts 1, 3), process 0 also making the
single-process reference (``distributed=False``) in the same process:

* in memory and on disk, every process returns the single-process set (items bit for bit, infos,
  settings); on disk every process writes only its own part, process 0 alone the manifest;
* an interrupted run (process 1 fails in the middle of a prompt) raises in both processes, and the
  rerun resumes: process 0 generates nothing, process 1 only the rest of the interrupted prompt;
* a complete set is reused by a distributed run and by a single process;
* errors: more processes than prompts (``sample_size`` and a short list), different settings,
  parts of a run with another number of processes, a single process on an interrupted distributed set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from ._spawn import error_of, run_group

PROMPTS = ["a fox", "red car", "blue sky", "a tree", "big dog"]
RUN = {
    "num_inference_steps": 4,
    "timestep_per_sample": 2,
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,
}


def _as_data(calib: Any) -> dict[str, Any]:
    items = [{k: v for k, v in calib[i].items() if isinstance(v, torch.Tensor)} for i in range(len(calib))]
    infos = json.dumps([calib.info(i) for i in range(len(calib))])
    return {"items": items, "infos": infos, "settings": json.dumps(calib.settings, sort_keys=True)}


def _worker(rank: int, world: int, tmp: str) -> dict[str, Any]:
    from segquant_fx.calibset import UniformSampler, generate
    from segquant_fx.calibset import generate_calibrate_set as gen
    from segquant_fx.models.pipeline_zoo import build_pipeline

    root = Path(tmp)
    pipe = build_pipeline("tiny-sd3")
    out: dict[str, Any] = {}

    def run(prompts: list[str] = PROMPTS, **kw: Any) -> Any:
        return gen(pipe, UniformSampler(), prompts, "transformer", progress=False, **{**RUN, **kw})

    # -- in memory
    out["memory"] = _as_data(run())
    if rank == 0:
        out["single"] = _as_data(run(distributed=False))
        single_disk = run(distributed=False, dump_path=root / "single", chunk_size=1)
        out["single_disk"] = json.loads((single_disk.path / "manifest.json").read_text())

    # -- on disk, with a spy on every manifest write
    written: list[str] = []
    orig_write = generate.write_manifest

    def spy(path: Path, manifest: dict[str, Any]) -> None:
        written.append(Path(path).relative_to(root).as_posix())
        orig_write(path, manifest)

    with mock.patch.object(generate, "write_manifest", spy):
        disk = run(dump_path=root / "c1", chunk_size=1)
    out["disk"] = _as_data(disk)
    out["disk_manifest"] = json.loads((root / "c1" / "manifest.json").read_text())
    out["written"] = written
    out["chunk_files"] = [c["file"] for c in disk.chunks]

    # -- interrupted in the middle of prompt 3 (process 1's second prompt), then resumed
    orig_add = generate._Store.add

    def failing_add(self: Any, item: Any, info: Any) -> None:
        if rank == 1 and info["prompt_index"] == 3 and self.current[1] == 1:
            raise RuntimeError("injected failure")
        orig_add(self, item, info)

    with mock.patch.object(generate._Store, "add", failing_add):
        out["interrupted"] = error_of(lambda: run(dump_path=root / "c2", chunk_size=1))
    calls: list[int] = []
    orig_run = generate._run_prompt

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(args[3])  # the prompt index
        orig_run(*args, **kwargs)

    with mock.patch.object(generate, "_run_prompt", counting):
        out["resumed"] = _as_data(run(dump_path=root / "c2", chunk_size=1))
        out["resumed_calls"] = list(calls)
        calls.clear()
        run(dump_path=root / "c1", chunk_size=1)  # complete: reused by both processes
        out["reuse_calls"] = list(calls)
        if rank == 0:
            calls.clear()
            out["single_reuse_len"] = len(run(dump_path=root / "c1", chunk_size=1, distributed=False))
            out["single_reuse_calls"] = list(calls)

    # -- errors
    out["errors"] = {
        "sample_size": error_of(lambda: run(sample_size=1)),
        "one_prompt": error_of(lambda: run(PROMPTS[:1])),
        "seed": error_of(lambda: run(seed=rank)),
    }
    (root / "foreign" / "parts" / "rank000-of-003").mkdir(parents=True, exist_ok=True)
    out["errors"]["foreign_parts"] = error_of(lambda: run(dump_path=root / "foreign"))
    if rank == 0:
        (root / "partial" / "parts" / "rank000-of-002").mkdir(parents=True)
        out["errors"]["single_on_parts"] = error_of(
            lambda: run(dump_path=root / "partial", distributed=False)
        )
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("calibset_group")
    return run_group(_worker, tmp, str(tmp))


def _assert_same_set(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """Same items (bitwise), infos and settings (chunk size aside: the disk sets use 1)."""
    assert json.loads(a["infos"]) == json.loads(b["infos"]), what
    sa, sb = json.loads(a["settings"]), json.loads(b["settings"])
    sa.pop("chunk_size"), sb.pop("chunk_size")
    assert sa == sb, what
    assert len(a["items"]) == len(b["items"]), what
    for i, (x, y) in enumerate(zip(a["items"], b["items"], strict=True)):
        assert x.keys() == y.keys(), f"{what}: item {i}"
        for k in x:
            assert torch.equal(x[k], y[k]), f"{what}: item {i} {k}"


def test_memory_set_equals_single_process(group):
    single = group[0]["single"]
    assert len(single["items"]) == 10
    assert [i["prompt_index"] for i in json.loads(single["infos"])] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for r in (0, 1):
        _assert_same_set(group[r]["memory"], single, f"memory set of process {r}")


def test_disk_set_equals_single_process_with_one_manifest_writer(group):
    single = group[0]["single"]
    for r in (0, 1):
        _assert_same_set(group[r]["disk"], single, f"disk set of process {r}")
    # only process 0 wrote the set's manifest (once, at the end); each process wrote only its own part
    assert group[0]["written"].count("c1") == 1 and group[0]["written"][-1] == "c1"
    assert "c1" not in group[1]["written"]
    for r in (0, 1):  # (directories whose manifest.json was written)
        assert set(group[r]["written"]) - {"c1"} == {f"c1/parts/rank{r:03d}-of-002"}
    # chunks in prompt order, each from the process that made it; the manifest reads like one process's
    files = group[0]["chunk_files"]
    assert len(files) == 10 and all(f.startswith("parts/rank00") for f in files)
    assert [f.split("/")[1] for f in files[::2]] == [f"rank{i % 2:03d}-of-002" for i in range(5)]


def test_manifest_matches_the_single_process_manifest(group):
    """Settings (chunk size included), prompt hashes, counts: as a single process writes them."""
    single, dist = group[0]["single_disk"], group[0]["disk_manifest"]
    assert single["complete"] and dist["complete"]
    for key in ("settings", "num_items", "num_prompts", "cursor", "prompt_sha256", "format", "version"):
        assert dist[key] == single[key], key
    assert [c["items"] for c in dist["chunks"]] == [c["items"] for c in single["chunks"]]


def test_interrupted_run_raises_everywhere_and_resumes(group):
    own, other = group[1]["interrupted"], group[0]["interrupted"]
    assert own == {"type": "RuntimeError", "message": "injected failure"}
    assert (
        other["type"] == "SegQuantError"
        and "process 1 of 2 failed: RuntimeError: injected failure" in other["message"]
    )
    assert group[0]["resumed_calls"] == []  # process 0 had finished its part
    assert group[1]["resumed_calls"] == [3]  # only the interrupted prompt (its first item is on disk)
    for r in (0, 1):
        _assert_same_set(group[r]["resumed"], group[0]["single"], f"resumed set of process {r}")


def test_complete_set_is_reused(group):
    assert group[0]["reuse_calls"] == group[1]["reuse_calls"] == []
    assert group[0]["single_reuse_len"] == 10 and group[0]["single_reuse_calls"] == []


@pytest.mark.parametrize(
    ("case", "kind", "text"),
    [
        ("sample_size", "ConfigError", "2 processes but sample_size=1"),
        ("one_prompt", "ConfigError", "2 processes but only 1 prompt"),
        ("seed", "ConfigError", "process 1 has settings.seed=1 but process 0 has settings.seed=0"),
        ("foreign_parts", "ConfigError", "interrupted run with 3 processes; resume it with 3 processes"),
    ],
)
def test_bad_setups_raise_in_every_process(group, case, kind, text):
    for r in (0, 1):
        e = group[r]["errors"][case]
        assert e is not None and e["type"] == kind and text in e["message"], (r, e)


def test_single_process_on_an_interrupted_distributed_set(group):
    e = group[0]["errors"]["single_on_parts"]
    assert e["type"] == "ConfigError" and "interrupted distributed run" in e["message"]
