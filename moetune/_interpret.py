"""Choose Triton's interpreter on machines without a GPU, before anything imports triton.

triton.language builds its helpers (``tl.cdiv``, ...) for the interpreter or the compiler when it
is imported, so every moetune module that imports triton imports this first. Set
``TRITON_INTERPRET`` yourself to override.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
