"""benchmarks/reproduce.py's command line refuses what cannot be right, in one line naming the option or file and
the fix: an --out that holds another run, a folder another run is writing (its lock), out-of-range options, an
unusable --out, unreadable or incomplete checkpoints, a corrupt config.json; --help states every default once."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import reproduce
from benchmarks.repro import cli, folder

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "synthetic", "--widths", "4", "8", "--batch-size", "16", "--micro-batch-size", "4",
        "--eval-every", "2", "--eval-size", "0", "--test-size", "0", "--bn-recalibrate", "2", "--no-progress",
        "--threads", "1", "--steps", "2"]


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` and its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _one_line(message: object) -> str:
    text = str(message)
    assert text and "\n" not in text.strip(), text
    return text


def _torchrun(args: list[str], log: Path) -> tuple[int, str]:
    """reproduce.py under torchrun, 2 CPU ranks (gloo): its exit status and output. A hang fails the test: the
    launcher and its ranks (started in a new process group) are ended once the output has stayed silent for 60 s
    of polling."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(reproduce.__file__)), *args]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT)
        size, silent_polls = -1, 0
        while proc.poll() is None:
            time.sleep(1)
            silent_polls = silent_polls + 1 if log.stat().st_size == size else 0
            size = log.stat().st_size
            if silent_polls > 60:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"torchrun printed nothing for 60 s (a hang):\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


# -- one folder, one configuration ----------------------------------------------------------------------
def test_an_out_holding_a_run_is_refused_without_resume_and_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    reproduce.main([*TINY, "--methods", "SB", "LB", "--out", str(out)])
    before = _snapshot(out)
    with pytest.raises(SystemExit) as refused:
        reproduce.main([*TINY, "--methods", "GN", "--penalty", "GN=0.5", "--steps", "4", "--out", str(out)])
    text = _one_line(refused.value.code)
    assert str(out) in text and "--resume" in text and "new --out" in text and "config.json" in text
    assert _snapshot(out) == before  # nothing written, no lock left behind
    reproduce.main(["--resume", "--out", str(out), "--no-progress"])  # the fix it names works
    assert [r["method"] for r in json.loads((out / "runs.json").read_text())] == ["SB", "LB"]


def test_any_file_makes_an_out_used_but_an_empty_folder_is_new(tmp_path):
    used, empty = tmp_path / "used", tmp_path / "empty"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt"):
        reproduce.main([*TINY, "--methods", "LB", "--out", str(used)])
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]
    empty.mkdir()
    reproduce.main([*TINY, "--methods", "LB", "--out", str(empty)])
    assert (empty / "runs.json").exists() and not (empty / folder.LOCK_NAME).exists()


# -- the lock --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_a_folder_another_run_holds_is_refused_naming_the_holder(tmp_path, resume):
    out = tmp_path / "out"
    if resume:
        reproduce.main([*TINY, "--methods", "LB", "--out", str(out)])
    with folder.lock_folder(out) as held:
        before = _snapshot(out)
        argv = ["--resume", "--out", str(out), "--no-progress"] if resume else [*TINY, "--out", str(out)]
        with pytest.raises(SystemExit) as refused:
            reproduce.main(argv)
        text = _one_line(refused.value.code)
        assert f"--out {out} is in use by another run" in text
        assert f"pid {os.getpid()} on {socket.gethostname()}" in text
        assert _snapshot(out) == before and held.fd is not None  # the holder's lock and files untouched
    assert not (out / folder.LOCK_NAME).exists()


def test_the_lock_is_held_for_the_whole_run_with_jobs_and_released_at_exit(tmp_path, monkeypatch):
    """A second run started while a --jobs 2 run works in the folder is refused; the first completes intact."""
    out = tmp_path / "out"
    run_all = cli.run_all
    seen = {}

    def run_all_while_a_second_run_tries(*args, **kwargs):
        seen["holder"] = json.loads((out / folder.LOCK_NAME).read_text())
        with pytest.raises(SystemExit) as second:
            reproduce.main([*TINY, "--methods", "LB", "--out", str(out)])
        seen["second"] = str(second.value.code)
        return run_all(*args, **kwargs)

    monkeypatch.setattr(cli, "run_all", run_all_while_a_second_run_tries)
    reproduce.main([*TINY, "--methods", "SB", "LB", "--jobs", "2", "--out", str(out)])
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["host"] == socket.gethostname()
    assert "in use by another run" in seen["second"]
    assert [r["method"] for r in json.loads((out / "runs.json").read_text())] == ["SB", "LB"]
    assert json.loads((out / "config.json").read_text())["config"]["methods"] == ["SB", "LB"]
    assert not (out / folder.LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(reproduce.Interrupted):
        reproduce.main([*TINY, "--methods", "LB", "--out", str(out), "--interrupt-after", "1"])
    assert not (out / folder.LOCK_NAME).exists()
    reproduce.main(["--resume", "--out", str(out), "--no-progress"])
    assert (out / "runs.json").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capfd):
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from pathlib import Path; "
         "from benchmarks.repro.folder import lock_folder; lock_folder(Path(sys.argv[1])); "
         "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)", str(out)],
        cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    pid = int(killed.stdout)
    assert json.loads((out / folder.LOCK_NAME).read_text())["pid"] == pid  # what a killed run leaves
    reproduce.main([*TINY, "--methods", "LB", "--out", str(out)])
    assert f"taking over the lock left by pid {pid} on {socket.gethostname()}" in capfd.readouterr().err
    assert (out / "runs.json").exists() and not (out / folder.LOCK_NAME).exists()


