"""What every tool owes its files and its terminal (tool_io.py): no output path replaces an input image, a run's file or
the run folder; file names of any bytes work under any stdout encoding; a closed stdout pipe ends quietly; Ctrl-C ends
with one line; a user without a home directory gets a cache folder all the same.

The run folder here is made by hand (a small CNN's random weights and its config), not trained: every check reads
only what ``predict.load_run`` reads.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from PIL import Image

import cam
import datasets
import models
import predict
import report
import tool_io

STRICT = {"PYTHONIOENCODING": "utf-8:strict"}  # as some desktops' terminals: a surrogate in a name would raise
ODD = b"\xff"  # a byte the OS allows in a file name that is not valid UTF-8
RUN_FILES = ("bestmodel.pt", "config.json", "log.jsonl", "final.json", "data.json")


def make_run(folder: Path) -> Path:
    """A run folder as main.py leaves it: config.json, bestmodel.pt (a small CNN's weights) and the other files."""
    folder.mkdir(parents=True)
    cfg = predict.config_from_saved({"dataset": "synthetic", "data_root": str(folder / "no_data")})
    model = models.build_model(cfg.arch, 16, use_pretrained=False, boostlu_alpha=cfg.boostlu_alpha)
    torch.save({"model": model.state_dict(), "epoch": 1, "val_map": 50.0}, folder / "bestmodel.pt")
    (folder / "config.json").write_text(cfg.to_json())
    (folder / "log.jsonl").write_text(json.dumps({"epoch": 1, "val_map": 50.0}) + "\n")
    (folder / "final.json").write_text(json.dumps({"best_epoch": 1, "test_map": 50.0, "val_map": 50.0}))
    (folder / "data.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "r")


def write_image(path: Path, shade: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, 200 - shade, 30)).save(path, format="PNG")
    return path


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under ``folders`` with its bytes: equal snapshots mean nothing was written."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def call(tool, capsys, *args) -> tuple[int, str, str]:
    """A tool's ``main`` in this process: exit status, stdout, stderr (an escaping exception fails the test)."""
    try:
        code = tool.main([os.fspath(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def tool(script: str, *args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` in a subprocess, output as bytes (file names of any bytes)."""
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, str(REPO / script), *(os.fsencode(a) for a in args)]
    return subprocess.run(cmd, capture_output=True, env=full_env, timeout=300, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# 1. No command overwrites what it did not make.


def _spellings(tmp: Path, image: Path) -> dict[str, Path]:
    """The same image file under other names: a ``./`` in the path, a symbolic link, a hard link."""
    (tmp / "links").mkdir(exist_ok=True)
    (tmp / "links" / "soft.png").symlink_to(image)
    os.link(image, tmp / "links" / "hard.png")
    return {
        "as given": image,
        "with ./": Path(f"{image.parent}/./{image.name}"),
        "symbolic link": tmp / "links" / "soft.png",
        "hard link": tmp / "links" / "hard.png",
    }


@pytest.mark.parametrize("spelling", ["as given", "with ./", "symbolic link", "hard link"])
def test_predict_refuses_an_output_that_is_an_input_image(run_dir, tmp_path, capsys, spelling):
    image = write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.png", 150)
    output = _spellings(tmp_path, image)[spelling]
    before = snapshot(tmp_path, run_dir)
    code, out, err = call(predict, capsys, run_dir, tmp_path / "imgs", "--output", output, "--num_workers", "0")
    assert code == 1 and out == ""
    assert f"error: --output {output} is one of this command's inputs" in err and "nothing was written" in err
    assert snapshot(tmp_path, run_dir) == before


@pytest.mark.parametrize("name", [*RUN_FILES, "checkpoint.pt"])
@pytest.mark.parametrize("how", ["named", "through ..", "through a link", "another run's"])
def test_predict_refuses_an_output_that_is_a_file_of_a_run(run_dir, tmp_path, capsys, name, how):
    """Existing or not (an unfinished run has no final.json yet, none has checkpoint.pt here), in the run scored or
    in another run folder: predict never writes a file main.py writes in a run folder."""
    image = write_image(tmp_path / "a.png")
    other = make_run(tmp_path / "other")
    (tmp_path / "link").symlink_to(run_dir)
    output = {
        "named": run_dir / name,
        "through ..": run_dir / ".." / run_dir.name / name,
        "through a link": tmp_path / "link" / name,
        "another run's": other / name,
    }[how]
    before = snapshot(tmp_path, run_dir)
    code, out, err = call(predict, capsys, run_dir, image, "--output", output, "--num_workers", "0")
    assert code == 1 and out == ""
    assert f"error: --output {output} is the run folder's " in err and "nothing was written" in err
    assert snapshot(tmp_path, run_dir) == before


def test_predict_refuses_the_run_folder_itself_and_writes_a_new_file_beside_its_files(run_dir, tmp_path, capsys):
    image = write_image(tmp_path / "a.png")
    before = snapshot(run_dir)
    code, _, err = call(predict, capsys, run_dir, image, "--output", run_dir, "--num_workers", "0")
    assert code == 1 and f"--output {run_dir} is" in err and snapshot(run_dir) == before
    # A file of its own in a run folder, or next to the images, is the output's to write (and to replace).
    for output in (run_dir / "predictions.csv", tmp_path / "predictions.csv"):
        for _ in range(2):
            code, _, err = call(predict, capsys, run_dir, image, "--output", output, "--num_workers", "0")
            assert code == 0, err
            assert output.read_text().startswith("path,label,probability\n")
    (run_dir / "predictions.csv").unlink()
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("output", [".", "/", ".."])
def test_refuse_overwrite_takes_paths_without_a_name(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    tool_io.refuse_overwrite(output, "--output", inputs=[write_image(tmp_path / "a.png")])  # a folder: not refused here


def test_predict_refuses_an_output_written_through_an_input(run_dir, tmp_path, capsys):
    """--output X is written as X.tmp, then renamed: an input image called X.tmp would be lost."""
    image = write_image(tmp_path / "out.csv.tmp")
    before = snapshot(tmp_path)
    code, _, err = call(predict, capsys, run_dir, image, "--output", tmp_path / "out.csv", "--num_workers", "0")
    assert code == 1 and f"would be written through {image}, which is one of this command's inputs" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("target", ["the run folder", "a run file", "an input image", "a figure over an input"])
def test_cam_refuses_outputs_that_would_replace_what_it_did_not_make(run_dir, tmp_path, capsys, target):
    image = write_image(tmp_path / "imgs" / "x.png")
    figure_named_like_output = write_image(tmp_path / "figs" / "x_cam.png", 30)  # what x.png's figure would replace
    images, out = {
        "the run folder": ([image], run_dir),
        "a run file": ([image], run_dir / "bestmodel.pt"),
        "an input image": ([image], image),
        "a figure over an input": ([image, figure_named_like_output], tmp_path / "figs"),
    }[target]
    before = snapshot(tmp_path, run_dir)
    code, out_text, err = call(cam, capsys, run_dir, *images, "--out", out)
    assert code == 1 and out_text == "" and "nothing was written" in err, err
    assert snapshot(tmp_path, run_dir) == before


def test_cam_writes_its_figures_into_its_default_folder_in_the_run(run_dir, tmp_path, capsys):
    images = [write_image(tmp_path / "a" / "x.png"), write_image(tmp_path / "b" / "x.png", 40)]
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    code, out, err = call(cam, capsys, run, *images)
    assert code == 0, err
    assert sorted(p.name for p in (run / "cam").iterdir()) == ["x_2_cam.png", "x_cam.png"]
    assert Image.open(run / "cam" / "x_cam.png").size[1] == cam.PANEL + 20


@pytest.mark.parametrize("target", ["the run folder", "a run file"])
def test_report_refuses_an_out_in_place_of_a_run(run_dir, tmp_path, capsys, target):
    out = {"the run folder": run_dir, "a run file": run_dir / "final.json"}[target]
    before = snapshot(run_dir)
    code, text, _ = call(report, capsys, run_dir.parent, "--out", out)
    assert code == 1 and f"error: --out {out} is " in text and "nothing was written" in text
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------------------------------
# 6. Any file name the OS allows, in any locale and stdout encoding.


def test_the_byte_handler_writes_a_names_own_bytes_and_escapes_what_an_encoding_lacks():
    name = os.fsdecode(b"b" + ODD + b".png")  # what Python makes of the name: a lone surrogate
    assert tool_io.encode_text(name) == b"b\xff.png"
    assert tool_io.encode_text("caf\xe9 " + name, "ascii") == b"caf\\xe9 b\xff.png"
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    tool_io.use_any_file_name(stream)
    stream.write(name + "\n")
    stream.flush()
    assert raw.getvalue() == b"b\xff.png\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "locale, fmt, to_file", [("en_US.UTF-8", "csv", False), ("C.UTF-8", "csv", True), ("C", "json", True)]
)
def test_predict_handles_names_that_are_not_utf8_under_a_strict_stdout(run_dir, tmp_path, locale, fmt, to_file):
    """On stdout, or into an --output file whose own name is not UTF-8 either, in a desktop's, a container's and the
    POSIX locale."""
    images = tmp_path / os.fsdecode(b"imgs" + ODD)
    odd_image = write_image(images / os.fsdecode(b"a" + ODD + b".png"))
    write_image(images / "plain.png", 150)
    output = tmp_path / os.fsdecode(b"out" + ODD + b"." + fmt.encode())
    args = [run_dir, images, "--num_workers", "0", "--threshold", "0", "--format", fmt]
    proc = tool("predict.py", *args, *(["--output", output] if to_file else []), env={**STRICT, "LC_ALL": locale})
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    if to_file:
        assert b"to " + os.fsencode(output) + b"\n" in proc.stderr  # "wrote predictions ... to <the name's bytes>"
    written = output.read_bytes() if to_file else proc.stdout
    if fmt == "csv":  # the path's own bytes: the CSV names the file the OS knows
        assert os.fsencode(odd_image) + b",class 0," in written
    else:  # JSON escapes it (\udcff), and reads back to the name Python uses for the file
        rows = json.loads(written)
        assert {r["path"] for r in rows} == {str(odd_image), str(images / "plain.png")}
        assert all(Path(r["path"]).is_file() for r in rows)


@pytest.mark.slow
def test_cam_and_report_handle_names_that_are_not_utf8_under_a_strict_stdout(run_dir, tmp_path):
    image = write_image(tmp_path / os.fsdecode(b"x" + ODD + b".png"))
    figures = tmp_path / os.fsdecode(b"figs" + ODD)
    proc = tool("cam.py", run_dir, image, "--out", figures, env=STRICT)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert proc.stdout == b"wrote " + os.fsencode(figures / os.fsdecode(b"x" + ODD + b"_cam.png")) + b"\n"
    runs = tmp_path / os.fsdecode(b"runs" + ODD)
    shutil.copytree(run_dir, runs / os.fsdecode(b"r" + ODD))
    broken = runs / os.fsdecode(b"broken" + ODD)  # a folder report.py skips, naming it
    broken.mkdir()
    (broken / "final.json").write_text("{}")
    out = tmp_path / os.fsdecode(b"report" + ODD)
    proc = tool("report.py", runs, "--out", out, env=STRICT)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert b"wrote " + os.fsencode(out / "report.md") in proc.stdout
    assert b"skipped " + os.fsencode(broken) in proc.stdout
    assert (out / "report.csv").is_file()


def test_a_data_root_whose_name_is_not_utf8_gets_its_derived_folder(tmp_path):
    root = tmp_path / os.fsdecode(b"data" + ODD)
    root.mkdir()
    assert datasets.derived_folder("synthetic", root) == root
    cached = datasets.derived_folder("synthetic", root, tmp_path / "cache")
    assert cached.parent == tmp_path / "cache" and cached.name.startswith("synthetic-")


@pytest.mark.slow
def test_main_and_datasets_cli_handle_names_that_are_not_utf8_under_a_strict_stdout(synthetic_root, tmp_path):
    root = tmp_path / os.fsdecode(b"data" + ODD)
    root.symlink_to(synthetic_root)
    proc = tool("datasets.py", "synthetic", "--data_root", root, env=STRICT)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert b"is ready in " + os.fsencode(root) in proc.stdout
    save = tmp_path / os.fsdecode(b"runs" + ODD)
    args = ["--data_root", root, "--save_path", save, "--exp_name", "x", "--num_epochs", "1", "--ss_frac_train",
            "0.05", "--ss_frac_val", "0.05", "--num_workers", "0"]  # fmt: skip
    proc = tool("main.py", *args, env=STRICT)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert b"run folder " + os.fsencode(save / "x") in proc.stdout
    assert json.loads((save / "x" / "config.json").read_text())["save_path"] == str(save)


# ---------------------------------------------------------------------------------------------------------------------
# 6. A closed stdout pipe, Ctrl-C, no home directory.


def _closed_stdout(script: str, *args) -> subprocess.CompletedProcess:
    """Run a tool whose stdout is a pipe nobody reads (``... | head`` after head has exited)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    return subprocess.CompletedProcess(cmd, proc.wait(timeout=300), b"", err)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["predict.py", "report.py", "main.py"])
def test_a_closed_stdout_pipe_ends_quietly_as_unix_tools_do(run_dir, synthetic_root, tmp_path, script):
    image = write_image(tmp_path / "a.png")
    args = {
        "predict.py": [run_dir, image, "--num_workers", "0"],
        "report.py": [run_dir.parent, "--out", tmp_path / "report"],
        "main.py": ["--data_root", synthetic_root, "--save_path", tmp_path / "runs", "--exp_name", "x", "--num_epochs",
                    "1", "--ss_frac_train", "0.05", "--ss_frac_val", "0.05", "--num_workers", "0"],
    }[script]  # fmt: skip
    proc = _closed_stdout(script, *args)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == -signal.SIGPIPE, err  # killed by SIGPIPE, as `yes | head` kills yes
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    if script == "report.py":  # its files come before its printout
        assert (tmp_path / "report" / "report.md").is_file()


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    start = time.time()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < 120, f"no {what} after 120 s"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["predict.py", "cam.py", "report.py", "datasets.py"])
def test_ctrl_c_while_a_tool_imports_torch_ends_with_one_line(run_dir, tmp_path, script):
    image = write_image(tmp_path / "a.png")
    args = {"predict.py": [run_dir, image], "cam.py": [run_dir, image, "--out", tmp_path / "figs"],
            "report.py": [run_dir.parent, "--out", tmp_path / "report"],
            "datasets.py": ["synthetic", "--data_root", tmp_path / "data"]}[script]  # fmt: skip
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    _wait_for(proc, lambda: "libtorch" in maps.read_text(errors="replace"), "torch")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    # (a machine that imports torch faster than this test looks meets the tool itself, with its own message)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error: interrupted"), err
    if "while starting" in err:
        assert not (tmp_path / "figs").exists() and not (tmp_path / "report").exists()
        assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_ctrl_c_while_cam_draws_ends_with_one_line_and_whole_figures(run_dir, tmp_path):
    images = [write_image(tmp_path / "imgs" / f"{i}.png", i) for i in range(200)]
    cmd = [sys.executable, str(REPO / "cam.py"), str(run_dir), *map(str, images), "--out", str(tmp_path / "figs")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each "wrote" line as it is printed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()
    assert first.startswith("wrote "), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == cam.INTERRUPTED.join(["error: ", "\n"])
    figures = list((tmp_path / "figs").iterdir())
    assert 0 < len(figures) < len(images) and not [f for f in figures if f.suffix != ".png"]
    for figure in figures:
        Image.open(figure).load()  # whole: no figure cut short by the Ctrl-C


def test_no_home_directory_falls_back_to_a_temporary_cache(tmp_path, monkeypatch, capsys):
    """A container's user: no HOME, no passwd entry (``Path.home()`` raises), and a read-only data root."""
    root = tmp_path / "readonly"
    root.mkdir()
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home(cls=None):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: mode != os.W_OK and writable(p, mode, **kw))
    folder = datasets.derived_folder("synthetic", root)
    assert folder.parent == tmp_path / "tmp" / f"largeloss-cache-{os.getuid()}" / "largeloss"
    out = capsys.readouterr().out
    assert f"go to {folder} (this user has no home directory: a temporary folder)" in out


def test_a_plain_home_keeps_its_cache_and_says_nothing_more(tmp_path, monkeypatch, capsys):
    root = tmp_path / "readonly2"
    root.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    writable = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: mode != os.W_OK and writable(p, mode, **kw))
    folder = datasets.derived_folder("synthetic", root)
    assert folder.parent == tmp_path / "home" / ".cache" / "largeloss"
    assert "no home directory" not in capsys.readouterr().out
