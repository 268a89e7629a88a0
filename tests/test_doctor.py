"""`forgepipe doctor`: what RCCL's network path and the GPU stack resolve to, and from where.

It runs here (no GPU, no libfabric, no plugin: it says so and exits 0 unless something is meant),
with stand-ins for the host's libfabric and the RCCL plugin compiled on the spot, and its verdict is
checked on reports built by hand for what only a cluster shows (host libraries injected by
`--rocm`, a libfabric loaded through the plugin's RPATH, a GPU the ops were not built for).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from forgepipe.cli import main
from forgepipe.doctor import Report, mount_points, origin, plugin_candidates, problems

ROOT = Path(__file__).resolve().parents[1]
NETWORK_ENV = ("NCCL_NET", "NCCL_NET_PLUGIN", "FI_PROVIDER", "FORGEPIPE_IMAGE_BUILD")


@pytest.fixture
def bare_env(monkeypatch):
    for name in NETWORK_ENV:
        monkeypatch.delenv(name, raising=False)


def test_doctor_runs_on_a_cpu_machine_and_says_what_it_cannot_find(bare_env):
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for label in ("libfabric:", "RCCL plugin:", "torch:", "arch list:", "loaded from:"):
        assert f"\n{label}" in out, label
    if "libfabric.so.1: cannot open" in out:
        assert "libfabric:    not found" in out
    assert out.rstrip().endswith("forgepipe doctor: nothing meant is missing")


def test_what_is_meant_but_missing_fails_in_one_line(bare_env, monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_NET", "OFI")
    monkeypatch.setenv("NCCL_NET_PLUGIN", str(tmp_path / "librccl-net.so"))
    result = CliRunner().invoke(main, ["doctor", "--expect-gpu"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("forgepipe doctor: ") and "problem(s)" in line
    assert f"NCCL_NET_PLUGIN={tmp_path / 'librccl-net.so'}) does not load" in line
    import torch

    assert ("sees no GPU" in line) == (not torch.cuda.is_available())  # the image's own test may run on a GPU host


def test_library_origin_from_the_mount_table():
    mountinfo = (
        "100 99 0:50 / / ro,nodev - squashfs /dev/loop1 ro\n"
        "101 100 0:51 /opt/cray /opt/cray rw - lustre host rw\n"
        "102 100 0:52 / /.singularity.d/libs rw - tmpfs tmpfs rw\n"
        "103 100 0:53 /home /my\\040home rw - nfs host rw\n"
    )
    mounts = mount_points(mountinfo)
    assert mounts == ["/", "/opt/cray", "/.singularity.d/libs", "/my home"]
    assert origin("/opt/cray/libfabric/1.22.0/lib64/libfabric.so.1.25.0", mounts, "apptainer") == "host bind (/opt/cray)"
    assert origin("/opt/rocm/lib/libamdhip64.so.7", mounts, "apptainer") == "image"
    assert origin("/opt/crayfish/lib.so", mounts, "apptainer") == "image"  # a prefix of a name is no mount
    assert origin("/.singularity.d/libs/libdrm.so.2", mounts, "apptainer").startswith("host, injected by Apptainer")
    assert origin("/usr/lib64/libdrm.so.2", mounts, None) == "host (no container)"


def test_plugin_names_are_tried_as_rccl_tries_them():
    assert plugin_candidates("") == ["librccl-net.so", "libnccl-net.so"]
    assert plugin_candidates("/opt/aws-ofi-nccl/lib/librccl-net.so") == ["/opt/aws-ofi-nccl/lib/librccl-net.so"]
    assert plugin_candidates("ofi") == ["librccl-net-ofi.so", "libnccl-net-ofi.so"]


def frontier_report(**changes) -> Report:
    """A multi-node job in the image, as meant: host libfabric with cxi, the image's plugin and ROCm."""
    report = Report(
        container="apptainer",
        libfabric="/opt/cray/libfabric/1.22.0/lib64/libfabric.so.1",
        libfabric_version="1.22",
        providers=["cxi", "tcp"],
        meant_libfabric="/opt/cray/libfabric/1.22.0/lib64/libfabric.so.1",
        plugin_wanted="/opt/aws-ofi-nccl/lib/librccl-net.so",
        plugin="/opt/aws-ofi-nccl/lib/librccl-net.so",
        plugin_versions=["v9", "v8"],
        torch="2.10.0",
        torch_backend="hip 7.1",
        gpus=["gfx90a:sramecc+:xnack-"] * 8,
        arch_list=["gfx90a", "gfx942", "gfx1100"],
        ops_archs=["gfx90a"],
        libraries=[
            ("/opt/cray/libfabric/1.22.0/lib64/libfabric.so.1", "host bind (/opt/cray)"),
            ("/.singularity.d/libs/libcxi.so.1", "host, injected by Apptainer into /.singularity.d/libs"),
            ("/opt/aws-ofi-nccl/lib/librccl-net.so", "image"),
            ("/opt/rocm/lib/libdrm.so.2", "image"),
            ("/opt/rocm/lib/librccl.so.1", "image"),
        ],
    )
    for key, value in changes.items():
        setattr(report, key, value)
    return report


