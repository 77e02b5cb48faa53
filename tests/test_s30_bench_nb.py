"""What a new engineer runs first: the benchmark scripts' answers to mistakes and signals, notebooks/strip_outputs.py,
and the notebooks' server and subprocess cells (each cell run alone against a fake `wildcheck`, not the notebook)."""

from __future__ import annotations

import ast
import json
import os
import resource
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
STRIP = REPO / "notebooks" / "strip_outputs.py"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")} | {"OMP_NUM_THREADS": "1"}


def fake_wildcheck(folder: Path, message: str, code: int = 2) -> str:
    """An executable that says ``error: MESSAGE`` on stderr and exits ``code``, as `wildcheck` does for a mistake."""
    path = folder / "fake-wildcheck"
    path.write_text(f"#!/bin/sh\necho 'error: {message}' >&2\nexit {code}\n")
    path.chmod(0o755)
    return str(path)


def notebook_with_outputs(path: Path) -> bytes:
    nb = nbformat.read(REPO / "notebooks" / "01_train_and_evaluate.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        cell.outputs, cell.execution_count = [nbformat.v4.new_output("stream", text=f"output {i}\n" * 200)], i + 1
    nb.cells.append(nbformat.v4.new_raw_cell("raw text stays"))
    nbformat.write(nb, path)
    return path.read_bytes()


def cell_source(name: str, index: int) -> str:
    return nbformat.read(REPO / "notebooks" / name, as_version=4).cells[index].source


# -- notebooks/strip_outputs.py -------------------------------------------------------------------------------------

def test_strip_outputs_reports_each_bad_path_and_still_strips_the_rest(tmp_path):
    bad = tmp_path / "latin1.ipynb"
    bad.write_bytes(b"\xff\xfe{not utf-8")
    folder = tmp_path / "folder.ipynb"
    folder.mkdir()
    good = tmp_path / "good.ipynb"
    notebook_with_outputs(good)
    good.chmod(0o640)
    done = subprocess.run([sys.executable, str(STRIP), str(bad), str(folder), str(tmp_path / "missing.ipynb"),
                           str(REPO / "README.md"), str(good)], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4 and [line.split(": ")[0] for line in lines] == [
        str(bad), str(folder), str(tmp_path / "missing.ipynb"), str(REPO / "README.md")]
    nb = nbformat.read(good, as_version=4)  # the good one after the bad ones is stripped all the same
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert nb.cells[-1].cell_type == "raw" and nb.cells[-1].source == "raw text stays"
    assert good.stat().st_mode & 0o777 == 0o640
    assert bad.read_bytes() == b"\xff\xfe{not utf-8" and sorted(p.name for p in tmp_path.iterdir()) == [
        "folder.ipynb", "good.ipynb", "latin1.ipynb"]


def test_strip_outputs_on_a_full_disk_leaves_the_notebook_whole(tmp_path):
    """A write that fails half-way (here: a file-size limit, as a full disk) must not leave half a notebook: the
    notebook is the work, its outputs are what was to be dropped."""
    path = tmp_path / "nb.ipynb"
    before = notebook_with_outputs(path)

    def limit():  # the stripped notebook (~4 KB) does not fit; SIGXFSZ ignored, so the write fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    done = subprocess.run([sys.executable, str(STRIP), str(path)], capture_output=True, text=True, env=ENV,
                          preexec_fn=limit, timeout=60)
    assert done.returncode != 0
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["nb.ipynb"]  # no temporary left beside it


# -- benchmarks/*.py --------------------------------------------------------------------------------------------------

def test_every_benchmark_script_ends_through_run_main():
    """Each script's `__main__` block goes through benchmarks/_entry.py's run_main (one line for a WildcheckError,
    SIGTERM unwinds): a new script that calls main() bare gets tracebacks and orphaned servers back."""
    scripts = [p for p in sorted(BENCH.glob("*.py")) if p.name not in ("__init__.py", "_entry.py", "naive_service.py")]
    assert len(scripts) >= 28
    bare = []
    for path in scripts:
        tree = ast.parse(path.read_text())
        blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        calls = [ast.unparse(c.func) for b in blocks for c in ast.walk(b) if isinstance(c, ast.Call)]
        if "run_main" not in calls:
            bare.append(path.name)
    assert bare == []


def test_a_benchmark_given_a_missing_model_says_so_in_one_line(tmp_path):
    from PIL import Image

    for label, n in (("ivory", 2), ("other", 3)):
        (tmp_path / "met" / "val" / label).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(tmp_path / "met" / "val" / label / f"{i}.jpg")
    done = subprocess.run([sys.executable, str(BENCH / "panels_request_time.py"), str(tmp_path / "nope.onnx"),
                           str(tmp_path / "nope-panels.onnx"), "--met", str(tmp_path / "met"), "--repeat", "1"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {tmp_path / 'nope.onnx'} does not exist"


def test_sigterm_stops_the_server_a_benchmark_started(tmp_path):
    """`timeout` or `kill` sends SIGTERM: the benchmark's server (its own process group) must go with it."""
    pidfile = tmp_path / "server.pid"
    server = tmp_path / "fake-serve"
    server.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 300\n")
    server.chmod(0o755)
    bench = subprocess.Popen([sys.executable, str(BENCH / "serve_footprint.py"), "--wildcheck", str(server),
                              "--model", str(tmp_path / "m.onnx")], env=ENV | {"TMPDIR": str(tmp_path)}, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    try:
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=30)
        time.sleep(0.5)
        alive = Path(f"/proc/{pid}").exists() and "sleep" in Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
        assert not alive, "the server outlived the benchmark that started it"
        assert bench.returncode == 128 + signal.SIGTERM
        assert not list(tmp_path.glob("footprint-bentoml-*"))  # its BentoML home and server log, removed
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # what the old code left behind
        except ProcessLookupError:
            pass
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_robustness_seeds_names_a_malformed_recipe():
    done = subprocess.run([sys.executable, str(BENCH / "robustness_seeds.py"), "--recipe", "runs/a,runs/b"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--recipe 'runs/a,runs/b': write NAME=RUN1,RUN2" in done.stderr


def test_retrain_bench_checks_scratch_before_hours_of_training(tmp_path):
    (tmp_path / "met_run").mkdir()  # a run folder without benchmark.json (say, a `wildcheck train` run)
    (tmp_path / "shared" / "met-ivory").mkdir(parents=True)
    done = subprocess.run([sys.executable, str(BENCH / "retrain_bench.py"), "--out", str(tmp_path / "rb"),
                           "--scratch", str(tmp_path / "met_run"), "--shared", str(tmp_path / "shared")],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--scratch {tmp_path / 'met_run'}: needs the best.pt and benchmark.json" in done.stderr
    assert not (tmp_path / "rb").exists()


def test_same_seed_check_compares_with_the_numbers_it_is_about_to_replace(tmp_path, monkeypatch, capsys):
    """`same_seed_check.py OUT --compare OUT/numbers.json` (a rerun into the same folder) read the file after
    writing the new numbers into it, so any change came out "identical"."""
    monkeypatch.syspath_prepend(str(BENCH))
    import same_seed_check

    (tmp_path / "numbers.json").write_text(json.dumps({"mix": {"best_epoch": 2}, "nomix": {"best_epoch": 3}}))
    monkeypatch.setattr(same_seed_check, "run", lambda out: {"mix": {"best_epoch": 2}, "nomix": {"best_epoch": 1}})
    monkeypatch.setattr(sys, "argv", ["same_seed_check.py", str(tmp_path), "--compare", str(tmp_path / "numbers.json")])
    same_seed_check.main()
    printed = capsys.readouterr().out
    assert "{'mix': 'identical', 'nomix': 'DIFFERENT'}" in printed
    assert json.loads((tmp_path / "numbers.json").read_text())["nomix"] == {"best_epoch": 1}

    def never(out):
        raise AssertionError("trained before finding that --compare is missing")

    monkeypatch.setattr(same_seed_check, "run", never)
    monkeypatch.setattr(sys, "argv", ["same_seed_check.py", str(tmp_path / "b"), "--compare", str(tmp_path / "no.json")])
    with pytest.raises(SystemExit) as stop:
        same_seed_check.main()
    assert stop.value.code == 2 and not (tmp_path / "b").exists()


# -- the notebooks' cells ---------------------------------------------------------------------------------------------

def test_gallery_notebook_stops_when_the_gallery_build_fails(tmp_path):
    namespace = {"subprocess": subprocess, "WILDCHECK": fake_wildcheck(tmp_path, "ref: no <label>/ folders of photos"),
                 "WORK": tmp_path, "REF": tmp_path / "ref", "MODEL": tmp_path / "m.onnx", "NEGATIVES": tmp_path / "neg"}
    with pytest.raises(RuntimeError, match="gallery build failed:\nerror: ref: no <label>/ folders of photos"):
        exec(cell_source("04_reference_gallery.ipynb", 5), namespace)


def test_gallery_notebook_shows_why_its_server_did_not_start(tmp_path):
    """A server that exits at once (here: a model and gallery that do not belong together) is reported with its log,
    not polled for 90 s and then met by a ConnectError that says nothing."""
    no_wait = types.SimpleNamespace(sleep=lambda s: None, time=time.time)  # the old loop's sleeps, skipped
    namespace = {"os": os, "subprocess": subprocess, "httpx": __import__("httpx"), "socket": __import__("socket"),
                 "atexit": __import__("atexit"), "time": no_wait, "Path": Path, "WORK": tmp_path,
                 "WILDCHECK": fake_wildcheck(tmp_path, "gallery g.npz was built with another embedder"),
                 "MODEL": tmp_path / "m.onnx", "GALLERY": tmp_path / "g.npz"}
    started = time.time()
    with pytest.raises(Exception) as failed:
        exec(cell_source("04_reference_gallery.ipynb", 7), namespace)
    assert "gallery g.npz was built with another embedder" in str(failed.value)
    assert time.time() - started < 30


def tiny_embedder(path: Path, scale: float) -> Path:
    """An ``image -> embedding`` ONNX graph without a contract (as gallery_bench.py export-pretrained writes):
    the mean of each channel, times ``scale``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["embedding"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [1], [scale])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_gallery_bench_cache_tells_two_models_of_one_name_apart(tmp_path, monkeypatch):
    """The embedding cache was keyed by the embedder's name (its contract version, or its file name): a second
    model of the same name was scored on the first one's cached embeddings."""
    from PIL import Image

    monkeypatch.syspath_prepend(str(BENCH))
    import gallery_bench

    images = [Image.new("RGB", (40, 30), (200, 20 * i, 90)) for i in range(3)]
    first = gallery_bench.OnnxEmbedder(str(tiny_embedder(tmp_path / "a" / "embedder.onnx", 1.0)), threads=1)
    second = gallery_bench.OnnxEmbedder(str(tiny_embedder(tmp_path / "b" / "embedder.onnx", 2.0)), threads=1)
    assert first.name == second.name == "onnx-embedder"
    a = gallery_bench.embed_images(first, images, tmp_path / "cache", "the same photos")
    b = gallery_bench.embed_images(second, images, tmp_path / "cache", "the same photos")
    np.testing.assert_allclose(b, 2 * a, rtol=1e-5)
    again = gallery_bench.embed_images(first, images, tmp_path / "cache", "the same photos")  # from the cache
    np.testing.assert_array_equal(again, a)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".npy"]


def test_pack_data_skips_an_unreadable_image_and_packs_the_rest(tmp_path):
    from PIL import Image

    folder = tmp_path / "shared" / "pool" / "train" / "other"
    folder.mkdir(parents=True)
    Image.new("RGB", (600, 400), (90, 120, 30)).save(folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    done = subprocess.run([sys.executable, str(BENCH / "pack_data.py"), "--out", str(tmp_path / "pack"), "--pool", "pool",
                           "--shared", str(tmp_path / "shared")], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"skipped {folder / 'broken.jpg'}: ")
    packed = tmp_path / "pack" / "pool" / "train" / "other" / "good.webp"
    assert Image.open(packed).size == (440, 293)
    assert "1 images" in done.stdout and "1 unreadable skipped" in done.stdout


def test_met_ivory_names_a_missing_pool_as_a_user_mistake(tmp_path, monkeypatch):
    """A misspelt --pool was a FileNotFoundError traceback; now a WildcheckError: `error: ...`, exit 2."""
    from serving.errors import WildcheckError

    monkeypatch.syspath_prepend(str(BENCH))
    import met_ivory

    (tmp_path / "shared" / "generic-products").mkdir(parents=True)
    with pytest.raises(WildcheckError) as missing:
        met_ivory.pool_root("generic-prodcts", tmp_path / "shared", tmp_path / "run")
    assert str(missing.value) == (f"pool {tmp_path / 'shared' / 'generic-prodcts'} not found: name a folder under "
                                  f"{tmp_path / 'shared'} (--pool NAME[:SOURCES])")
    assert missing.value.exit_code == 2 and not (tmp_path / "run").exists()


def test_screen_cache_interrupted_mid_write_keeps_the_last_whole_file(tmp_path, monkeypatch):
    """ensemble_check's cache files (and head_refit's, size_route_screen's): Ctrl-C while one is written must leave
    the earlier file, not a zip of the arrays written so far that the next screen takes as cached."""
    from training.fileio import atomic_savez

    path = tmp_path / "meta.npz"
    atomic_savez(path, y=np.arange(3), labels=np.array(["ivory", "other"]), validation=np.array("v1"))
    real, calls = np.lib.format.write_array, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_savez(path, y=np.arange(5), labels=np.array(["ivory", "other"]), validation=np.array("v2"))
    monkeypatch.undo()
    with np.load(path) as cached:
        assert sorted(cached.files) == ["labels", "validation", "y"] and str(cached["validation"]) == "v1"
        assert list(cached["y"]) == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["meta.npz"]


def test_pack_data_keeps_two_images_of_one_name_and_two_formats(tmp_path):
    """Before: a.jpg and a.png of one folder both became a.webp, one silently overwriting the other."""
    from PIL import Image

    folder = tmp_path / "shared" / "pool" / "train" / "other"
    folder.mkdir(parents=True)
    Image.new("RGB", (600, 400), (90, 120, 30)).save(folder / "a.jpg")
    Image.new("RGB", (400, 600), (10, 20, 230)).save(folder / "a.png")
    done = subprocess.run([sys.executable, str(BENCH / "pack_data.py"), "--out", str(tmp_path / "pack"), "--pool", "pool",
                           "--shared", str(tmp_path / "shared")], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    packed = sorted(p.name for p in (tmp_path / "pack" / "pool" / "train" / "other").iterdir())
    assert len(packed) == 2 and "a.webp" in packed and "2 images" in done.stdout, packed


def test_train_step_bench_refuses_zero_steps():
    """Before: --steps 0 measured nothing and divided by zero (a ZeroDivisionError traceback)."""
    done = subprocess.run([sys.executable, str(BENCH / "train_step_bench.py"), "--steps", "0"], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert done.returncode == 2 and "--steps" in done.stderr and "Traceback" not in done.stderr


def test_robustness_seeds_tables_the_conditions_every_run_measured(tmp_path, monkeypatch):
    """Before: runs measured with different condition sets (or without `clean`) ended in a KeyError."""
    monkeypatch.syspath_prepend(str(BENCH))
    import robustness_seeds

    def report(conditions):
        one = {"per_class": {"ivory": {"flag_recall": 0.95, "block_recall": 0.9}},
               "negatives": {"flagged": 0.02, "blocked": 0.01}, "balanced_accuracy": 0.96}
        return json.dumps({"conditions": {c: one for c in conditions}})

    runs = []
    for name, conditions in (("a", ["clean", "jpeg", "grey"]), ("b", ["clean", "jpeg"])):
        for key in ("met", "pools"):
            (tmp_path / name / f"rob_{key}").mkdir(parents=True)
            (tmp_path / name / f"rob_{key}" / "robustness.json").write_text(report(conditions))
        runs.append(tmp_path / name)
    text, means = robustness_seeds.table("r", runs)
    assert list(means["ivory flagged (Met val)"]) == ["clean", "jpeg"] and "left out, not in every report: grey" in text
    assert robustness_seeds.misses(means) == ["clean: ordinary photos flagged 2.0% > 1%"]
    for key in ("met", "pools"):
        (tmp_path / "b" / f"rob_{key}" / "robustness.json").write_text(report(["jpeg"]))
    _, means = robustness_seeds.table("r", runs)
    assert "clean: not measured (the as-is targets need the clean condition)" in robustness_seeds.misses(means)