def test_a_run_never_removes_a_lock_file_that_is_not_its_own(tmp_path):
    """Someone deletes a running run's lock file and a second run locks the folder: the first, at its end,
    leaves the second's lock in place."""
    out = tmp_path / "out"
    first = folder.lock_folder(out)
    (out / folder.LOCK_NAME).unlink()
    with folder.lock_folder(out) as second:
        first.release()
        assert json.loads((out / folder.LOCK_NAME).read_text())["pid"] == os.getpid() and second.fd is not None
        with pytest.raises(SystemExit, match="in use by another run"):
            folder.lock_folder(out)
    assert list(out.iterdir()) == []  # each lock gone with its run


def test_without_file_locks_the_run_goes_on_and_says_so(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(folder.fcntl, "flock", no_locks)
    with folder.lock_folder(tmp_path / "out"):
        assert json.loads((tmp_path / "out" / folder.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "does not support file locks (No locks available)" in capsys.readouterr().err


def test_a_refused_run_removes_the_folder_it_created(tmp_path, monkeypatch):
    """Data that cannot be found stops the run after the folder was locked: the new folder goes with the lock."""
    from benchmarks import data as data_lib

    monkeypatch.delenv("REGOPT_DATA", raising=False)
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_MNIST", tmp_path / "none")
    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit, match="Fashion-MNIST"):
        reproduce.main(["--preset", "fmnist", "--data-root", str(tmp_path / "root"), "--out", str(out),
                        "--no-progress"])
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["holds a run", "locked"])
def test_torchrun_refuses_on_every_rank_without_waiting(tmp_path, case):
    """Rank 0 alone checks and locks the folder; its refusal reaches the other rank, which exits with it (rather
    than waiting for rank 0 forever, or being ended by the launcher)."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [*TINY, "--methods", "LB", "--out", str(out)]
    if case == "holds a run":
        (out / "config.json").write_text("{}")
        code, output = _torchrun(argv, tmp_path / "torchrun.log")
        expected = f"--out {out} already holds files (config.json)"
    else:
        with folder.lock_folder(out):
            code, output = _torchrun(argv, tmp_path / "torchrun.log")
        expected = f"--out {out} is in use by another run (pid {os.getpid()}"
    assert code != 0 and output.count(expected) == 2, output[-3000:]  # once per rank
    assert not (out / "runs.json").exists()


# -- options --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [
    ("--penalty", "GN=-1"), ("--penalty", "GN=nan"), ("--penalty", "inf"), ("--lr", "-0.1"), ("--lr", "SB=nan"),
    ("--steps", "0"), ("--batch-size", "-16"), ("--micro-batch-size", "0"), ("--seeds", "0"), ("--eval-every", "0"),
    ("--checkpoint-every", "0"), ("--jobs", "0"), ("--time-budget", "0"), ("--time-budget", "nan"),
    ("--momentum", "-0.9"), ("--weight-decay", "nan"), ("--widths", "0"), ("--threads", "0"),
    ("--eval-size", "-1"), ("--test-size", "-1"), ("--bn-recalibrate", "-1"), ("--first-seed", "-1"),
    ("--train-size", "0"), ("--heldout-size", "0"), ("--steps", "two"),
])
def test_out_of_range_options_are_one_line_argparse_errors(tmp_path, capsys, option, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        reproduce.main([*TINY, "--methods", "GN", option, value, "--out", str(out)])
    assert refused.value.code == 2
    err = _one_line(capsys.readouterr().err)
    assert f"error: argument {option}" in err and repr(value) in err and "expected" in err
    assert not out.exists()


@pytest.mark.parametrize("make", ["file", "under a file"])
def test_an_out_that_cannot_be_a_folder_is_one_line_naming_it(tmp_path, make):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile if make == "file" else afile / "out"
    with pytest.raises(SystemExit) as refused:
        reproduce.main([*TINY, "--methods", "LB", "--out", str(out)])
    text = _one_line(refused.value.code)
    assert f"--out {out}" in text and ("choose a folder" in text or "choose another --out" in text)
    assert afile.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_out_that_is_not_writable_is_one_line_naming_it(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as refused:
            reproduce.main([*TINY, "--methods", "LB", "--out", str(parent / "out")])
    finally:
        parent.chmod(0o700)
    text = _one_line(refused.value.code)
    assert f"--out {parent / 'out'}" in text and "Permission denied" in text


def test_help_names_every_default_once_and_every_option_has_help():
    parser = reproduce.make_parser()
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == "==SUPPRESS==":
            continue
        assert action.help, action.option_strings
        shown = formatter._expand_help(action)  # the text --help prints for it
        assert shown.count("default") <= 1, (action.option_strings, shown)
    assert "(default: quick)" in text and "(default: 1)" in text  # real defaults are still shown


# -- checkpoints and config.json ------------------------------------------------------------------------
def _cut_run(tmp_path) -> Path:
    """A folder whose LB run stopped after a partial checkpoint (step 2 of 4) and whose SB run finished."""
    out = tmp_path / "cut"
    with pytest.raises(reproduce.Interrupted):
        reproduce.main([*TINY, "--steps", "4", "--checkpoint-every", "2", "--methods", "SB", "LB", "--out", str(out),
                        "--interrupt-after", "7"])
    ck = torch.load(out / "checkpoints" / "seed0_LB.pt", weights_only=True)
    assert not ck.get("done") and ck["step"] == 2
    return out


def _spoil(path: Path, how: str) -> None:
    ck = torch.load(path, weights_only=True)
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif how == "not a checkpoint":
        path.write_bytes(b"hello, not a checkpoint")
    elif how == "a list":
        torch.save([1, 2], path)
    elif how == "missing keys":
        torch.save({k: v for k, v in ck.items() if k not in ("optimizer", "sampler")}, path)
    elif how == "another model":
        ck["model"] = {k: v for k, v in ck["model"].items() if "weight" not in k}
        torch.save(ck, path)
    elif how == "final missing keys":
        torch.save({"done": True, "rows": ck["rows"]}, path)


@pytest.mark.parametrize("how, which, says", [
    ("empty", "LB", "empty, truncated or not a checkpoint (EOFError)"),
    ("truncated", "LB", "empty, truncated or not a checkpoint (RuntimeError"),
    ("not a checkpoint", "LB", "empty, truncated or not a checkpoint"),
    ("a list", "LB", "incomplete checkpoint (no model"),
    ("missing keys", "LB", "incomplete checkpoint (no optimizer, sampler)"),
    ("another model", "LB", "does not fit this run (RuntimeError"),
    ("final missing keys", "SB", "incomplete checkpoint (no result)"),
])
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_an_unusable_checkpoint_is_one_line_naming_the_file_and_the_fix(tmp_path, how, which, says, jobs):
    out = _cut_run(tmp_path)
    path = out / "checkpoints" / f"seed0_{which}.pt"
    _spoil(path, how)
    before = _snapshot(out)
    argv = ["--resume", "--out", str(out), "--no-progress", "--jobs", jobs]
    with pytest.raises(reproduce.CheckpointError) as raised:  # typed for callers of main
        reproduce.main(argv)
    text = _one_line(raised.value)
    assert str(path) in text and says in text and "delete it to rerun that run from scratch" in text
    with pytest.raises(SystemExit) as refused:  # the script: one line, exit status 1
        reproduce.script_main(argv)
    assert _one_line(refused.value.code) == f"error: {text}"
    assert _snapshot(out) == before
    path.unlink()  # the fix it names works
    reproduce.main(argv)
    assert [r["method"] for r in json.loads((out / "runs.json").read_text())] == ["SB", "LB"]


@pytest.mark.parametrize("content, says", [
    ("", "JSONDecodeError"), ('{"config": {"preset": "quick", "meth', "JSONDecodeError"), ("[1, 2]", "no 'config'"),
    ('{"environment": {}}', "no 'config'"), ('{"config": {"preset": "quick"}}', "has no 'methods' entry"),
    (b"\xff\xfe\x00", "UnicodeDecodeError"),
])
def test_a_corrupt_config_json_is_one_line_naming_it(tmp_path, content, says):
    out = tmp_path / "out"
    reproduce.main([*TINY, "--methods", "LB", "--out", str(out)])
    path = out / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(out)
    with pytest.raises(SystemExit) as refused:
        reproduce.main(["--resume", "--out", str(out), "--no-progress"])
    text = _one_line(refused.value.code)
    assert f"--resume: {path} is not a configuration this script wrote" in text and says in text
    assert "start a new --out" in text and _snapshot(out) == before
