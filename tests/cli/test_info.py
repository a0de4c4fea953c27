"""`medembed info STORE` through the installed entry point: one column of keys with their values aligned (the
fingerprint's longer keys in a column of their own), and splits in the protocol's order, then any others."""

from medembed.store import StoreWriter, make_fingerprint
from tests.cli.test_entry_point import run_cli
from tests.test_store import DIM, rows

KEY_COLUMN = 13  # values start here: "verify", "checksum", ... and the fingerprint block


def test_info_aligns_every_key_and_lists_splits_train_val_test_then_others(tmp_path):
    ids, embeddings, columns = rows(0, 12)
    columns["split"] = ["test", "external", "val", "train", "(none)", "test", "val", "train", "external", "test", "val", "train"]
    fingerprint = make_fingerprint(encoder="test", model_id="tiny", embedding_kind="pooler_output", preprocess_hash="abc",
                                   dtype="float16", weights_sha256="f00d")
    with StoreWriter(tmp_path / "s.h5", dim=DIM, fingerprint=fingerprint) as writer:
        writer.append(ids, embeddings, columns)
    done = run_cli("info", tmp_path / "s.h5", "--verify")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    table = lines.index(next(line for line in lines if line.split()[:2] == ["split", "rows"]))
    keyed = lines[:table]
    for line in keyed:  # every value starts in one column, whatever its key ("dim, dtype" has a space in it)
        assert line[KEY_COLUMN - 1] == " " and line[KEY_COLUMN] != " ", line
    assert lines[-1] == "verify       OK" and lines[-1][KEY_COLUMN:] == "OK"
    start = next(k for k, line in enumerate(keyed) if line.startswith("fingerprint "))
    block = keyed[start:start + len(fingerprint)]
    assert sorted(line[KEY_COLUMN:].split()[0] for line in block) == sorted(fingerprint)
    assert len({line.rindex(" ") + 1 for line in block}) == 1, block  # fingerprint values in one column too
    assert next(line for line in block if "weights_sha256" in line).split()[-1] == "f00d"
    assert next(line for line in block if "levels" in line).split()[-1] == "-"  # an empty value is shown as such
    splits = [line.split()[0] for line in lines[table + 1:-1]]
    assert splits == ["train", "val", "test", "external", "(none)"], done.stdout
    widths = {len(line) for line in lines[table:-1]}
    assert len(widths) == 1, lines[table:-1]  # the table's columns line up under a longer split name too
