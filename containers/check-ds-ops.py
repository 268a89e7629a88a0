"""Fail unless DeepSpeed has every op the image asked for, installed for the GPU accelerator.

Run at the end of the image build (containers/build-ds-ops.sh) and again by the image's own test.
The ops asked for are the DS_BUILD_<OP>=1 settings (containers/versions.env; DS_BUILD_OPS, the
all-ops switch, aside); each must be in `deepspeed.git_version_info.installed_ops` with its
compiled module on disk, and the ops must have been built for the `cuda` accelerator (ROCm's
torch answers as CUDA too): DeepSpeed loads a prebuilt op only when the accelerator it was built
for is the one it runs on, and compiles it again on every node otherwise.
Exit status 1 with one line naming what is missing; 0 and a summary otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def wanted_ops(env: dict[str, str]) -> list[str]:
    return sorted(
        key[len("DS_BUILD_"):].lower()
        for key, value in env.items()
        if key.startswith("DS_BUILD_") and key != "DS_BUILD_OPS" and value == "1"
    )


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
    print(f"check-ds-ops: DeepSpeed {deepspeed.__version__}, ops built for {built_for}: {', '.join(wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
