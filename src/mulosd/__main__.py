"""``python -m mulosd ...``, and so ``torchrun --nproc_per_node=N -m mulosd bench|generate|sample ...``."""

import sys

from mulosd.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="mulosd"))
