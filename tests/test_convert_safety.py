"""The converter against hostile and careless input: --force never deletes what is not a previous
output, sidecars are copied only as regular files inside the checkpoint (hub snapshots included),
FIFOs are refused without blocking, SIGTERM / SIGHUP clean up like Ctrl-C, a killed conversion's temp
folder is removed by the next one when its writer is provably dead, write errors are one line.
"""

import errno
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_compact.convert import ConvertError, convert

from mlx_compact.cli import main
from mlx_compact.files import InputError

conv = importlib.import_module("mlx_compact.convert.convert")  # the module; the package's `convert` is the function

ARCH = "qwen2_vl"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: file bytes, link targets, folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = ("dir",) if p.is_dir() else ("file", p.read_bytes())
    return out


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def src(ckpt, tmp_path):
    """A private copy of the tiny checkpoint, to add hostile files to."""
    return Path(shutil.copytree(ckpt(ARCH), tmp_path / "src"))


@pytest.fixture(scope="module")
def previous(ckpt, tmp_path_factory):
    """A previous conversion's output (bfloat16), to copy."""
    return convert(ckpt(ARCH), tmp_path_factory.mktemp("previous") / "out", progress=False)


def test_convert_error_is_an_input_error():
    assert issubclass(ConvertError, InputError) and issubclass(ConvertError, ValueError)


# ---------------------------------------------------------------- --force and the output path


def _refusal(case, tmp_path, src, previous):
    """(source, output, expected message) of a conversion that must be refused."""
    if case == "parent":
        parent = tmp_path / "parent"
        parent.mkdir()
        moved = Path(shutil.move(src, parent / "src"))
        (parent / "notes.md").write_text("mine")
        return moved, parent, "contains the source checkpoint"
    if case == "grandparent":
        top = tmp_path / "top"
        (top / "mid").mkdir(parents=True)
        moved = Path(shutil.move(src, top / "mid" / "src"))
        return moved, top, "contains the source checkpoint"
    if case == "source":
        return src, src, "is the source checkpoint"
    out = tmp_path / "out"
    if case == "is a file":
        out.write_text("mine")
        return src, out, "is a file, not a folder"
    if case == "parent is a file":
        (tmp_path / "afile").write_text("mine")
        return src, tmp_path / "afile" / "out", "afile is not a folder"
    shutil.copytree(previous, out)
    if case == "foreign file":
        (out / "notes.md").write_text("mine")
        return src, out, r"is not a previous mlx-compact conversion \(it holds notes.md\)"
    if case == "subfolder":
        (out / "sub").mkdir()
        (out / "sub" / "tokenizer.json").write_text("mine")
        return src, out, r"\(it holds the folder sub\)"
    if case == "no weights":
        (out / "model.safetensors").unlink()
        return src, out, r"\(it has no model weights\)"
    if case == "link":
        link = tmp_path / "link"
        link.symlink_to(out)
        return src, link, "is a link to"
    raise ValueError(case)


REFUSALS = [
    "parent",
    "grandparent",
    "source",
    "is a file",
    "parent is a file",
    "foreign file",
    "subfolder",
    "no weights",
    "link",
]


