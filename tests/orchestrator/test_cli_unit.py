"""The `unimo` command line's own surface: --version, shipped configs by name, -v after a subcommand,
`job`."""

import pytest
import yaml

from orchestrator import cli
from trainer import shipped_configs


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("unimo ") and out.split()[1][0].isdigit()


def test_config_list_names_every_shipped_config(capsys):
    assert cli.main(["config", "list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"base", "debug", "large", "small", "xl"} <= set(names) and names == sorted(names)


@pytest.mark.parametrize("name", ["debug", "debug.yaml", "configs/debug.yaml"])
def test_config_show_takes_a_name_from_any_folder(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert cli.main(["config", "show", name, "train.log_every=7", "-v"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["log_every"] == 7 and shown["model"]["flavor"] == "debug"


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "debug.yaml").write_text("train:\n  log_every: 3\n")
    monkeypatch.chdir(tmp_path)
    assert shipped_configs.resolve("debug.yaml").resolve() == (tmp_path / "debug.yaml").resolve()
    assert shipped_configs.resolve("debug") == shipped_configs.shipped_dir() / "debug.yaml"
    assert shipped_configs.shipped_path("other/debug.yaml") is None  # another folder is a path, not a name


def test_unknown_config_names_the_shipped_ones(capsys):
    assert cli.main(["config", "show", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "debug" in err and "unimo config list" in err


def test_verbose_after_the_subcommand_and_for_passthrough_commands():
    parser = cli.build_parser()
    assert cli.parse_args(parser, ["config", "show", "debug", "-v"]).verbose is True
    assert cli.parse_args(parser, ["-v", "model", "info", "debug"]).verbose is True
    assert getattr(cli.parse_args(parser, ["model", "info", "debug"]), "verbose", False) is False
    args = cli.parse_args(parser, ["jobs", "list", "-v", "--address", "http://h:8265"])
    assert args.verbose is True and args.args == ["list", "--address", "http://h:8265"]


def test_job_is_an_alias_of_jobs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["job", "--help"])
    assert "usage: unimo jobs" in capsys.readouterr().out
