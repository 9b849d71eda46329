"""Unit tests of checkpoint manifests, torn-checkpoint detection, retention and config mismatch messages."""

import json

import pytest

from trainer import checkpoint as ckpt


def make_checkpoint(root, step, files=None):
    d = root / ckpt.step_dir_name(step)
    (d / "ds").mkdir(parents=True)
    files = files or {"ds/zero_pp_rank_0_model_states.pt": b"abc" * 100, "trainer_state.json": b"{}"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    ckpt.write_manifest(d, ckpt.describe_files(d), step)
    return d


def test_valid_checkpoint_verifies(tmp_path):
    d = make_checkpoint(tmp_path, 10)
    manifest = ckpt.verify(d)
    assert manifest["step"] == 10 and "ds/zero_pp_rank_0_model_states.pt" in manifest["files"]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
    (lambda d: (d / "ds/zero_pp_rank_0_model_states.pt").unlink(), "is missing"),
    (lambda d: (d / "ds/zero_pp_rank_0_model_states.pt").write_bytes(b"abc" * 99), "has size"),
    (lambda d: (d / "ds/zero_pp_rank_0_model_states.pt").write_bytes(b"abd" * 100), "fails its checksum"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable manifest.json"),
])
def test_torn_checkpoints_are_named(tmp_path, damage, message):
    d = make_checkpoint(tmp_path, 10)
    damage(d)
    with pytest.raises(ckpt.TornCheckpoint, match=message) as err:
        ckpt.verify(d)
    assert str(d) in str(err.value)


def test_newest_valid_skips_torn_with_a_warning(tmp_path, caplog):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    (newest / "manifest.json").unlink()
    found = ckpt.newest_valid(tmp_path)
    assert found.step == 10
    assert "step_00000020" in caplog.text and "skipping torn checkpoint" in caplog.text


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        make_checkpoint(tmp_path, step)
    in_progress = tmp_path / ckpt.step_dir_name(70)
    in_progress.mkdir()  # no manifest yet: an upload still running is never pruned
    removed = ckpt.prune(tmp_path, keep_last=2, keep_every=20)
    left = sorted(c.step for c in ckpt.list_step_dirs(tmp_path))
    assert left == [20, 40, 50, 60, 70]
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000030"]


def rank_1_still_uploading(root, step):
    """Step ``step`` as rank 0 left it: its files and the manifest (which lists rank 1's shard too) are there,
    rank 1's shard is not yet: its upload is still running, or failed."""
    d = make_checkpoint(root, step, {"ds/zero_pp_rank_0_optim_states.pt": b"r0" * 100,
                                     "ds/zero_pp_rank_1_optim_states.pt": b"r1" * 100})
    (d / "ds" / "zero_pp_rank_1_optim_states.pt").unlink()
    return d


def test_retention_keeps_a_whole_checkpoint_while_another_rank_still_uploads_the_newer(tmp_path):
    """Saving step 12 (handed to the background upload) while rank 1 still uploads step 8: retention used to
    count step 8 as complete by its manifest and delete step 4, the last one whose every file is there; when
    rank 1's upload of 8 then failed, the run had nothing to resume from."""
    make_checkpoint(tmp_path, 4)
    rank_1_still_uploading(tmp_path, 8)
    assert ckpt.files_present(tmp_path / ckpt.step_dir_name(4))
    assert not ckpt.files_present(tmp_path / ckpt.step_dir_name(8))
    assert ckpt.prune(tmp_path, keep_last=2, keep_every=0, pending=12) == []
    assert ckpt.newest_valid(tmp_path).step == 4
    make_checkpoint(tmp_path, 16)  # once a newer one is whole, the older ones go as retention says
    assert sorted(p.name for p in ckpt.prune(tmp_path, keep_last=1, keep_every=0)) == ["step_00000004",
                                                                                         "step_00000008"]


def test_config_mismatch_names_fields():
    saved = {"text": {"layers": 2, "dim": 64}, "flavor": "debug"}
    now = {"text": {"layers": 4, "dim": 64}, "flavor": "debug"}
    assert ckpt.config_mismatch(saved, now, "model.") == ["model.text.layers: checkpoint has 2, config has 4"]


def test_state_written_atomically(tmp_path):
    ckpt.write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_step_of_reads_the_folder_name(tmp_path):
    assert ckpt.step_of(tmp_path / "step_00000120") == 120
    assert ckpt.step_of(tmp_path / "checkpoint_2026") == -1


def test_schema_versions_old_migrates_newer_refused(tmp_path):
    d = make_checkpoint(tmp_path, 10)
    assert json.loads((d / "manifest.json").read_text())["schema"] == ckpt.SCHEMA_VERSION
    old = {"step": 10, "world_size": 2}  # schema 0: written before versions (and without "extra")
    (d / "trainer_state.json").write_text(json.dumps(old))
    state = ckpt.read_state(d)
    assert state["schema"] == ckpt.SCHEMA_VERSION and state["extra"] == {} and state["step"] == 10

    (d / "trainer_state.json").write_text(json.dumps({**old, "schema": ckpt.SCHEMA_VERSION + 1}))
    with pytest.raises(ckpt.NewerCheckpoint,
                       match=f"has checkpoint schema {ckpt.SCHEMA_VERSION + 1}, but this unimo reads schema "
                             f"{ckpt.SCHEMA_VERSION} and older; resume or export it with a newer unimo") \
            as err:
        ckpt.read_state(d)
    assert str(d / "trainer_state.json") in str(err.value)
    manifest = json.loads((d / "manifest.json").read_text())
    ckpt.write_json_atomic(d / "manifest.json", {**manifest, "schema": ckpt.SCHEMA_VERSION + 1})
    with pytest.raises(ckpt.NewerCheckpoint, match="this unimo reads schema"):
        ckpt.verify(d)  # refused, not skipped as torn


def test_config_fields_added_later_at_their_default_are_no_mismatch():
    saved = {"text": {"layers": 2}, "flavor": "debug"}
    defaults = {"text": {"layers": 2, "rope": False}, "flavor": "debug", "new_block": {"size": 4}}
    same = {"text": {"layers": 2, "rope": False}, "flavor": "debug", "new_block": {"size": 4}}
    assert ckpt.config_mismatch(saved, same, "model.", defaults) == []
    changed = {"text": {"layers": 2, "rope": True}, "flavor": "debug", "new_block": {"size": 4}}
    assert ckpt.config_mismatch(saved, changed, "model.", defaults) == \
        ["model.text.rope: checkpoint has None, config has True"]