@pytest.mark.parametrize("case", REFUSALS)
def test_force_refuses_what_is_not_a_previous_output(case, tmp_path, src, previous):
    source, out, message = _refusal(case, tmp_path, src, previous)
    before = snapshot(tmp_path)
    with pytest.raises(ConvertError, match=message):
        convert(source, out, force=True, progress=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", REFUSALS)
def test_cli_refusals_are_one_line_with_exit_code_2(case, tmp_path, src, previous, capsys):
    source, out, _ = _refusal(case, tmp_path, src, previous)
    before = snapshot(tmp_path)
    assert main(["convert", "--hf-path", str(source), "--mlx-path", str(out), "--force"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx-compact convert: error:"), lines
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["single", "sharded", "empty"])
def test_force_replaces_a_previous_output(layout, tmp_path, src, previous):
    out = tmp_path / "out"
    if layout == "empty":
        out.mkdir()
    else:
        shutil.copytree(previous, out)
    if layout == "sharded":
        (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    convert(src, out, force=True, dtype="float32", progress=False)
    assert {w.dtype for w in mx.load(str(out / "model.safetensors")).values()} == {mx.float32}
    assert not (out / "model-00001-of-00001.safetensors").exists() and not (out / conv.MARKER).exists()
    assert hidden(tmp_path) == []


def test_force_refuses_an_output_changed_during_the_conversion(tmp_path, src, previous, monkeypatch):
    out = Path(shutil.copytree(previous, tmp_path / "out"))
    real = conv.save_weights

    def save_then_meddle(*args, **kwargs):
        real(*args, **kwargs)
        (out / "notes.md").write_text("mine")

    monkeypatch.setattr(conv, "save_weights", save_then_meddle)
    with pytest.raises(ConvertError, match=r"\(it holds notes.md\)"):
        convert(src, out, force=True, progress=False)
    assert snapshot(out) == {**snapshot(previous), "notes.md": ("file", b"mine")}
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------- sidecars


@pytest.fixture
def own_checks(monkeypatch):
    """Skip the loader's own file checks in `resolve`, so that the converter's are what is tested."""
    monkeypatch.setattr(conv, "resolve", Path)


@pytest.mark.parametrize("relative", [False, True])
def test_sidecar_linking_outside_the_checkpoint_is_refused(relative, tmp_path, src, own_checks):
    (tmp_path / "secret.txt").write_text("top secret")
    link = src / "special_tokens_map.json"
    link.unlink(missing_ok=True)
    link.symlink_to("../secret.txt" if relative else tmp_path / "secret.txt")
    with pytest.raises(ConvertError, match="special_tokens_map.json is a link to .*secret.txt, outside the checkpoint"):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt", "src"]


def test_hub_snapshot_converts(tmp_path, src):
    """A hub cache snapshot's files are links into ../../blobs/ (read-only there); the copies are plain files."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        blob.chmod(0o444)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    out = convert(snap, tmp_path / "out", progress=False)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        copy = out / name
        assert not copy.is_symlink() and copy.read_bytes() == (src / name).read_bytes()
        assert copy.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (out / "model.safetensors").exists() and not (out / conv.MARKER).exists()


def test_fifo_sidecar_is_refused_without_blocking(tmp_path, src, own_checks):
    fifo = src / "special_tokens_map.json"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    result = {}

    def run():  # in a thread (no signal handlers there), so that a regression fails instead of hanging
        try:
            convert(src, tmp_path / "out", progress=False)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(60)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # unblock the reader
        pytest.fail("convert blocked on a FIFO sidecar")
    assert time.monotonic() - start < 30
    assert isinstance(result.get("error"), ConvertError), result
    assert "special_tokens_map.json is not a regular file" in str(result["error"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------- signals and leftovers

# `mlx-compact` whose save_weights waits after writing, so a signal lands mid-conversion
SLOW_CLI = """
import importlib, sys, time
from mlx_compact.cli import main
conv = importlib.import_module("mlx_compact.convert.convert")
real = conv.save_weights
def save_then_wait(*args, **kwargs):
    real(*args, **kwargs)
    print("saved", flush=True)
    time.sleep(60)
conv.save_weights = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def _killed_mid_conversion(src, out, sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", "--hf-path", str(src), "--mlx-path", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    watchdog = threading.Timer(120, proc.kill)  # a regression fails instead of hanging
    watchdog.start()
    try:
        assert proc.stdout.readline() == "saved\n", proc.communicate(timeout=60)
        assert [p for p in hidden(out.parent) if p.endswith(".tmp")]  # the partial output is there
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    return proc, err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up(sig, tmp_path, src):
    out = tmp_path / "out"
    proc, err = _killed_mid_conversion(src, out, getattr(signal, sig))
    assert proc.returncode not in (0, -getattr(signal, sig)), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_sigterm_handler_is_restored(tmp_path, src, monkeypatch):
    class Unhandled(Exception):
        pass

    def sentinel(signum, frame):
        raise Unhandled

    real = conv.save_weights

    def save_then_terminate(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(conv, "save_weights", save_then_terminate)
    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(src, tmp_path / "out", progress=False)
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_kill_9_leftover_is_removed_by_the_next_conversion(tmp_path, src):
    out = tmp_path / "out"
    proc, _ = _killed_mid_conversion(src, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (left,) = hidden(tmp_path)
    assert json.loads((tmp_path / left / conv.MARKER).read_text())["pid"] == proc.pid
    convert(src, out, progress=False)
    assert hidden(tmp_path) == [] and (out / "model.safetensors").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_provably_stale_temp_folders_are_removed(tmp_path, src, capsys):
    out, dead, host = tmp_path / "out", _dead_pid(), socket.gethostname()
    leftovers = {  # name: (marker, extra file), whether the next conversion removes it
        ".out.dead0001.tmp": ({"pid": dead, "host": host}, None, True),
        ".out.dead0002.old": ({"pid": dead, "host": host}, None, True),
        ".out.live0001.tmp": ({"pid": os.getpid(), "host": host}, None, False),
        ".out.foreign1.tmp": ({"pid": dead, "host": host}, "notes.md", False),
        ".out.elsewhere.tmp": ({"pid": dead, "host": host + "-other"}, None, False),
        ".out.nomarker.tmp": (None, None, False),
    }
    for name, (marker, extra, _) in leftovers.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        if marker is not None:
            (tmp_path / name / conv.MARKER).write_text(json.dumps(marker))
        if extra:
            (tmp_path / name / extra).write_text("mine")
    convert(src, out, progress=False)
    kept = sorted(name for name, (*_, removed) in leftovers.items() if not removed)
    assert hidden(tmp_path) == kept
    err = capsys.readouterr().err
    assert all(name in err for name in kept) and "dead0001" not in err


# ---------------------------------------------------------------- write errors


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, src, monkeypatch):
    real = mx.save_safetensors

    def save_then_fail(path, *args, **kwargs):
        real(path, *args, **kwargs)  # half the output is on disk when the disk fills up
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", save_then_fail)
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(ConvertError, match=r"cannot write the output \S*out: No space left on device"):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_os_errors_while_writing_are_one_line(tmp_path, src, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(conv, "save_config", fail)
    assert main(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot write the output" in lines[0] and os.strerror(errno.EIO) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
