"""Sample videos from prompts with a trained VideoDiT pipeline (default: the shapes-world model in models/).

    python sample.py --prompt "a red circle moving right" --output red.mp4
    python sample.py --help
"""

from videodit.config import one_line_warnings
from videodit.generate import main

if __name__ == "__main__":
    one_line_warnings()
    main()
