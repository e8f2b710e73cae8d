"""Train a denoiser or a VAE.

    python train.py --config configs/shapes/vae.yaml                             # -> runs/shapes-vae/vae
    python train.py --config configs/shapes/tiny.yaml --set train.vae=runs/shapes-vae/vae # -> runs/shapes-tiny/pipeline
    python sample.py --checkpoint runs/shapes-tiny/pipeline --prompt "a red circle moving right" --output red.mp4
    python train.py --config CONFIG --resume latest                              # the run's newest checkpoint
    torchrun --nproc_per_node 8 train.py --config CONFIG                          # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node 8 train.py --config CONFIG --set parallel.fsdp=true # FSDP2: sharded over the 8
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_endpoint HOST:PORT train.py --config CONFIG \
        --set parallel.fsdp=true parallel.fsdp_shard_size=8                    # HSDP: sharded within each machine
"""

import argparse
import logging
import os
import signal
import sys

from videodit.config import ConfigError, load_config, one_line_warnings
from videodit.data.manifest import ManifestError
from videodit.train.loop import STOP_SIGNALS, Diverged, Stopped, train


def main(argv=None):
    p = argparse.ArgumentParser(description="Train a videodit denoiser (train.task: dit) or VAE (train.task: vae).")
    p.add_argument("--config", required=True, help="a YAML config, e.g. configs/shapes/tiny.yaml")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. train.max_steps=100 data.max_tokens=4096")
    p.add_argument("--resume", default=None, metavar="latest|DIR",
                   help="continue from the run's newest checkpoint (latest) or a checkpoint folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("videodit").setLevel(logging.INFO)
    try:
        cfg = load_config(args.config, args.set)
        print(train(cfg, args.resume))
    except (ConfigError, ManifestError, OSError, Diverged) as e:  # OSError: a file that cannot be read or written
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without the step's checkpoint
        print("interrupted: no checkpoint of the step under way; go on from the newest with --resume latest",
              file=sys.stderr)
        raise SystemExit(130) from None
    except Stopped as e:  # the exit status of a process ended by the signal: the job did not finish
        for s in STOP_SIGNALS:  # a launcher's own SIGTERM to the processes still running must not change it
            signal.signal(s, signal.SIG_IGN)
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr)
        raise SystemExit(128 + e.signum) from None


if __name__ == "__main__":
    one_line_warnings()
    main()
