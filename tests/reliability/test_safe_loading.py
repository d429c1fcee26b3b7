"""No code execution from any file we read: a distributed checkpoint's `.metadata` and its non-tensor values are
unpickled by allow-list only. A planted payload runs nothing and is reported in one line (exit 2)."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.distributed.checkpoint_dcp import MODEL_PREFIX, consolidate
from megalodon_lm.distributed.safe_dcp import UnsafeCheckpointError, read_metadata, safe_load
from megalodon_lm.training.checkpoint import init_run_dir, load_checkpoint, save_checkpoint
from megalodon_lm.training.manifest import CorruptCheckpointError, write_manifest

from .helpers import one_error_line, run_cli

CONFIG = dict(num_layers=1, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, chunk_size=16,
              norm_num_groups=4)


class Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


class _Module(torch.nn.Module):
    """Keys as a distributed run saves them (the MegalodonLM under `model.`)."""

    def __init__(self, model: MegalodonLM) -> None:
        super().__init__()
        self.model = model


def _sharded_run(tmp_path: Path, manifest: bool) -> Path:
    """A run directory whose step_1 checkpoint is a single-process DCP save of model + AdamW state."""
    config = MegalodonConfig.from_preset("nano", **CONFIG)
    torch.manual_seed(0)
    model = MegalodonLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    run = init_run_dir(tmp_path / "run", config, {}, resume=False)
    ckpt = run / "checkpoints" / "step_00000001"
    model_sd, optim_sd = get_state_dict(_Module(model), optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
    (ckpt / "trainer_state.json").write_text('{"step": 1, "tokens": 4, "elapsed": 0.0}')
    if manifest:
        write_manifest(ckpt)
    return run


def _plant_metadata_payload(ckpt: Path, marker: Path) -> None:
    metadata = ckpt / "dcp" / ".metadata"
    real = pickle.loads(metadata.read_bytes())  # our own file: safe to unpickle here
    real.planner_data = Payload(marker)  # a field DCP does not check: any object fits
    metadata.write_bytes(pickle.dumps(real))


def test_real_metadata_and_optimizer_state_load(tmp_path):
    """The allow-list admits what DCP writes: a consolidation and a model + optimizer load succeed."""
    run = _sharded_run(tmp_path, manifest=True)
    ckpt = run / "checkpoints" / "step_00000001"
    metadata = read_metadata(ckpt / "dcp" / ".metadata")
    assert any(k.startswith("optim.param_groups") for k in metadata.state_dict_metadata)  # non-tensor values
    out = consolidate(ckpt)
    assert out.is_file()
    config = MegalodonConfig.from_preset("nano", **CONFIG)
    model = _Module(MegalodonLM(config))
    optimizer = torch.optim.AdamW(model.parameters())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        safe_load(state, ckpt / "dcp", no_dist=True)
    assert state["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)
    plain = MegalodonLM(config)
    plain.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in state["model"].items()})


def test_metadata_payload_runs_nothing_consolidate_one_line(tmp_path, capsys):
    run = _sharded_run(tmp_path, manifest=False)  # no manifest: the unpickler alone must stop it
    marker = tmp_path / "marker"
    _plant_metadata_payload(run / "checkpoints" / "step_00000001", marker)
    code, out, err = run_cli(["consolidate", str(run)], capsys)
    assert code == 2
    one_error_line(err, r"refusing to load .*\.metadata: it references pathlib\.Path\.write_text|"
                        r"refusing to load .*\.metadata: it references .*write_text")
    assert not marker.exists()
    assert not (run / "checkpoints" / "step_00000001" / "model.safetensors").exists()


def test_metadata_payload_with_a_manifest_fails_its_hash_first(tmp_path, capsys):
    run = _sharded_run(tmp_path, manifest=True)
    marker = tmp_path / "marker"
    _plant_metadata_payload(run / "checkpoints" / "step_00000001", marker)
    code, _, err = run_cli(["consolidate", str(run)], capsys)
    assert code == 2
    one_error_line(err, r"dcp/\.metadata (has .* bytes|does not match its SHA-256)")
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_any_other_global_is_refused_by_name(tmp_path, payload):
    module, name = payload.rsplit(".", 1)
    # A hand-written pickle: GLOBAL module name, then REDUCE with ("true",)
    data = f"c{module}\n{name}\n(Vtrue\ntR.".encode()
    path = tmp_path / ".metadata"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=rf"references {module}\.{name}"):
        read_metadata(path)


def test_truncated_metadata_is_one_line(tmp_path):
    run = _sharded_run(tmp_path, manifest=False)
    metadata = run / "checkpoints" / "step_00000001" / "dcp" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="is damaged") as info:
        read_metadata(metadata)
    assert "\n" not in str(info.value)


def test_shard_paths_must_stay_inside_the_checkpoint(tmp_path):
    run = _sharded_run(tmp_path, manifest=False)
    metadata = run / "checkpoints" / "step_00000001" / "dcp" / ".metadata"
    real = pickle.loads(metadata.read_bytes())
    for info in real.storage_data.values():
        info.relative_path = "../../../../etc/passwd"
    metadata.write_bytes(pickle.dumps(real))
    with pytest.raises(CorruptCheckpointError, match="not a file inside the checkpoint"):
        read_metadata(metadata)


def test_non_tensor_value_payload_is_refused(tmp_path):
    """A value DCP stores as bytes (torch.save) is loaded with weights_only=True: a payload there runs nothing."""
    marker = tmp_path / "marker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"extra": {"hook": Payload(marker)}, "w": torch.ones(2)}, checkpoint_id=str(tmp_path / "dcp"),
                 no_dist=True)
        state = {"extra": {"hook": None}, "w": torch.zeros(2)}
        with pytest.raises(UnsafeCheckpointError, match="refusing a non-tensor value"):
            safe_load(state, tmp_path / "dcp", no_dist=True)
    assert not marker.exists()


def test_optimizer_file_payload_is_refused(tmp_path):
    """Single-file checkpoints: optimizer.pt goes through torch.load(weights_only=True)."""
    config = MegalodonConfig.from_preset("nano", **CONFIG)
    model = MegalodonLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path, 1, model, optimizer, None, {"step": 1})
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, buf)
    (ckpt / "optimizer.pt").write_bytes(buf.getvalue())
    (ckpt / "manifest.json").unlink()  # as if from an older version: only the unpickler stands in the way
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt is unreadable"):
        load_checkpoint(ckpt, model, optimizer)
    assert not marker.exists()


def test_resume_path_under_a_process_group_runs_nothing(tmp_path):
    """`torchrun ... train --resume` loads through `load_sharded`: a payload there is refused on every rank
    (here a one-process gloo group) in one line, before anything is restored."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from megalodon_lm.distributed.checkpoint_dcp import load_sharded

    run = _sharded_run(tmp_path, manifest=False)
    ckpt = run / "checkpoints" / "step_00000001"
    marker = tmp_path / "marker"
    _plant_metadata_payload(ckpt, marker)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = _Module(MegalodonLM(MegalodonConfig.from_preset("nano", **CONFIG)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ctx = SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"))
        with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*\.metadata") as info:
            load_sharded(ckpt, model, torch.optim.AdamW(model.parameters()), ctx)
        assert "\n" not in str(info.value)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        dist.destroy_process_group()
    assert not marker.exists()
