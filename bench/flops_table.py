"""The preset table: depth, width, heads, parameters and forward FLOPs per token, from the analytic counter.
Run: python bench/flops_table.py [--seq-len 16384] [--text-len 226]"""

import argparse

from videodit.dit import PRESETS
from videodit.flops import dit_paper_gmacs, flops_per_token, param_count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--text-len", type=int, default=226)
    args = ap.parse_args()
    if args.seq_len < 1:
        ap.error(f"--seq-len must be at least 1 (video tokens of the sample), got {args.seq_len}")
    if args.text_len < 0:
        ap.error(f"--text-len must be at least 0 (0: no text tokens), got {args.text_len}")
    print(f"forward FLOPs per video token for one sample of {args.seq_len} tokens and {args.text_len} text tokens "
          f"(FLOPs = 2 x MACs; attention included)\n")
    print("| preset | depth | width | heads | in ch | text dim | params | fwd GFLOPs/token | of which attention |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cfg in PRESETS.items():
        total = flops_per_token(cfg, args.seq_len, args.text_len)
        attn = 4 * cfg["depth"] * args.seq_len * cfg["hidden_size"]  # self-attention scores and values
        print(f"| {name} | {cfg['depth']} | {cfg['hidden_size']} | {cfg['num_heads']} | {cfg['in_channels']} | "
              f"{cfg['text_dim']} | {param_count(cfg) / 1e6:,.1f}M | {total / 1e9:.3f} | {attn / total:.0%} |")
    print("\nDiT paper check (forward GMACs, class-conditional 256x256, patch 2):")
    for name, depth, width, published in [("S/2", 12, 384, 6.06), ("B/2", 12, 768, 23.0), ("XL/2", 28, 1152, 118.6)]:
        ours = dit_paper_gmacs(depth, width)
        print(f"  DiT-{name}: {ours:.2f} (paper {published}, {ours / published - 1:+.2%})")


if __name__ == "__main__":
    main()
