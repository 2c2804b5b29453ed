"""Export files get the mode of every other written file (0644 under umask 022); safetensors alone wrote 0600,
so another user of a shared export folder could read the config but not the weights."""
from __future__ import annotations

import os
import stat

import open_clip

from vlp.hf_export import export_hf_clip
from vlp.models import create_model, export_open_clip


def test_export_weights_have_the_umask_mode(micro_model_json, tmp_path):
    b = create_model(micro_model_json)
    mask = os.umask(0o022)
    try:
        oc = export_open_clip(b.model, b.model_cfg, open_clip.get_model_preprocess_cfg(b.model), tmp_path / "oc")
        hf = export_hf_clip(b.model, open_clip.get_model_preprocess_cfg(b.model), tmp_path / "hf")
    finally:
        os.umask(mask)
    files = [p for d in (oc, hf) for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".json" for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
