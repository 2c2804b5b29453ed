"""Installing vlp: ranges in setup.cfg, the lock in constraints.txt, scripts/setup.sh, the `vlp` command
with its environment report, and vlp.compat's feature checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from tests.conftest import repo_root
from vlp import cli, compat, env
from vlp.config import ConfigError

ROOT = repo_root()


def run_python(args, env_extra=None, **kw):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environ, timeout=300, **kw)


# ---- vlp.compat ----------------------------------------------------------------------------------------------


def test_feature_checks_find_what_the_supported_torch_has():
    # torch >= 2.4 (setup.cfg's floor) has all four.
    assert compat.has_fsdp2() and compat.has_flop_counter()
    assert compat.has_torch_amp() and compat.has_load_weights_only()
    assert compat.require_fsdp2() is compat.fully_shard()
    assert compat.require_flop_counter().__name__ == "FlopCounterMode"


def one_line_naming(e: pytest.ExceptionInfo, *words) -> None:
    msg = str(e.value)
    assert "\n" not in msg and torch.__version__ in msg
    for w in words:
        assert w in msg, msg


def test_missing_features_fail_with_one_line_naming_the_torch_release(monkeypatch):
    monkeypatch.setattr(compat, "FSDP2_MODULES", ("vlp_no_such_module", "torch.nn"))
    assert not compat.has_fsdp2()
    with pytest.raises(ConfigError) as e:
        compat.require_fsdp2()
    one_line_naming(e, "--fsdp", "FSDP2", "torch >= 2.4")

    monkeypatch.setitem(sys.modules, "torch.utils.flop_counter", None)  # import now raises ImportError
    assert not compat.has_flop_counter()
    with pytest.raises(ConfigError) as e:
        compat.require_flop_counter("MFU")
    one_line_naming(e, "MFU", "FlopCounterMode", "torch >= 2.1")

    monkeypatch.delattr(torch.amp, "GradScaler")
    assert not compat.has_torch_amp()
    with pytest.raises(ConfigError) as e:
        compat.require_torch_amp()
    one_line_naming(e, "torch >= 2.3")

    monkeypatch.setattr(torch, "load", lambda f, map_location=None: None)
    assert not compat.has_load_weights_only()
    with pytest.raises(ConfigError) as e:
        compat.require_load_weights_only()
    one_line_naming(e, "weights_only", "torch >= 1.13")


def test_optional_package_missing_names_its_extra():
    assert compat.has_module("yaml") and not compat.has_module("vlp_no_such_package")
    with pytest.raises(ConfigError, match=r"--tokenizer hf:DIR needs the vlp_no_such_package package: "
                                          r"pip install 'vlp\[hf\]'"):
        compat.require_module("vlp_no_such_package", "hf", "--tokenizer hf:DIR")


# ---- the environment report and the `vlp` command -----------------------------------------------------------


def test_env_report_without_cuda_matches_this_environment():
    p = run_python(["-m", "vlp", "env", "--json"], {"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    import vlp

    assert r["vlp"]["version"] == vlp.__version__
    assert r["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    t = r["torch"]
    assert t["version"] == torch.__version__ and t["cuda"] == torch.version.cuda
    assert t["cuda_available"] is False and t["device_count"] == 0 and t["devices"] == []
    assert isinstance(t["threads"], int) and t["threads"] >= 1
    assert set(t["features"]) == {"fsdp2", "flop_counter", "torch_amp", "load_weights_only"}
    for name in ("open_clip_torch", "webdataset", "accelerate", "transformers", "sentencepiece", "fsspec"):
        assert name in r["packages"]
    assert r["packages"]["open_clip_torch"] == metadata.version("open_clip_torch")
    assert r["packages"]["accelerate"] == metadata.version("accelerate")
    assert r["cpu"]["count"] == os.cpu_count()
    assert r["env"]["CUDA_VISIBLE_DEVICES"] == ""
    text = env.format_report(r)
    for label in ("vlp", "python", "torch", "CUDA devices", "torch threads", "CPUs", "open_clip_torch",
                  "webdataset", "accelerate", "transformers", "sentencepiece", "fsspec"):
        assert any(line.startswith(label + " ") for line in text.splitlines()), label
    assert f"torch            {torch.__version__}" in text or torch.__version__ in text
    assert "CUDA devices" in text and "0 (" in text


def test_env_report_describes_a_broken_torch_instead_of_crashing(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise OSError("libcudart.so.13: cannot open shared object file")\n')
    environ = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    p = run_python(["-m", "vlp", "env"], environ)
    assert p.returncode == 0, p.stderr
    assert "import failed: OSError: libcudart.so.13" in p.stdout
    assert "torchvision" in p.stdout and "import fails" in p.stdout  # its import needs torch too


def test_env_report_lists_each_device(monkeypatch):
    class Props:
        name, total_memory, major, minor = "NVIDIA H200", 150_000_000_000, 9, 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    r = env.torch_report()
    assert r["device_count"] == 2 and r["devices"][1] == {"index": 1, "name": "NVIDIA H200",
                                                          "memory_gib": 139.7, "capability": "9.0"}
    text = env.format_report({**env.collect(), "torch": r})
    assert "cuda:1" in text and "NVIDIA H200, 139.7 GiB, sm 9.0" in text


def test_cudnn_version_integer_decoding():
    assert env.cudnn_string(8907) == "8.9.7" and env.cudnn_string(92400) == "9.24.0"
    assert env.cudnn_string(None) is None


def test_cli_dispatches_by_table_and_refuses_unknown_commands(capsys):
    assert cli.main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vlp"]["version"]
    assert cli.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'nope'" in err and "env" in err
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().err
    # A group is a nested table: `vlp tools env --json`.
    table = {"tools": ({"env": ("vlp.env:main", "report")}, "a group")}
    assert cli.dispatch(table, ["tools", "env", "--json"], "vlp") == 0
    assert json.loads(capsys.readouterr().out)["torch"]["version"] == torch.__version__
    for target, _ in cli.COMMANDS.values():
        if isinstance(target, str):
            assert callable(cli.resolve(target)), target
