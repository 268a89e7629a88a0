"""Fail unless DeepSpeed has every op the image asked for, installed for the GPU accelerator.

Run at the end of the image build (containers/build-ds-ops.sh) and again by the image's own test.
The ops asked for are the DS_BUILD_<OP>=1 settings (containers/versions.env; DS_BUILD_OPS, the
all-ops switch, aside); each must be in `deepspeed.git_version_info.installed_ops` with its
compiled module on disk, and the ops must have been built for the `cuda` accelerator (ROCm's
torch answers as CUDA too): DeepSpeed loads a prebuilt op only when the accelerator it was built
for is the one it runs on, and compiles it again on every node otherwise. Each op's compiled
module must also load (imported after torch: a missing library or symbol shows here, not in the
first job). With PYTORCH_ROCM_ARCH (the GPU architecture(s) the ops are built for, `;`-separated)
and a ROCm torch, torch's own arch list must hold each of them, and an op whose GPU code objects are
readable in its module must carry each of them (a module that shows none, compressed, is not judged).
Exit status 1 with one line naming what is missing; 0 and a summary otherwise.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path


def wanted_ops(env: dict[str, str]) -> list[str]:
    return sorted(
        key[len("DS_BUILD_"):].lower()
        for key, value in env.items()
        if key.startswith("DS_BUILD_") and key != "DS_BUILD_OPS" and value == "1"
    )


def target_archs(env: dict[str, str]) -> list[str]:
    return [a for a in re.split(r"[;,\s]+", env.get("PYTORCH_ROCM_ARCH", "")) if a]


def torch_arch_list(torch) -> list[str]:
    """torch's compiled GPU architectures (torch.cuda.get_arch_list() answers [] without a GPU)."""
    flags = torch._C._cuda_getArchFlags() if hasattr(torch._C, "_cuda_getArchFlags") else None
    return flags.split() if flags else []


def module_name(package: Path, path: Path) -> str:
    rel = path.relative_to(package.parent)
    return ".".join([*rel.parent.parts, rel.name.split(".", 1)[0]])


def load_failures(package: Path, ops: list[str]) -> list[str]:
    failed = []
    for op in ops:
        for path in sorted(package.rglob(f"{op}_op*.so")):
            try:
                importlib.import_module(module_name(package, path))
            except Exception as exc:  # ImportError, OSError: what the first job would meet
                failed.append(f"{op} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
                break
    return failed


def arch_failures(package: Path, ops: list[str], archs: list[str]) -> list[str]:
    """'torch ... is not built for gfx942' / 'fused_adam has no code for gfx942', per target missing."""
    if not archs:
        return []
    failed = []
    try:
        import torch
    except Exception as exc:
        return [f"torch does not import ({exc})"]
    if getattr(torch.version, "hip", None):
        have = {a.split(":")[0] for a in torch_arch_list(torch)}
        missing = [a for a in archs if a.split(":")[0] not in have]
        if missing:
            failed.append(f"torch {torch.__version__} is not built for {', '.join(missing)} "
                          f"(its arch list: {' '.join(sorted(have)) or 'empty'})")
    for op in ops:
        for path in sorted(package.rglob(f"{op}_op*.so")):
            data = path.read_bytes()
            if b"amdgcn-amd-amdhsa" not in data:
                continue
            missing = [a for a in archs if f"amdgcn-amd-amdhsa--{a}".encode() not in data]
            if missing:
                failed.append(f"{op} has no code for {', '.join(missing)}")
    return failed


def main() -> int:
    wanted = wanted_ops(dict(os.environ))
    if not wanted:
        print("check-ds-ops: no DS_BUILD_<OP>=1 setting given; nothing to check", file=sys.stderr)
        return 1
    try:
        import deepspeed
        from deepspeed.git_version_info import installed_ops
    except Exception as exc:  # an import that fails is a failed build too
        print(f"check-ds-ops: cannot import DeepSpeed: {exc}", file=sys.stderr)
        return 1
    import deepspeed.git_version_info as info

    expected = os.environ.get("FORGEPIPE_DS_ACCELERATOR", "cuda")
    built_for = getattr(info, "accelerator_name", None)
    if built_for != expected:
        print(f"check-ds-ops: DeepSpeed's ops were built for the '{built_for}' accelerator, not '{expected}' "
              "(build with DS_ACCELERATOR=cuda): they would be compiled again at run time", file=sys.stderr)
        return 1
    package = Path(deepspeed.__file__).parent
    missing = [op for op in wanted if not installed_ops.get(op)]
    no_module = [op for op in wanted if op not in missing and not any(package.rglob(f"{op}_op*.so"))]
    if missing or no_module:
        parts = []
        if missing:
            parts.append(f"not installed: {', '.join(missing)}")
        if no_module:
            parts.append(f"no compiled module (<op>_op*.so) for: {', '.join(no_module)}")
        print(f"check-ds-ops: DeepSpeed {deepspeed.__version__} lacks ops the image needs ({'; '.join(parts)}); "
              "see the op build's output above", file=sys.stderr)
        return 1
    try:  # the compiled ops link against torch's libraries: loaded first, as DeepSpeed does
        import torch  # noqa: F401
    except Exception:
        pass
    not_loading = load_failures(package, wanted)
    if not_loading:
        print(f"check-ds-ops: DeepSpeed {deepspeed.__version__}'s prebuilt ops do not load: {'; '.join(not_loading)}",
              file=sys.stderr)
        return 1
    archs = target_archs(dict(os.environ))
    wrong_arch = arch_failures(package, wanted, archs)
    if wrong_arch:
        print(f"check-ds-ops: not built for the image's GPU architecture {';'.join(archs)}: {'; '.join(wrong_arch)}",
              file=sys.stderr)
        return 1
    arch_note = f", GPU architecture {';'.join(archs)}" if archs else ""
    print(f"check-ds-ops: DeepSpeed {deepspeed.__version__}, ops built for {built_for}{arch_note}, all load: "
          f"{', '.join(wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
