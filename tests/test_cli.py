"""The console script explains itself and fails clearly on bad options."""

import subprocess
import sys

from jobs.cli import main


def _cxr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    r = _cxr("--help")
    assert r.returncode == 0 and "prepare-data" in r.stdout and "not for diagnosis" in r.stdout


def test_prepare_data_help_lists_options():
    r = _cxr("prepare-data", "--help")
    assert r.returncode == 0
    for flag in ("--data-root", "--out", "--csv", "--images", "--seed", "--val-fraction"):
        assert flag in r.stdout


def test_unknown_config_key_lists_valid_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: 3\n")
    try:
        main(["prepare-data", "--config", str(bad)])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['seeds']" in err and "'seed'" in err


def test_bad_value_type_is_reported(capsys):
    try:
        main(["prepare-data", "--seed", "abc"])
    except SystemExit as e:
        assert e.code == 2
    assert "seed: expected int" in capsys.readouterr().err


def test_missing_data_root_exits_2(tmp_path, capsys):
    assert main(["prepare-data", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "has no kermany/ folder" in capsys.readouterr().err


def test_a_numeric_option_out_of_range_is_one_line(capsys):
    for argv, flag in ((["score", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                       (["score", "--limit", "-1"], "--limit must be >= 1, got -1"),
                       (["crossval", "--transfer-specificity", "1.5"], "--transfer-specificity must be <= 1")):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and "\n" not in err, err


def test_version_and_a_misspelt_flag_get_the_commands_own_usage_and_a_suggestion():
    from cxr import __version__

    r = _cxr("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"cxr {__version__}"
    r = _cxr("score", "--inptu", "x")
    assert r.returncode == 2 and "usage: cxr score" in r.stderr and "did you mean --input?" in r.stderr
    r = _cxr("promote", "--rollbak")
    assert r.returncode == 2 and "usage: cxr promote" in r.stderr and "did you mean --rollback?" in r.stderr
    r = _cxr("scroe", "--input", "x")
    assert r.returncode == 2 and "did you mean score?" in r.stderr
