"""Sampling on several processes: seconds to sample (denoise, decode, write) with sample.py on one process and under
torchrun on two, sharing out the prompts (data parallel), splitting every video's tokens (--sequence-parallel 2) or
guidance's two passes (--cfg-parallel).

    python bench/sampling.py [--checkpoint models/shapes-tiny] [--repeats 2]

Workloads: eight prompts at the checkpoint's size, and one larger video (17 x 128 x 224: 8,064 tokens a step with
guidance on the default model). One process runs with 1 and with 2 threads, each of two processes with 1, so the
rows with 2 threads and with 2 processes use the same cores. The time is the one sample.py --verbose prints (after
loading, until the last process is done); best of --repeats.
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle moving right", "two blue squares moving up on a gray background", "a green triangle",
           "three small yellow circles moving left", "a large purple square on a white background",
           "an orange triangle moving down", "two cyan circles", "a pink square moving right on a black background"]
WORKLOADS = {"8 prompts, checkpoint's size": ["--batch-size", "4"] + [x for p in PROMPTS for x in ("--prompt", p)],
             "1 prompt, 17 x 128 x 224": ["--prompt", PROMPTS[0], "--height", "128", "--width", "224",
                                          "--num-frames", "17"]}
SETTINGS = {"1 process, 1 thread": (1, 1, []), "1 process, 2 threads": (1, 2, []),
            "2 processes, data parallel": (2, 1, []),
            "2 processes, sequence parallel": (2, 1, ["--sequence-parallel", "2"]),
            "2 processes, cfg parallel": (2, 1, ["--cfg-parallel"])}


def seconds(processes: int, threads: int, args: list) -> float:
    """sample.py's sampling time for one run."""
    with tempfile.TemporaryDirectory() as out:
        args = [os.path.join(ROOT, "sample.py"), *args, "--output-dir", out, "--verbose"]
        if processes > 1:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = str(sock.getsockname()[1])
            args = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port, *args]
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return max(float(s) for s in re.findall(r"sample ([\d.]+) s", proc.stdout))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "models", "shapes-tiny"))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error(f"--repeats must be at least 1 (the best of that many runs is reported), got {a.repeats}")
    print(f"sample.py on CPU ({os.cpu_count()} cores), {a.checkpoint}; seconds to sample, best of {a.repeats}\n")
    print("| workload | " + " | ".join(SETTINGS) + " |")
    print("|---" * (len(SETTINGS) + 1) + "|")
    for name, args in WORKLOADS.items():
        times = [min(seconds(p, t, args + extra + ["--checkpoint", a.checkpoint]) for _ in range(a.repeats))
                 for p, t, extra in SETTINGS.values()]
        base = times[1]  # one process on the same cores
        print(f"| {name} | " + " | ".join(f"{s:.1f} s ({base / s:.2f}x)" for s in times) + " |", flush=True)
    print("\n(x: speed against one process with 2 threads)")


if __name__ == "__main__":
    main()
