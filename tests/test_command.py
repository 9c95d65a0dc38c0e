"""depthdif_hpc.command: bad input is one line naming the culprit and exit status 2; bugs keep
their traceback. Every command that reads the user's files is checked with a path that is not
there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from depthdif_hpc.command import command

ROOT = Path(__file__).resolve().parents[1]


class Refused(RuntimeError):
    pass


@command(Refused)
def _main(what: str) -> int | None:
    if what == "value":
        raise ValueError("dataset.store: 'nowhere.zarr' does not exist")
    if what == "missing":
        raise FileNotFoundError("checkpoint not found: /nowhere")
    if what == "also":
        raise Refused("store was started from different sources")
    if what == "bug":
        raise KeyError("a bug")
    if what == "none":
        return None
    return 7


@pytest.mark.parametrize(("what", "message"), [
    ("value", "dataset.store: 'nowhere.zarr' does not exist"),
    ("missing", "checkpoint not found: /nowhere"),
    ("also", "store was started from different sources"),
])
def test_input_errors_are_one_line_and_exit_2(capsys, what, message):
    assert _main(what) == 2
    err = capsys.readouterr().err
    assert err == f"python -m {__name__}: error: {message}\n"


def test_depthdif_traceback_lets_input_errors_through(monkeypatch):
    monkeypatch.setenv("DEPTHDIF_TRACEBACK", "1")
    with pytest.raises(ValueError, match="nowhere.zarr"):
        _main("value")


def test_other_errors_keep_their_traceback_and_codes_pass_through(capsys):
    with pytest.raises(KeyError, match="a bug"):
        _main("bug")
    assert _main("none") == 0 and _main("code") == 7
    assert capsys.readouterr().err == ""


# (module, argv) with an input M that does not exist and outputs under O; {M} and {O} are filled in.
COMMANDS = [
    ("depthdif_hpc.inference.predict", "--checkpoint {M} --store {M} --out {O}/p.zarr", "{M}"),
    ("depthdif_hpc.inference.evaluate", "--pred {M}/p.zarr --store {M} --report {O}/r", "{M}"),
    ("depthdif_hpc.inference.evaluate_ae", "--checkpoint {M} --store {M} --report {O}/r", "{M}"),
    ("depthdif_hpc.inference.reconstruct",
     "--checkpoint {M} --date 2018-01-03 --region=-40,-20,30,50 --ostia x --en4 y --out {O}/r.nc", "{M}"),
    ("depthdif_hpc.checkpoint.export", "{M} --out {O}/w", "{M}"),
    ("depthdif_hpc.data.build",
     "--glorys {M}/*.nc --ostia {M}/*.nc --en4 {M}/*.nc --out {O}/s.zarr", "{M}/*.nc"),
]


@pytest.mark.parametrize(("module", "argv", "culprit"), COMMANDS, ids=[c[0].rsplit(".", 1)[1] for c in COMMANDS])
def test_each_command_names_a_missing_input_and_writes_nothing(capsys, tmp_path, module, argv, culprit):
    fill = {"M": str(tmp_path / "missing"), "O": str(tmp_path / "out")}
    main = __import__(module, fromlist=["main"]).main
    assert main(argv.format(**fill).split()) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"python -m {module}: error: ") and culprit.format(**fill) in lines[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists(), sorted((tmp_path / "out").rglob("*"))


def test_the_prefix_is_the_module_run_by_python_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "depthdif_hpc.checkpoint.export", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "w")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("python -m depthdif_hpc.checkpoint.export: error: ")
    assert "Traceback" not in r.stderr
