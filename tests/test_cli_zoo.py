"""hrnet list / info / flops, and the help texts of every subcommand."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hrnet.cli import build_parser, main


def run_json(capsys, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_flops_json_gives_the_exact_integers(capsys):
    out = run_json(capsys, "flops", "hrnet_w18")
    assert out == {"name": "hrnet-w18", "input_size": [224, 224], "params": 21_295_164, "flops": 4_330_397_932}


def test_flops_at_another_input_size(capsys):
    out = run_json(capsys, "flops", "hrnet-w18-small", "--input-size", "224", "448")
    assert out["input_size"] == [224, 448]
    assert out["flops"] == 2 * run_json(capsys, "flops", "hrnet-w18-small")["flops"]


def test_list_json_holds_the_seed_table(capsys):
    rows = {r["name"]: r for r in run_json(capsys, "list")}
    assert rows["hrnet-w64"]["params"] == 128_056_104 and rows["hrnet-w64"]["flops"] == 29_002_298_752
    assert rows["hrnet-w48-ssld"]["top1"] == 83.63 and rows["hrnet-w48-ssld"]["top5"] == 96.79
    assert rows["hrnet-w30"]["weights"] == "hrnet-w30_3rdparty_8xb32_in1k_20220120-8aa3832f.pth"


def test_list_text_rounds_like_the_seed(capsys):
    assert main(["list"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["hrnet-w18"][1:5] == ["21.30", "4.33", "76.75", "93.44"]
    assert lines["hrnet-w64"][1:3] == ["128.06", "29.00"]


def test_info_accepts_aliases(capsys):
    assert run_json(capsys, "info", "hrnet-w44_3rdparty_8xb32_in1k")["sha256_prefix"] == "35d07f73"


def test_unknown_model_is_a_one_line_error(capsys):
    assert main(["info", "hrnet-w81"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hrnet: error: unknown model 'hrnet-w81'") and err.count("\n") == 1


def test_every_subcommand_has_examples_json_and_quiet():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"list", "info", "flops"} <= set(sub.choices)
    for name, parser in sub.choices.items():
        assert "examples:" in parser.format_help(), name
        options = {o for a in parser._actions for o in a.option_strings}
        assert {"--json", "--quiet"} <= options, name


@pytest.mark.slow
def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "hrnet", "--help"], capture_output=True, text=True, check=True)
    assert "examples:" in out.stdout and "COMMAND" in out.stdout


@pytest.mark.parametrize("argv", [["flops"], ["info"]])
def test_missing_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
