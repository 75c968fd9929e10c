#!/usr/bin/env python3
"""Time from "start this container" to "module running" for a module of >= 1 MB, through
`ImageManager.ensure` and the WASI host (`load_host(cache_dir).load(path, digest)` + `start`):

  (a) not in the store: pulled from a real local registry (docker-registry), then compiled
  (b) in the store, not compiled (a fresh host cache dir: compile from the stored file)
  (c) compiled: the host already holds the module (the kubelet's restart path; target < 5 ms)
  (d) compiled on disk only: a new process's host loads the cached machine code

Usage: /work/venv/bin/python bench/pull.py [--runs N]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import minikrust  # noqa: E402


def big_module():
    from tests.wasm_modules import _big_wat, wat
    return wat(_big_wat())


def start(images, image, cache_dir):
    """One container start; returns seconds until the module's run has started."""
    t0 = time.perf_counter()
    ref = images.ensure(image, "IfNotPresent")
    module = minikrust.load_host(cache_dir).load(ref.path, digest=ref.digest)
    run = module.start(["big"])
    elapsed = time.perf_counter() - t0
    result = run.wait(30)
    assert result is not None and result.exit_code == 0, result
    return elapsed


def ms(values):
    return (f"median {statistics.median(values) * 1000:8.2f} ms  min {min(values) * 1000:8.2f} ms  "
            f"max {max(values) * 1000:8.2f} ms  (n={len(values)})")


def child(root, image, cache_dir, host_port):
    """(d): a new process, store and compiled cache already on disk."""
    cfg = minikrust.Config(root_dir=root, insecure_registries=(host_port,))
    print(start(minikrust.ImageManager(cfg), image, cache_dir))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="runs of (a), (b) and (d); (c) runs 20x that")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from tests.registry import Registry
    data = big_module()
    work = tempfile.mkdtemp(prefix="minikrust-bench-")
    registry = Registry(os.path.join(work, "registry")).start()
    try:
        image = f"{registry.host}/bench/big:v1"
        registry.push_cncf("bench/big", "v1", data)
        cfg = lambda root: minikrust.Config(root_dir=root, insecure_registries=(registry.host,))  # noqa: E731
        backend = minikrust.load_host(os.path.join(work, "probe")).backend
        print(f"module {len(data) / 1e6:.2f} MB, host backend {backend}, {args.runs} runs")
        a, b, c, d = [], [], [], []
        for i in range(args.runs):
            root = os.path.join(work, f"a{i}")
            a.append(start(minikrust.ImageManager(cfg(root)), image, os.path.join(root, "cache")))
            b.append(start(minikrust.ImageManager(cfg(root)), image, os.path.join(root, "cache-b")))
        images = minikrust.ImageManager(cfg(os.path.join(work, "a0")))
        for _ in range(args.runs * 20):
            c.append(start(images, image, os.path.join(work, "a0", "cache")))
        for i in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--child", os.path.join(work, "a0"), image,
                                  os.path.join(work, "a0", "cache"), registry.host],
                                 capture_output=True, text=True, check=True).stdout
            d.append(float(out.strip().splitlines()[-1]))
        print(f"(a) not in the store:            {ms(a)}")
        print(f"(b) in the store, not compiled:  {ms(b)}")
        print(f"(c) compiled (in memory):        {ms(c)}   target < 5 ms")
        print(f"(d) compiled on disk, new proc:  {ms(d)}")
    finally:
        registry.stop()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
