"""pipelines.train.state_seal (issue 37): a checkpoint's pickled files are unpickled on resume only when this
machine's key sealed them with their present content."""

from __future__ import annotations

import json

import pytest

from pipelines.train.state_seal import UnsealedState, machine_key, seal, verify


def checkpoint(folder, rank: int = 0):
    (folder / "ds").mkdir(parents=True, exist_ok=True)
    (folder / "optimizer.pt").write_bytes(b"our optimizer state")
    (folder / f"rng{rank}.pt").write_bytes(b"rng")
    (folder / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"deepspeed's pickle")
    (folder / "train_state.json").write_text("{}")
    return folder


def test_what_this_run_sealed_resumes_and_anything_else_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAFORGE_STATE_KEY", raising=False)
    key = machine_key()
    assert key == machine_key() and len(key) == 64  # made once, then read back
    assert oct((tmp_path / "cache" / "state.key").stat().st_mode & 0o777) == "0o600"
    ck = tmp_path / "checkpoint_000001"
    for rank in (0, 1):  # each rank seals what it wrote; Ray Train puts both into one checkpoint folder
        seal(checkpoint(ck, rank), rank, key)
    verify(ck, key)

    planted = ck / "ds" / "evil.pt"  # a file someone with write access to the store added
    planted.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(UnsealedState, match=rf"{planted}: pickled state that this run did not write"):
        verify(ck, key)
    planted.unlink()

    original = (ck / "optimizer.pt").read_bytes()
    (ck / "optimizer.pt").write_bytes(b"changed")
    with pytest.raises(UnsealedState, match=rf"{ck / 'optimizer.pt'}: changed since this run wrote it"):
        verify(ck, key)
    (ck / "optimizer.pt").write_bytes(original)

    with pytest.raises(UnsealedState, match=r"seal0.json: this seal was not made with this machine's key"):
        verify(ck, "another machine's key")
    doc = json.loads((ck / "seal0.json").read_text())  # a forger lists the planted file without the key
    planted.write_bytes(b"x")
    doc["files"]["ds/evil.pt"] = __import__("hashlib").sha256(b"x").hexdigest()
    (ck / "seal0.json").write_text(json.dumps(doc))
    with pytest.raises(UnsealedState, match="not made with this machine's key"):
        verify(ck, key)
    monkeypatch.setenv("LORAFORGE_STATE_KEY", "shared-cluster-key")
    assert machine_key() == "shared-cluster-key"
