"""The `unimo` command line's own surface: --version, shipped configs by name, -v after a subcommand,
`job`."""

from pathlib import Path

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


def test_data_preview_takes_a_shipped_name_as_train_does(tmp_path, monkeypatch, capsys):
    """`unimo data preview debug` reads the shipped debug config (its data under ./demo_out/data, as the demo
    writes it), wherever the name stands among the options; a file is read as it is."""
    from data_pipeline import write_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset("demo_out/data", n_pairs=20, n_text=20, n_images=20, n_eval=4,
                            samples_per_shard=10, image_size=16)
    shipped = str(shipped_configs.shipped_dir() / "debug.yaml")

    def preview(*argv: str) -> str:
        assert cli.main(["data", "preview", *argv]) == 0
        return capsys.readouterr().out

    by_path = preview(shipped, "--samples", "12", "--json")
    assert by_path.strip().startswith("{")
    assert preview("debug", "--samples", "12", "--json") == by_path
    assert preview("--samples", "12", "debug.yaml", "--json") == by_path
    # a name that is neither a file nor a shipped config is still read as a path, and its absence named
    assert cli.main(["data", "preview", "no-such-config", "--json"]) != 0
    assert "no-such-config" in capsys.readouterr().err


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


@pytest.mark.integration  # a fresh interpreter: this one has torch loaded already
def test_commands_that_train_nothing_import_no_torch_ray_or_mlflow():
    """`unimo --version`, `config show` and `jobs` are what users run between jobs: each took 1.6 CPU-s (up to
    9 s on a busy machine), nearly all of it importing torch, which the data pipeline's and the checkpoint
    package's eager exports and an unconditional import of the HF loader pulled into every command."""
    import subprocess
    import sys

    probe = ("import sys\nfrom orchestrator.cli import main\n"
             "for argv in (['--version'], ['config', 'show', 'debug'], ['jobs', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "import orchestrator.driver\n"  # what `unimo train` loads before it starts Ray
             "print('HEAVY', sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []", done.stdout[-500:]
