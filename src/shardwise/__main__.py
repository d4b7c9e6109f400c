import os
import sys

from .cli import PRICING, main

code = main()
if sys.argv[1:2] and sys.argv[1] in PRICING and "torch" in sys.modules:
    # A pricing command that recorded (PyTorch loaded) has written all it
    # writes: PyTorch's teardown (half a second and more) is skipped.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a reader gone (a closed pipe): nothing more to say to it
        code = code or 1
    os._exit(code if isinstance(code, int) else 0)
sys.exit(code)
