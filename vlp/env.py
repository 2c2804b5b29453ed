"""`vlp env`: what a bug report or a first look at a node needs to know about this environment.

Like `python -m torch.utils.collect_env` and `accelerate env`, narrowed to vlp's stack: vlp, Python, torch
with its CUDA/cuDNN/NCCL, the devices it sees, the packages vlp uses (read from their metadata, not
imported), the optional torch features vlp checks for, and the CPU threads. Every probe catches its own
failure and reports it in place, so the report also works on a node without CUDA or with a broken torch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from vlp.flags import Parser

# Distribution names (as pip knows them) of what vlp imports or its extras bring.
PACKAGES = ("torchvision", "open_clip_torch", "timm", "webdataset", "accelerate", "transformers", "tokenizers",
            "sentencepiece", "safetensors", "huggingface_hub", "numpy", "pillow", "fsspec", "s3fs", "gcsfs")
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def package_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cudnn_string(v: Optional[int]) -> Optional[str]:
    """torch reports cuDNN as one integer: 8907 is 8.9.7, 92400 is 9.24.0 (the encoding changed at 9)."""
    if not v:
        return None
    major, rest = (v // 10000, v % 10000) if v >= 10000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def torch_report() -> dict[str, Any]:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - the report must describe a broken torch, not die of it
        return {"version": None, "error": _error(e)}
    r: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                         "hip": getattr(torch.version, "hip", None), "debug": bool(torch.version.debug)}
    try:
        r["cudnn"] = cudnn_string(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    except Exception as e:  # noqa: BLE001
        r["cudnn"] = None
        r["cudnn_error"] = _error(e)
    try:
        r["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None
    except Exception as e:  # noqa: BLE001
        r["nccl"] = None
        r["nccl_error"] = _error(e)
    devices = []
    try:
        r["cuda_available"] = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if r["cuda_available"] else 0):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}"})
    except Exception as e:  # noqa: BLE001
        r["cuda_available"] = False
        r["cuda_error"] = _error(e)
    r["device_count"] = len(devices)
    r["devices"] = devices
    mps = getattr(torch.backends, "mps", None)
    r["mps_available"] = bool(mps and mps.is_available())
    r["threads"] = torch.get_num_threads()
    r["interop_threads"] = torch.get_num_interop_threads()
    dist = torch.distributed
    r["distributed"] = {"available": dist.is_available(),
                        "nccl": dist.is_available() and dist.is_nccl_available(),
                        "gloo": dist.is_available() and dist.is_gloo_available()}
    try:
        from vlp import compat

        r["features"] = {"fsdp2": compat.has_fsdp2(), "flop_counter": compat.has_flop_counter(),
                         "torch_amp": compat.has_torch_amp(), "load_weights_only": compat.has_load_weights_only()}
    except Exception as e:  # noqa: BLE001
        r["features_error"] = _error(e)
    return r


def torchvision_import_error() -> Optional[str]:
    """A torchvision whose compiled ops do not match torch installs fine and fails on import: say so here."""
    if package_version("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return _error(e)
    return None


def cpu_report() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"count": os.cpu_count(), "usable": usable}


def collect() -> dict[str, Any]:
    import vlp

    report = {
        "vlp": {"version": vlp.__version__, "path": str(Path(vlp.__file__).resolve().parent.parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "torch": torch_report(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cpu": cpu_report(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }
    tv_error = torchvision_import_error()
    if tv_error:
        report["packages_errors"] = {"torchvision": tv_error}
    return report


def _yes(b: Any) -> str:
    return "yes" if b else "no"


def format_report(r: dict[str, Any]) -> str:
    t = r["torch"]
    rows = [("vlp", f"{r['vlp']['version']}  ({r['vlp']['path']})"),
            ("python", f"{r['python']['version']} {r['python']['implementation']}  ({r['python']['executable']})"),
            ("platform", r["platform"])]
    if t.get("version") is None:
        rows.append(("torch", f"import failed: {t.get('error')}"))
    else:
        stack = [f"CUDA {t['cuda']}" if t["cuda"] else "CPU build"]
        if t.get("hip"):
            stack.append(f"HIP {t['hip']}")
        stack += [f"cuDNN {t['cudnn']}" if t.get("cudnn") else "no cuDNN",
                  f"NCCL {t['nccl']}" if t.get("nccl") else "no NCCL"]
        rows.append(("torch", f"{t['version']}  ({', '.join(stack)})"))
        if t["devices"]:
            rows.append(("CUDA devices", str(t["device_count"])))
            rows += [(f"  cuda:{d['index']}", f"{d['name']}, {d['memory_gib']} GiB, sm {d['capability']}")
                     for d in t["devices"]]
        else:
            why = t.get("cuda_error") or ("no CUDA device visible" if t["cuda"] else "torch built without CUDA")
            rows.append(("CUDA devices", f"0 ({why})" + ("; MPS available" if t.get("mps_available") else "")))
        d = t["distributed"]
        rows.append(("distributed", f"nccl {_yes(d['nccl'])}, gloo {_yes(d['gloo'])}" if d["available"] else "not built"))
        if "features" in t:
            f = t["features"]
            rows.append(("torch features", f"FSDP2 fully_shard {_yes(f['fsdp2'])}, FlopCounterMode {_yes(f['flop_counter'])}, "
                                           f"torch.amp {_yes(f['torch_amp'])}, load(weights_only) {_yes(f['load_weights_only'])}"))
        rows.append(("torch threads", f"{t['threads']} (inter-op {t['interop_threads']})"))
    cpu = r["cpu"]
    rows.append(("CPUs", f"{cpu['usable']} usable of {cpu['count']}"))
    errors = r.get("packages_errors", {})
    for name, version in r["packages"].items():
        text = version or "not installed"
        if name in errors:
            text += f"  (import fails: {errors[name]})"
        rows.append((name, text))
    rows += [(k, v) for k, v in r["env"].items() if v is not None]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = Parser(description="Report vlp's environment (paste it into bug reports).")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
