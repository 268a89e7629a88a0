"""`forgepipe doctor`: what RCCL's network path and the GPU stack resolve to in this process.

Run inside the container as a job would run it (`srun ... apptainer exec forge.sif forgepipe doctor`).
It loads what a run loads, in the same order (torch, whose RCCL dlopens the network plugin named by
NCCL_NET_PLUGIN, which links libfabric), then prints:

- libfabric: the file loaded, its API version and the providers it offers (cxi on Slingshot);
- the RCCL network plugin: the file loaded and the plugin interface versions it exports;
- the GPU architecture(s) torch sees, torch's compiled arch list, and the architecture the image's
  DeepSpeed ops were built for (FORGEPIPE_IMAGE_BUILD's arch=);
- where each of these libraries (and the ones a host bind could shadow: libdrm, libnuma, libelf,
  libssl, libcurl, ...) was loaded from: the image, a host bind (which mount), or Apptainer's
  injected /.singularity.d/libs (--rocm, --nv, APPTAINER_CONTAINLIBS).

Nothing found is a line saying so, not an error. Exit status 1, with one line on stderr, only when
something meant is missing or wrong: the plugin NCCL_NET_PLUGIN names does not load; with
NCCL_NET=OFI, libfabric does not load, is not the one LD_LIBRARY_PATH puts first, or lacks the
provider asked for (--provider, else FI_PROVIDER); inside a container, a library other than the
network path's (libfabric, the CXI provider's libraries, the plugin) comes from the host; a GPU
torch sees is missing from torch's arch list or from the ops' architecture; --expect-gpu and none.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import click

# Libraries the network path may take from the host (the Cray libfabric and what its CXI provider
# links), and those that must stay the image's own.
NETWORK_LIBS = ("libfabric.so", "libcxi.so", "libjson-c.so", "libnl-3.so", "libnl-route-3.so", "libjansson.so",
                "libxpmem.so", "librccl-net", "libnccl-net")
IMAGE_LIBS = ("librccl.so", "libnccl.so", "libamdhip64.so", "libhsa-runtime64.so", "libhsakmt.so", "libdrm.so",
              "libdrm_amdgpu.so", "libnuma.so", "libelf.so", "libssl.so", "libcrypto.so", "libcurl.so", "libcudart.so",
              "libstdc++.so")
PLUGIN_VERSIONS = tuple(f"ncclNetPlugin_v{v}" for v in range(11, 1, -1))
INJECTED = "/.singularity.d/libs"


@dataclass
class Report:
    container: str | None = None  # "apptainer", "docker" or None
    libfabric: str | None = None  # path loaded
    libfabric_error: str = ""
    libfabric_version: str = ""
    providers: list[str] | None = None  # None: not asked (no libfabric)
    meant_libfabric: str | None = None  # first libfabric.so.1 on LD_LIBRARY_PATH
    plugin_wanted: str = ""  # NCCL_NET_PLUGIN
    plugin: str | None = None
    plugin_error: str = ""
    plugin_versions: list[str] = field(default_factory=list)
    torch: str = ""
    torch_backend: str = ""  # "hip 7.1", "cuda 12.8", "cpu"
    gpus: list[str] = field(default_factory=list)
    arch_list: list[str] = field(default_factory=list)
    ops_archs: list[str] = field(default_factory=list)
    libraries: list[tuple[str, str]] = field(default_factory=list)  # (path, origin)


# --- where a file comes from ---------------------------------------------------------------------


def container_kind(env: dict[str, str]) -> str | None:
    if env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER") or Path("/.singularity.d").is_dir():
        return "apptainer"
    if Path("/.dockerenv").exists():
        return "docker"
    return None


def mount_points(mountinfo: str) -> list[str]:
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def origin(path: str, mounts: list[str], container: str | None) -> str:
    """'image', 'host bind (<mount point>)', 'host, injected by Apptainer' or 'host (no container)'."""
    if not container:
        return "host (no container)"
    if path == INJECTED or path.startswith(INJECTED + "/"):
        return f"host, injected by Apptainer into {INJECTED} (--rocm, --nv or APPTAINER_CONTAINLIBS)"
    best = "/"
    for point in mounts:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    return "image" if best == "/" else f"host bind ({best})"


def loaded_paths(maps: str) -> list[str]:
    seen: dict[str, None] = {}
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5]:
            seen.setdefault(parts[5].removesuffix(" (deleted)"), None)
    return list(seen)


def read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def loaded(prefix: str) -> str | None:
    return next((p for p in loaded_paths(read("/proc/self/maps")) if Path(p).name.startswith(prefix)), None)


# --- what loads ----------------------------------------------------------------------------------


class _FabricAttr(ctypes.Structure):
    _fields_ = [("fabric", ctypes.c_void_p), ("name", ctypes.c_char_p), ("prov_name", ctypes.c_char_p),
                ("prov_version", ctypes.c_uint32), ("api_version", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    pass


_Info._fields_ = [("next", ctypes.POINTER(_Info)), ("caps", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                  ("addr_format", ctypes.c_uint32), ("src_addrlen", ctypes.c_size_t),
                  ("dest_addrlen", ctypes.c_size_t), ("src_addr", ctypes.c_void_p), ("dest_addr", ctypes.c_void_p),
                  ("handle", ctypes.c_void_p), ("tx_attr", ctypes.c_void_p), ("rx_attr", ctypes.c_void_p),
                  ("ep_attr", ctypes.c_void_p), ("domain_attr", ctypes.c_void_p),
                  ("fabric_attr", ctypes.POINTER(_FabricAttr)), ("nic", ctypes.c_void_p)]


def providers(lib, version: int, timeout: float = 30.0) -> list[str] | None:
    """The providers fi_getinfo offers (distinct, in its order); None if it did not answer in time."""
    out: list[str] = []

    def ask():
        info = ctypes.POINTER(_Info)()
        lib.fi_getinfo.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint64,
                                   ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(_Info))]
        if lib.fi_getinfo(version, None, None, 0, None, ctypes.byref(info)) != 0:
            return
        node = info
        while node:
            attr = node.contents.fabric_attr
            name = attr.contents.prov_name.decode() if attr and attr.contents.prov_name else "?"
            if name not in out:
                out.append(name)
            node = node.contents.next
        lib.fi_freeinfo(info)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if thread.is_alive() else out


def first_on_path(name: str, env: dict[str, str]) -> str | None:
    for d in env.get("LD_LIBRARY_PATH", "").split(":"):
        if d and (Path(d) / name).exists():
            return str(Path(d) / name)
    return None


def plugin_candidates(value: str) -> list[str]:
    """The files RCCL tries for NCCL_NET_PLUGIN (a path, or a name: lib{rccl,nccl}-net-<name>.so)."""
    if not value:
        return ["librccl-net.so", "libnccl-net.so"]
    if "/" in value or value.endswith(".so"):
        return [value]
    return [f"librccl-net-{value}.so", f"libnccl-net-{value}.so"]


def load_network(report: Report, env: dict[str, str]) -> None:
    report.plugin_wanted = env.get("NCCL_NET_PLUGIN", "")
    if report.plugin_wanted.lower() != "none":
        errors = []
        for name in plugin_candidates(report.plugin_wanted):
            try:
                lib = ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_LOCAL)
            except OSError as exc:
                errors.append(str(exc))
                continue
            report.plugin = loaded(Path(name).name.split(".so")[0] + ".so") or name
            report.plugin_versions = [v.rsplit("_", 1)[1] for v in PLUGIN_VERSIONS if hasattr(lib, v)]
            break
        else:
            report.plugin_error = errors[-1] if errors else "no candidate"
    report.meant_libfabric = first_on_path("libfabric.so.1", env)
    try:
        fabric = ctypes.CDLL("libfabric.so.1", mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as exc:
        report.libfabric_error = str(exc)
        return
    report.libfabric = loaded("libfabric.so") or "libfabric.so.1"
    fabric.fi_version.restype = ctypes.c_uint32
    version = fabric.fi_version()
    report.libfabric_version = f"{version >> 16}.{version & 0xFFFF}"
    report.providers = providers(fabric, version)


def load_gpu(report: Report, env: dict[str, str]) -> None:
    try:
        import torch
    except Exception as exc:  # a broken torch is what this command is for
        report.torch = f"does not import ({exc})"
        return
    report.torch = torch.__version__
    hip, cuda = getattr(torch.version, "hip", None), getattr(torch.version, "cuda", None)
    report.torch_backend = f"hip {hip}" if hip else f"cuda {cuda}" if cuda else "cpu"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            report.gpus.append(getattr(props, "gcnArchName", "") if hip else f"sm_{props.major}{props.minor}")
        report.arch_list = list(torch.cuda.get_arch_list())
    elif hasattr(torch._C, "_cuda_getArchFlags"):
        report.arch_list = (torch._C._cuda_getArchFlags() or "").split()
    match = re.search(r"\barch=(\S+)", env.get("FORGEPIPE_IMAGE_BUILD", ""))
    report.ops_archs = [a for a in re.split(r"[;,]", match.group(1)) if a] if match else []


def gather(env: dict[str, str]) -> Report:
    report = Report(container=container_kind(env))
    load_gpu(report, env)  # torch (and its RCCL/NCCL) first, as in a run
    return gather_network(env, report)


def gather_network(env: dict[str, str], report: Report | None = None) -> Report:
    report = report or Report(container=container_kind(env))
    load_network(report, env)
    mounts = mount_points(read("/proc/self/mountinfo"))
    for path in loaded_paths(read("/proc/self/maps")):
        if Path(path).name.startswith(NETWORK_LIBS + IMAGE_LIBS):
            report.libraries.append((path, origin(path, mounts, report.container)))
    return report


# --- what is wrong -------------------------------------------------------------------------------


def base_arch(arch: str) -> str:
    return arch.split(":")[0]


def problems(report: Report, env: dict[str, str], provider: str = "", expect_gpu: bool = False) -> list[str]:
    found = []
    ofi = env.get("NCCL_NET", "").upper() == "OFI"
    if (report.plugin_wanted and report.plugin_wanted.lower() != "none" or ofi) and not report.plugin:
        found.append(f"RCCL's network plugin (NCCL_NET_PLUGIN={report.plugin_wanted or 'unset'}) does not load: "
                     f"{report.plugin_error}")
    elif report.plugin and not report.plugin_versions:
        found.append(f"{report.plugin} exports no ncclNetPlugin_v* symbol: not an RCCL network plugin")
    if ofi or provider:
        if not report.libfabric:
            found.append(f"libfabric does not load: {report.libfabric_error}")
        else:
            meant = report.meant_libfabric
            if meant and os.path.realpath(meant) != os.path.realpath(report.libfabric):
                found.append(f"libfabric loaded from {report.libfabric}, not {meant} (first on LD_LIBRARY_PATH)")
            if provider and report.providers is not None and provider not in report.providers:
                found.append(f"libfabric {report.libfabric_version} offers no '{provider}' provider "
                             f"(it offers: {', '.join(report.providers) or 'none'})")
            if provider and report.providers is None:
                found.append("libfabric's fi_getinfo did not answer within 30 s")
    if report.container:
        for path, where in report.libraries:
            if not Path(path).name.startswith(NETWORK_LIBS) and where != "image":
                found.append(f"{Path(path).name} comes from the {where}, over the image's own ({path})")
    if expect_gpu and not report.gpus:
        found.append(f"torch {report.torch} ({report.torch_backend or 'no backend'}) sees no GPU")
    listed = {base_arch(a) for a in report.arch_list}
    for arch in dict.fromkeys(base_arch(g) for g in report.gpus):
        if listed and arch not in listed and not (arch.startswith("sm_") and any(
                a.startswith("compute_") and int(a[8:]) <= int(arch[3:]) for a in listed if a[8:].isdigit())):
            found.append(f"this GPU is {arch}, which torch's arch list lacks ({' '.join(sorted(listed))})")
        if report.ops_archs and arch.startswith("gfx") and arch not in {base_arch(a) for a in report.ops_archs}:
            found.append(f"this GPU is {arch}; the image's DeepSpeed ops are built for {';'.join(report.ops_archs)} "
                         "(build a local image for it: make docker ROCM_ARCH=...)")
    return found


def render(report: Report, env: dict[str, str]) -> list[str]:
    where = dict(report.libraries)

    def at(path: str) -> str:
        return f"{path} [{where.get(path, '?')}]"

    kind = {"apptainer": f"Apptainer container {env.get('APPTAINER_CONTAINER', '')}".rstrip(),
            "docker": "Docker container"}.get(report.container or "", "not in a container")
    lines = [f"forgepipe doctor: {kind}"]
    if env.get("FORGEPIPE_IMAGE_BUILD"):
        lines.append(f"image:        {env['FORGEPIPE_IMAGE_BUILD']}")
    if report.libfabric:
        offered = ("providers did not answer" if report.providers is None
                   else f"providers: {', '.join(report.providers) or 'none'}")
        lines.append(f"libfabric:    {report.libfabric_version} {at(report.libfabric)}; {offered}")
    else:
        lines.append(f"libfabric:    not found ({report.libfabric_error})")
    if report.meant_libfabric:
        lines.append(f"              first on LD_LIBRARY_PATH: {report.meant_libfabric}")
    wanted = f"NCCL_NET_PLUGIN={report.plugin_wanted}" if report.plugin_wanted else "NCCL_NET_PLUGIN unset"
    if report.plugin:
        lines.append(f"RCCL plugin:  {at(report.plugin)} (interfaces {', '.join(report.plugin_versions) or 'none'}; "
                     f"{wanted})")
    else:
        lines.append(f"RCCL plugin:  not found ({wanted}: {report.plugin_error})")
    gpus = ", ".join(f"{n}x {a}" for a, n in _counts(report.gpus).items()) or "none"
    lines.append(f"torch:        {report.torch} ({report.torch_backend or '?'}); GPUs seen: {gpus}")
    lines.append(f"arch list:    {' '.join(report.arch_list) or 'none'} (torch); "
                 f"ops built for: {';'.join(report.ops_archs) or 'unknown (no FORGEPIPE_IMAGE_BUILD arch=)'}")
    lines.append("loaded from:" + ("" if report.libraries else " none of the tracked libraries is loaded"))
    lines.extend(f"  {Path(p).name:<24} {p}  [{w}]" for p, w in report.libraries)
    return lines


def _counts(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


@click.command("doctor")
@click.option("--provider", default=None,
              help="libfabric provider that must be offered (default: $FI_PROVIDER; cxi on Frontier).")
@click.option("--expect-gpu", is_flag=True, help="Fail when torch sees no GPU.")
def doctor(provider, expect_gpu):
    """Print the libfabric, RCCL network plugin, GPU architectures and library sources this process
    resolves (inside the container: image or host bind); exit 1 with one line when one meant is missing."""
    env = dict(os.environ)
    report = gather(env)
    for line in render(report, env):
        click.echo(line)
    found = problems(report, env, provider if provider is not None else env.get("FI_PROVIDER", ""), expect_gpu)
    if found:
        click.echo(f"forgepipe doctor: {len(found)} problem(s): {'; '.join(found)}", err=True)
        sys.exit(1)
    click.echo("forgepipe doctor: nothing meant is missing")
