"""The package's .so keeps the C++ runtime shared even where the toolchain would link it statically.

On the lent H200 (g++ 13.3 without the `libstdc++.so` development link) every AOTInductor package, a plain MLP's
too, linked `libstdc++.a` and crashed the loader (docs/export.md). The test reproduces that toolchain with a
compiler wrapper that links the static runtime into shared objects, checks that the wrapper does that to a plain
package (so the test can fail), and that `to_aoti`'s link configs give a package that needs `libstdc++.so.6` and
loads and runs in a fresh process."""
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from hysparse_compile.export import aoti

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("g++") is None
                                or shutil.which("readelf") is None, reason="needs Linux, g++ and readelf")

WRAPPER = """#!/bin/sh
case " $* " in *" -shared "*) exec g++ -static-libstdc++ "$@";; esac
exec g++ "$@"
"""

RUN = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.load(sys.argv[2])
print(float((runner(x) - torch.load(sys.argv[3])).abs().max()))
"""


def needs_shared_cxx_runtime(package) -> bool:
    with zipfile.ZipFile(package) as z:
        so = next(n for n in z.namelist() if n.endswith(".so"))
        z.extract(so, package.parent / "extracted")
    dynamic = subprocess.run(["readelf", "-d", str(package.parent / "extracted" / so)], capture_output=True,
                             text=True, check=True).stdout
    return "libstdc++.so.6" in dynamic


def test_link_configs_keep_user_libs_and_add_the_shared_runtime_once(monkeypatch):
    monkeypatch.setattr(aoti, "_compiler_finds", lambda name: True)
    configs = aoti.link_configs({"aot_inductor.custom_op_libs": ["mine"], "max_autotune": False})
    assert configs == {"aot_inductor.custom_op_libs": ["mine", ":libstdc++.so.6"], "max_autotune": False}
    assert aoti.link_configs(configs) == configs
    monkeypatch.setattr(aoti, "_compiler_finds", lambda name: False)  # no such file: the default link is kept
    assert aoti.link_configs(None) == {}


def test_a_static_runtime_toolchain_still_gives_a_package_that_loads(tmp_path, monkeypatch):
    wrapper = tmp_path / "bin" / "g++"
    wrapper.parent.mkdir()
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # a fresh build, not a cached .so
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    ep = torch.export.export(model, (x,))
    fast = {"aot_inductor.precompile_headers": False}
    for name, configs in (("plain", fast), ("linked", aoti.link_configs(fast))):
        (tmp_path / name).mkdir()
        with torch._inductor.config.patch({"cpp.cxx": (str(wrapper),)}):  # Inductor's compiler: the wrapper
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / name / "m.pt2"),
                                                     inductor_configs=configs)
    assert not needs_shared_cxx_runtime(tmp_path / "plain" / "m.pt2"), "the wrapper did not link statically"
    assert needs_shared_cxx_runtime(tmp_path / "linked" / "m.pt2")
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "ref.pt")
    run = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "linked" / "m.pt2"), str(tmp_path / "x.pt"),
                          str(tmp_path / "ref.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-5