OFI = {"NCCL_NET": "OFI", "NCCL_NET_PLUGIN": "/opt/aws-ofi-nccl/lib/librccl-net.so"}


def test_a_frontier_job_as_meant_has_no_problem():
    assert problems(frontier_report(), OFI, provider="cxi", expect_gpu=True) == []


@pytest.mark.parametrize(
    ("changes", "provider", "message"),
    [
        # --rocm: the host's libdrm over the image's
        ({"libraries": [("/.singularity.d/libs/libdrm.so.2", "host, injected by Apptainer into /.singularity.d/libs")]},
         "cxi", "libdrm.so.2 comes from the host, injected by Apptainer"),
        # the ldd closure copied in: the host's libcurl
        ({"libraries": [("/.singularity.d/libs/libcurl.so.4", "host, injected by Apptainer into /.singularity.d/libs")]},
         "cxi", "libcurl.so.4 comes from the host"),
        # the plugin's RPATH wins over LD_LIBRARY_PATH: the image's libfabric, no CXI
        ({"libfabric": "/opt/libfabric/lib/libfabric.so.1", "providers": ["tcp", "udp"]}, "cxi",
         "libfabric loaded from /opt/libfabric/lib/libfabric.so.1, not /opt/cray/libfabric/1.22.0/lib64/libfabric.so.1"),
        ({"providers": ["tcp"]}, "cxi", "offers no 'cxi' provider (it offers: tcp)"),
        ({"libfabric": None, "libfabric_error": "libfabric.so.1: cannot open shared object file"}, "",
         "libfabric does not load: libfabric.so.1: cannot open"),
        ({"plugin": None, "plugin_error": "no such file"}, "", "(NCCL_NET_PLUGIN=/opt/aws-ofi-nccl/lib/librccl-net.so) does not load"),
        ({"plugin_versions": []}, "", "exports no ncclNetPlugin_v* symbol"),
        ({"gpus": []}, "", "sees no GPU"),
        ({"gpus": ["gfx942:sramecc+:xnack-"], "ops_archs": ["gfx90a"]}, "",
         "this GPU is gfx942; the image's DeepSpeed ops are built for gfx90a"),
        ({"gpus": ["gfx1201"], "ops_archs": ["gfx1201"]}, "", "this GPU is gfx1201, which torch's arch list lacks"),
    ],
)
def test_each_thing_meant_but_wrong_is_named(changes, provider, message):
    found = problems(frontier_report(**changes), OFI, provider=provider, expect_gpu=True)
    assert any(message in item for item in found), found


def test_outside_a_container_nothing_is_a_host_library_problem():
    report = frontier_report(container=None, libraries=[("/usr/lib64/libdrm.so.2", "host (no container)")])
    assert problems(report, OFI, provider="cxi") == []
    # A single-node run with neither plugin nor libfabric meant: nothing to miss.
    assert problems(Report(torch="2.13.0", torch_backend="cpu"), {}) == []


FAKE_LIBFABRIC = r"""
#include <stdint.h>
#include <stdlib.h>
struct fab { void *fabric; char *name; char *prov_name; uint32_t pv, av; };
struct info { struct info *next; uint64_t caps, mode; uint32_t af; size_t s, d;
              void *sa, *da, *h, *tx, *rx, *ep, *dom; struct fab *fa; void *nic; };
static struct fab fabs[] = {PROVIDERS};
uint32_t fi_version(void) { return (VERSION_MAJOR << 16) | VERSION_MINOR; }
int fi_getinfo(uint32_t v, const char *n, const char *s, uint64_t f, const void *hints, struct info **out) {
    struct info *head = 0;
    for (int i = sizeof fabs / sizeof fabs[0] - 1; i >= 0; i--) {
        struct info *x = calloc(1, sizeof *x); x->fa = &fabs[i]; x->next = head; head = x;
    }
    *out = head; return 0;
}
void fi_freeinfo(struct info *i) { while (i) { struct info *n = i->next; free(i); i = n; } }
"""
FAKE_PLUGIN = "int ncclNetPlugin_v9 = 9, ncclNetPlugin_v8 = 8;\nunsigned fi_version(void);\nunsigned probe(void) { return fi_version(); }\n"


def compile_lib(gcc: str, src: str, out: Path, *flags: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(out), str(c), *flags], check=True, capture_output=True)


def test_doctor_reports_the_libfabric_and_plugin_that_load_and_catches_an_rpath_over_ld_library_path(tmp_path):
    """The host libfabric (2.1, cxi) first on LD_LIBRARY_PATH, the image's (1.22, tcp only) elsewhere;
    one plugin links libfabric plainly, another with an RPATH to the image's: the loader then takes
    the image's libfabric whatever LD_LIBRARY_PATH says, and the job would use TCP."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler here")
    host, image = tmp_path / "host-lib64", tmp_path / "image-lib"
    for lib, version, provs in ((host, (2, 1), '{0, "cxi0", "cxi"}, {0, "cxi1", "cxi"}, {0, "lo", "tcp"}'),
                                (image, (1, 22), '{0, "lo", "tcp"}')):
        src = FAKE_LIBFABRIC.replace("PROVIDERS", provs)
        src = src.replace("VERSION_MAJOR", f"{version[0]}u").replace("VERSION_MINOR", f"{version[1]}u")
        compile_lib(gcc, src, lib / "libfabric.so.1", "-Wl,-soname,libfabric.so.1")
    plain, rpath = tmp_path / "plain" / "librccl-net.so", tmp_path / "rpath" / "librccl-net.so"
    compile_lib(gcc, FAKE_PLUGIN, plain, f"-L{host}", "-l:libfabric.so.1")
    compile_lib(gcc, FAKE_PLUGIN, rpath, f"-L{image}", "-l:libfabric.so.1", "-Wl,--disable-new-dtags", f"-Wl,-rpath,{image}")

    def doctor(plugin: Path):
        """The network half of `forgepipe doctor --provider cxi` in a process of its own (the loader
        reads LD_LIBRARY_PATH at start; torch, whose import is the slow half, is not needed)."""
        env = {**{k: v for k, v in os.environ.items() if k not in NETWORK_ENV},
               "LD_LIBRARY_PATH": f"{host}:{image}", "NCCL_NET": "OFI", "NCCL_NET_PLUGIN": str(plugin)}
        code = (
            "import os, sys\n"
            "from forgepipe.doctor import gather_network, problems, render\n"
            "env = dict(os.environ)\nreport = gather_network(env)\nprint('\\n'.join(render(report, env)))\n"
            "found = problems(report, env, provider='cxi')\n"
            "if found: sys.exit('forgepipe doctor: ' + '; '.join(found))\n"
        )
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                              cwd=ROOT)

    good = doctor(plain)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"libfabric:    2.1 {host / 'libfabric.so.1'}" in good.stdout
    assert "providers: cxi, tcp" in good.stdout
    assert f"RCCL plugin:  {plain} [" in good.stdout and "interfaces v9, v8" in good.stdout
    bad = doctor(rpath)
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert f"libfabric loaded from {image / 'libfabric.so.1'}, not {host / 'libfabric.so.1'}" in line
    assert "offers no 'cxi' provider (it offers: tcp)" in line
